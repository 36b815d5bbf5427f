"""TCP and Unix-socket transports: ``tcp://host:port`` and ``unix:///path``.

Both use the raw non-blocking socket with the event loop's readiness waits instead of the loop's
stream transports: receiving reads straight into the destination arrays (``recv_into``), sending
writes the arrays' own memory (``sendmsg``), and nothing is buffered in between. Payloads are
never copied on the way.

On asyncio (and uvloop) a socket stays registered for reading from one wait to the next
(`_Readiness`); elsewhere (trio) the waits are anyio's.
"""

from __future__ import annotations

import asyncio
import asyncio.proactor_events
import asyncio.selector_events
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup

from ..exceptions import TransportError
from ..protocol import Limits
from ._base import Connector, MessageListener, MessageStream
from ._framed import ByteStream, FramedMessageStream

__all__ = [
    "SocketByteStream",
    "SocketListener",
    "TCPConnector",
    "UnixConnector",
    "listen_tcp",
    "listen_unix",
]

logger = logging.getLogger("flare_agent_async.transports")

_MAX_IOV = 1024  # sendmsg takes at most IOV_MAX buffers
_BULK_READ_BYTES = 64 * 1024
_DRAIN_READS_AT_CLOSE = 256  # up to 16 MiB of unread bytes dropped when closing
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

Wrap = Callable[[socket.socket], Awaitable[ByteStream]]


