"""Shared-secret authentication: an HMAC challenge and response in the hello, both ways.

The agent's hello carries a fresh nonce; a site that shares a secret with that agent answers with
a `Challenge` of its own nonce; the agent proves it knows the secret with a `Proof`, and the
site's `Welcome` proves the same back. Each MAC covers the agent's identity and both nonces, so a
proof cannot be replayed on another connection, for another agent, or in the other direction.
The secret itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from ._messages import Hello

__all__ = ["agent_proof", "site_proof", "verify"]


def _transcript(role: bytes, hello: Hello, site_nonce: bytes) -> bytes:
    fields = [hello.agent_id, hello.site_name, hello.job_id, hello.instance_id, hello.nonce]
    return role + msgspec.msgpack.encode([*fields, site_nonce])


def agent_proof(secret: bytes, hello: Hello, site_nonce: bytes) -> bytes:
    """The MAC an agent sends to prove it knows ``secret``."""
    return hmac.new(secret, _transcript(b"agent\0", hello, site_nonce), hashlib.sha256).digest()


def site_proof(secret: bytes, hello: Hello, site_nonce: bytes) -> bytes:
    """The MAC a site sends back to prove it knows ``secret`` too."""
    return hmac.new(secret, _transcript(b"site\0", hello, site_nonce), hashlib.sha256).digest()


def verify(expected: bytes, given: object) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time."""
    return isinstance(given, bytes) and hmac.compare_digest(expected, given)
