"""SSL contexts for ``tls://``: a site's, and an agent's, with mutual TLS when wanted.

::

    site_ctx = server_context("site.pem", "site.key", client_ca="agents-ca.pem")   # mutual TLS
    await site.listen("tls://0.0.0.0:8443", ssl_context=site_ctx)

    agent_ctx = client_context("site-ca.pem", certfile="agent.pem", keyfile="agent.key")
    AsyncFlareAgent("tls://site.example:8443", ..., ssl_context=agent_ctx)

Anything `ssl` offers works too: these are plain `ssl.SSLContext` objects.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["client_context", "server_context"]

StrPath = str | os.PathLike[str]


def server_context(
    certfile: StrPath,
    keyfile: StrPath | None = None,
    *,
    client_ca: StrPath | None = None,
    password: str | None = None,
) -> ssl.SSLContext:
    """A site's context: its certificate chain and key; TLS 1.2 at least.

    With ``client_ca``, mutual TLS: every agent must present a certificate signed by it.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile, password)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: StrPath | None = None,
    *,
    certfile: StrPath | None = None,
    keyfile: StrPath | None = None,
    password: str | None = None,
) -> ssl.SSLContext:
    """An agent's context: trust ``ca`` (default: the system's), verify the site's host name.

    With ``certfile`` (and ``keyfile``), the agent presents its certificate for mutual TLS.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile, password)
    return context