class _Readiness:
    """Read readiness of one socket on an asyncio event loop, registered once.

    `anyio.wait_readable` adds the socket to the loop and removes it at every wait: two
    ``epoll_ctl`` calls per message, and on uvloop a poll handle made and freed each time. This
    keeps the socket registered from one wait to the next while messages keep coming. Readiness
    is level-triggered: when it comes with nobody waiting, the socket is removed (else the loop
    would call back at every turn) and the next wait returns at once, without waiting.
    """

    __slots__ = ("_fd", "_loop", "_peek", "_ready", "_registered", "_sock", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        # asyncio's own loop polls again before a woken task runs, and reports once more the
        # bytes it is about to read: there, look at the socket before waking anyone.
        selector_loop = isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
        self._peek = bytearray(1) if selector_loop else None
        self._waiter: asyncio.Future[bool] | None = None
        self._registered = False
        self._ready = False  # readiness came while nobody waited

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is not None and waiter.done():
            return  # woken already
        if self._peek is not None:
            try:
                self._sock.recv_into(self._peek, 1, socket.MSG_PEEK)
            except BlockingIOError:
                return  # a report of bytes read since
            except OSError:
                pass  # the next read raises it
        if waiter is None:
            self._unregister()
            self._ready = True
        else:
            waiter.set_result(True)

    async def wait(self) -> bool:
        """Wait until the socket is readable; False if it was already known to be (no wait).

        :raises anyio.BusyResourceError: another task waits to read.
        :raises anyio.ClosedResourceError: `close` was called while waiting.
        """
        if self._waiter is not None:
            raise anyio.BusyResourceError("reading from")
        if self._ready:
            self._ready = False
            return False
        if not self._registered:
            self._loop.add_reader(self._fd, self._on_readable)
            self._registered = True
        self._waiter = waiter = self._loop.create_future()
        try:
            is_open = await waiter
        finally:
            self._waiter = None  # a cancelled wait stays registered until readiness comes
        if not is_open:
            raise anyio.ClosedResourceError
        return True

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        """Unregister (before the socket closes) and wake a waiting task with
        `anyio.ClosedResourceError`."""
        self._unregister()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(False)


def _readiness(sock: socket.socket) -> _Readiness | None:
    """The socket's `_Readiness` on a running asyncio loop that watches sockets; None elsewhere
    (trio, no loop running)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        return None
    if isinstance(loop, asyncio.proactor_events.BaseProactorEventLoop):
        return None  # Windows' proactor has no readers: anyio waits through a selector thread
    return _Readiness(loop, sock)


class SocketByteStream(ByteStream):
    """A `ByteStream` over a connected non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False
        self._drained = False  # whether the last read took all there was
        self._readiness = _readiness(sock)

    async def _wait_readable(self) -> bool:
        """Wait until the socket is readable; False if it is known to be (nothing waited)."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._readiness is not None:
            return await self._readiness.wait()
        await anyio.wait_readable(self._sock)
        return True

    async def receive_into(self, buffer: memoryview) -> int:
        self.waited_to_receive = False
        wait = self._drained  # the last read emptied the socket: a read now would find nothing
        while True:
            if wait and await self._wait_readable():
                self.waited_to_receive = True
            try:
                count = self._sock.recv_into(buffer)
            except BlockingIOError:
                wait = True  # outside the handler: a waiting task keeps no exception alive
                continue
            except OSError as exc:
                raise self._broken(exc) from exc
            # A short read of a few bytes emptied the socket (a small message came); in a bulk
            # transfer more is likely there by the next call: read again before waiting.
            self._drained = 0 < count < min(buffer.nbytes, _BULK_READ_BYTES)
            return count

    async def send_some(self, buffers: Sequence[memoryview]) -> int:
        self.waited_to_send = False
        while not (sent := self.try_send(buffers)):
            if self._closed:
                raise anyio.ClosedResourceError
            await anyio.wait_writable(self._sock)
            self.waited_to_send = True
        return sent

    sends_at_once = True

    def try_send(self, buffers: Sequence[memoryview]) -> int:
        if self._closed:
            return 0  # send_some's wait raises ClosedResourceError
        try:
            return self._sock.sendmsg(buffers[:_MAX_IOV])
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise self._broken(exc) from exc

    def _broken(self, exc: OSError) -> Exception:
        if self._closed:
            return anyio.ClosedResourceError()
        return anyio.BrokenResourceError(f"the connection broke: {exc}")

    async def aclose(self) -> None:
        """Close: say we are done sending, read (and drop) what the peer sent that is still
        unread, then close. Closing with unread bytes would reset the connection, and the peer
        could lose the last messages sent to it."""
        if self._closed:
            return
        self._closed = True
        sock = self._sock
        try:
            sock.shutdown(socket.SHUT_WR)
            scratch = bytearray(64 * 1024)
            for _ in range(_DRAIN_READS_AT_CLOSE):
                if not sock.recv_into(scratch):
                    break
        except OSError:  # BlockingIOError included: nothing more to read now
            pass
        if self._readiness is not None:
            self._readiness.close()
        anyio.notify_closing(sock)
        sock.close()
        await anyio.lowlevel.checkpoint()


async def _plain(sock: socket.socket) -> ByteStream:
    return SocketByteStream(sock)


class _SocketConnector(Connector):
    def __init__(self, url: str, *, limits: Limits | None = None) -> None:
        self.url = url
        self._limits = limits
        self._wrap: Wrap = _plain

    async def _open(self) -> socket.socket:
        raise NotImplementedError

    async def connect(self) -> MessageStream:
        sock = await self._open()
        try:
            byte_stream = await self._wrap(sock)
        except BaseException:
            sock.close()
            raise
        return FramedMessageStream(byte_stream, limits=self._limits)


async def _connect_socket(sock: socket.socket, address: Any) -> None:
    sock.setblocking(False)
    try:
        sock.connect(address)
    except BlockingIOError:
        await anyio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error)) from None


def _host_port(url: str, default_host: str | None = None) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}: {exc}") from None
    host = parts.hostname or default_host
    if host is None or port is None:
        raise ValueError(f"{url!r} needs a host and a port: {parts.scheme}://host:port")
    return host, port


class TCPConnector(_SocketConnector):
    """Connects to ``tcp://host:port`` (TCP_NODELAY on)."""

    def __init__(self, url: str, *, limits: Limits | None = None) -> None:
        super().__init__(url, limits=limits)
        self._host, self._port = _host_port(url)

    async def _open(self) -> socket.socket:
        try:
            addresses = await anyio.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {self._host!r} in {self.url}: {exc}") from exc
        error: OSError | None = None
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            try:
                await _connect_socket(sock, address)
            except BaseException as exc:
                sock.close()
                if not isinstance(exc, OSError):
                    raise
                error = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise TransportError(f"cannot connect to {self.url}: {error}") from error


class UnixConnector(_SocketConnector):
    """Connects to ``unix:///path/to/socket``."""

    def __init__(self, url: str, *, limits: Limits | None = None) -> None:
        super().__init__(url, limits=limits)
        self._path = _unix_path(url)

    async def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await _connect_socket(sock, self._path)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise TransportError(f"cannot connect to {self.url}: {exc}") from exc
            raise
        return sock


def _unix_path(url: str) -> str:
    path = url[len("unix://") :]
    if not path:
        raise ValueError(f"{url!r} needs a path: unix:///path/to/socket")
    return path


class SocketListener(MessageListener):
    """Accepts connections on a listening socket; each is wrapped (TLS, say) in its own task."""

    def __init__(
        self,
        sock: socket.socket,
        url: str,
        *,
        limits: Limits | None = None,
        wrap: Wrap = _plain,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._url = url
        self._limits = limits
        self._wrap = wrap
        self._on_close = on_close
        self._closed = False

    @property
    def url(self) -> str:
        return self._url

    async def serve(
        self, handler: Callable[[MessageStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        async with anyio.create_task_group() as own_group:
            group = task_group or own_group
            while True:
                try:
                    client, _ = self._sock.accept()
                except BlockingIOError:
                    try:
                        await anyio.wait_readable(self._sock)
                    except anyio.ClosedResourceError:
                        return
                    continue
                except OSError as exc:
                    if self._closed:
                        return
                    if exc.errno in _ACCEPT_RETRY_ERRNOS:
                        # Out of descriptors or memory: back off instead of spinning.
                        logger.error("accept failed at %s: %s; retrying in 0.1 s", self._url, exc)
                        await anyio.sleep(0.1)
                    continue
                if client.family in (socket.AF_INET, socket.AF_INET6):
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                group.start_soon(self._handle, client, handler)

    async def _handle(self, client: socket.socket, handler: Callable[[MessageStream], Any]) -> None:
        try:
            byte_stream = await self._wrap(client)
        except Exception as exc:
            client.close()
            logger.warning("dropped a connection to %s: %s", self._url, exc)
            return
        except BaseException:
            client.close()
            raise
        await handler(FramedMessageStream(byte_stream, limits=self._limits))

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
            self._on_close()
        await anyio.lowlevel.checkpoint()


def _format_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def listen_tcp(
    url: str, *, limits: Limits | None = None, wrap: Wrap = _plain, scheme: str = "tcp"
) -> MessageListener:
    """Listen at ``tcp://host:port`` (port 0 picks a free port; the URL returned has it)."""
    host, port = _host_port(url)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        raise TransportError(f"cannot listen at {url}: {exc}") from exc
    bound_host, bound_port = sock.getsockname()[:2]
    return SocketListener(
        sock, _format_url(scheme, bound_host, bound_port), limits=limits, wrap=wrap
    )


def _remove_stale_socket(url: str, path: str) -> None:
    if not (os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode)):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover
    except OSError:
        pass
    else:
        raise TransportError(f"cannot listen at {url}: another process listens there")
    finally:
        probe.close()


async def listen_unix(url: str, *, limits: Limits | None = None) -> MessageListener:
    """Listen at ``unix:///path``; a stale socket file left by a dead site is replaced."""
    path = _unix_path(url)
    await anyio.to_thread.run_sync(_remove_stale_socket, url, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen at {url}: {exc}") from exc

    def unlink() -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    return SocketListener(sock, f"unix://{path}", limits=limits, on_close=unlink)
