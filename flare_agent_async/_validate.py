"""Checks of user input shared by the agents and the site: each raises a clear error."""

from __future__ import annotations

import math

__all__ = ["as_secret", "check_timeout"]


def as_secret(secret: bytes | str | None) -> bytes | None:
    """A shared secret as bytes (str is encoded as UTF-8).

    :raises TypeError: it is neither bytes nor str.
    :raises ValueError: it is empty.
    """
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"a secret must be bytes or str, got {type(secret).__name__}")
    if not secret:
        raise ValueError("a secret must not be empty")
    return secret


def check_timeout(timeout: float | None) -> float:
    """Validate a ``get_task`` timeout; returns it in seconds (``math.inf`` for None).

    :raises TypeError: it is not a number.
    :raises ValueError: it is not positive.
    """
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be (int, float) but got {type(timeout)}")
    if not timeout > 0:
        raise ValueError(f"timeout must > 0, but got {timeout}")
    return float(timeout)
