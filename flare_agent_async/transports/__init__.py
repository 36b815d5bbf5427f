"""Transports: how an agent reaches its site, chosen by URL scheme or passed as an object.

Built in: ``tcp://host:port``, ``unix:///path``, ``tls://host:port``, ``memory://name``, and
``nvflare-ipc://host:port`` (an NVFlare IPCExchanger's cell; needs the ``nvflare`` extra). Other
packages add schemes through the entry-point group ``flare_agent_async.transports``: each entry
point names a `Scheme`. `register_scheme` does the same at run time.

Options reach the scheme as keyword arguments: ``limits`` (a `Limits`), ``ssl_context`` (for TLS),
and whatever else a plugin documents. A scheme ignores the options it does not use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from ..protocol._codec import Limits
from ._base import Connector, MessageListener, MessageStream
from ._framed import ByteStream, FramedMessageStream, Progress
from ._memory import MemoryConnector, MemoryListener, memory_stream_pair
from ._socket import TCPConnector, UnixConnector, listen_tcp, listen_unix
from ._tls import TLSConnector, listen_tls

__all__ = [
    "ByteStream",
    "Connector",
    "FramedMessageStream",
    "Limits",
    "MemoryConnector",
    "MemoryListener",
    "MessageListener",
    "MessageStream",
    "Progress",
    "Scheme",
    "TCPConnector",
    "TLSConnector",
    "UnixConnector",
    "connector_for",
    "create_listener",
    "known_schemes",
    "memory_stream_pair",
    "register_scheme",
]

ENTRY_POINT_GROUP = "flare_agent_async.transports"


@dataclass(frozen=True)
class Scheme:
    """A URL scheme: how to connect to a URL of it, and how to listen at one.

    Both take the URL and keyword options (see the module docstring).
    """

    connect: Callable[..., Connector]
    listen: Callable[..., Awaitable[MessageListener]]


async def _listen_memory(url: str, **_: Any) -> MessageListener:
    return MemoryListener(url)


def _connect_nvflare_ipc(url: str, **options: Any) -> Connector:
    # Imported here: nvflare is an optional extra, needed only by this scheme.
    try:
        from ..nvflare._ipc import IPCConnector
    except ModuleNotFoundError as exc:
        if exc.name != "nvflare" and not (exc.name or "").startswith("nvflare."):
            raise
        raise ValueError(
            f"{url!r} needs NVFlare: pip install 'flare-agent-async[nvflare]'"
        ) from exc

    return IPCConnector(url, **options)


async def _listen_nvflare_ipc(url: str, **_: Any) -> MessageListener:
    raise ValueError(f"{url!r}: agents connect to nvflare-ipc:// URLs; an NVFlare job is the site")


_schemes: dict[str, Scheme] = {
    "memory": Scheme(MemoryConnector, _listen_memory),
    "tcp": Scheme(TCPConnector, listen_tcp),
    "unix": Scheme(UnixConnector, listen_unix),
    "tls": Scheme(TLSConnector, listen_tls),
    "nvflare-ipc": Scheme(_connect_nvflare_ipc, _listen_nvflare_ipc),
}
_entry_points_loaded = False


def register_scheme(name: str, scheme: Scheme) -> None:
    """Make ``name://...`` URLs use ``scheme``, replacing any scheme of that name."""
    _schemes[name] = scheme


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        _schemes.setdefault(entry_point.name, entry_point.load())


def known_schemes() -> list[str]:
    """The URL schemes that can be used, built in and from entry points."""
    _load_entry_points()
    return sorted(_schemes)


def _scheme(url: str) -> Scheme:
    name, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r} is not a transport URL: expected scheme://address")
    scheme = _schemes.get(name)
    if scheme is None:
        _load_entry_points()
        scheme = _schemes.get(name)
    if scheme is None:
        raise ValueError(
            f"unknown transport scheme {name!r} in {url!r}; known: {', '.join(known_schemes())}"
        )
    return scheme


def connector_for(target: str | Connector, **options: Any) -> Connector:
    """The connector for a URL (with ``options``), or the connector itself.

    :raises ValueError: the URL is malformed, its scheme is unknown, or an option is missing
        (TLS without ``ssl_context``).
    """
    if isinstance(target, Connector):
        return target
    if not isinstance(target, str):
        raise TypeError(f"expected a URL or a Connector, got {type(target).__name__}")
    return _scheme(target).connect(target, **options)


async def create_listener(target: str | MessageListener, **options: Any) -> MessageListener:
    """A listener bound to a URL (with ``options``), or the listener itself.

    :raises ValueError: the URL is malformed or its scheme is unknown.
    :raises TransportError: the address cannot be bound.
    """
    if isinstance(target, MessageListener):
        return target
    if not isinstance(target, str):
        raise TypeError(f"expected a URL or a MessageListener, got {type(target).__name__}")
    return await _scheme(target).listen(target, **options)
