"""Transports: how an agent reaches its site, chosen by URL scheme or passed as an object.

Built in: ``tcp://host:port``, ``unix:///path``, ``tls://host:port``, ``memory://name``, and
``nvflare-ipc://host:port`` (an NVFlare IPCExchanger's cell; needs the ``nvflare`` extra). Other
packages add schemes through the entry-point group ``flare_agent_async.transports``: each entry
point names a `Scheme`. `register_scheme` does the same at run time.

Options are typed: ``limits`` (a `Limits`) for every scheme that frames bytes, ``ssl_context``
for TLS. An option a scheme does not use is an error that names it, never silently dropped; a
transport with options of its own takes them in its URL, or as an object (a `Connector`).
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from importlib.metadata import entry_points

from ..protocol import Limits
from ._base import Connector, MessageListener, MessageStream, MessageStreamAttribute, Progress
from ._framed import ByteStream, FramedMessageStream
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
    "MessageStreamAttribute",
    "Progress",
    "Scheme",
    "TCPConnector",
    "TLSConnector",
    "TransportOptions",
    "UnixConnector",
    "connector_for",
    "create_listener",
    "known_schemes",
    "memory_stream_pair",
    "register_scheme",
]

ENTRY_POINT_GROUP = "flare_agent_async.transports"


@dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """What a connector or listener made from a URL may be given besides the URL."""

    ssl_context: ssl.SSLContext | None = None
    """For TLS: what to trust, and the certificate to show."""
    limits: Limits | None = None
    """The largest frames accepted (the default `Limits` when None)."""

    def given(self) -> list[str]:
        """The names of the options that were given (not None)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass(frozen=True)
class Scheme:
    """A URL scheme: how to connect to a URL of it, how to listen at one, and which
    `TransportOptions` it uses (giving it another one is an error)."""

    connect: Callable[[str, TransportOptions], Connector]
    listen: Callable[[str, TransportOptions], Awaitable[MessageListener]]
    options: frozenset[str] = frozenset({"limits"})


async def _listen_memory(url: str, options: TransportOptions) -> MessageListener:
    return MemoryListener(url)


async def _listen_tcp(url: str, options: TransportOptions) -> MessageListener:
    return await listen_tcp(url, limits=options.limits)


async def _listen_unix(url: str, options: TransportOptions) -> MessageListener:
    return await listen_unix(url, limits=options.limits)


async def _listen_tls(url: str, options: TransportOptions) -> MessageListener:
    return await listen_tls(url, ssl_context=options.ssl_context, limits=options.limits)


_schemes: dict[str, Scheme | str] = {
    # Objects pass as they are, with no frames to limit: a site's limits do not stop it.
    "memory": Scheme(lambda url, _: MemoryConnector(url), _listen_memory),
    "tcp": Scheme(lambda url, o: TCPConnector(url, limits=o.limits), _listen_tcp),
    "unix": Scheme(lambda url, o: UnixConnector(url, limits=o.limits), _listen_unix),
    "tls": Scheme(
        lambda url, o: TLSConnector(url, ssl_context=o.ssl_context, limits=o.limits),
        _listen_tls,
        frozenset({"limits", "ssl_context"}),
    ),
    # Resolved by name at first use: nvflare is an optional extra, and the module it lives in
    # imports this one.
    "nvflare-ipc": "flare_agent_async.nvflare._ipc:IPC_SCHEME",
}
"""Schemes by name: a `Scheme`, or ``"module:attribute"`` naming one, loaded when first used."""

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
        _schemes.setdefault(entry_point.name, entry_point.value)


def known_schemes() -> list[str]:
    """The URL schemes that can be used, built in and from entry points."""
    _load_entry_points()
    return sorted(_schemes)


def _resolve(name: str, target: str, url: str) -> Scheme:
    """Load the scheme ``target`` (``"module:attribute"``) names; a missing optional package is
    a `ValueError` that says how to install it."""
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if name == "nvflare-ipc" and (exc.name or "").split(".")[0] == "nvflare":
            raise ValueError(
                f"{url!r} needs NVFlare: pip install 'flare-agent-async[nvflare]'"
            ) from exc
        raise ValueError(f"the {name}:// transport cannot be loaded from {target}: {exc}") from exc
    scheme = getattr(module, attribute, None)
    if not isinstance(scheme, Scheme):
        raise ValueError(f"{target}, the {name}:// transport, is not a Scheme: {scheme!r}")
    _schemes[name] = scheme
    return scheme


def _scheme(url: str, options: TransportOptions) -> Scheme:
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
    if isinstance(scheme, str):
        scheme = _resolve(name, scheme, url)
    unused = [option for option in options.given() if option not in scheme.options]
    if unused:
        raise ValueError(f"{' and '.join(unused)} does not apply to {name}:// URLs ({url!r})")
    return scheme


def connector_for(
    target: str | Connector,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
) -> Connector:
    """The connector for a URL, with its options; or the connector itself.

    :raises ValueError: the URL is malformed, its scheme is unknown, an option is missing (TLS
        without ``ssl_context``), or one does not apply (to the scheme, or to a connector object,
        which has its own).
    """
    options = TransportOptions(ssl_context=ssl_context, limits=limits)
    if isinstance(target, Connector):
        _no_options_for_an_object(target, options)
        return target
    if not isinstance(target, str):
        raise TypeError(f"expected a URL or a Connector, got {type(target).__name__}")
    return _scheme(target, options).connect(target, options)


async def create_listener(
    target: str | MessageListener,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
) -> MessageListener:
    """A listener bound to a URL, with its options; or the listener itself.

    :raises ValueError: the URL is malformed, its scheme is unknown, or an option is missing or
        does not apply (as `connector_for`).
    :raises TransportError: the address cannot be bound.
    """
    options = TransportOptions(ssl_context=ssl_context, limits=limits)
    if isinstance(target, MessageListener):
        _no_options_for_an_object(target, options)
        return target
    if not isinstance(target, str):
        raise TypeError(f"expected a URL or a MessageListener, got {type(target).__name__}")
    return await _scheme(target, options).listen(target, options)


def _no_options_for_an_object(target: object, options: TransportOptions) -> None:
    if given := options.given():
        raise ValueError(
            f"{' and '.join(given)} applies to URLs; a {type(target).__name__} has its own"
        )
