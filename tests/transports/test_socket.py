"""The socket byte stream's system calls: one read per arrival of bytes, and on asyncio one
registration with the event loop for many messages."""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
import trustme
from anyio.abc import TaskGroup

from flare_agent_async.exceptions import TransportError
from flare_agent_async.transports._socket import SocketByteStream
from flare_agent_async.transports._tls import TLSByteStream

pytestmark = pytest.mark.anyio


class _CountingSocket(socket.socket):
    reads = 0

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[override]
        if not flags & socket.MSG_PEEK:  # a look without taking is no read
            self.reads += 1
        return super().recv_into(buffer, nbytes, flags)


@pytest.fixture
def pair() -> Iterator[tuple[_CountingSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    counting = _CountingSocket(fileno=ours.detach())
    yield counting, peer
    counting.close()
    peer.close()


def _once_all_wait(group: TaskGroup, action: Callable[[], object]) -> None:
    """Call ``action`` (and await what it returns, if anything) once every task waits."""

    async def run() -> None:
        await anyio.wait_all_tasks_blocked()
        result = action()
        if inspect.isawaitable(result):
            await result

    group.start_soon(run)


Drained = tuple[_CountingSocket, socket.socket, SocketByteStream]


@pytest.fixture
async def drained(
    pair: tuple[_CountingSocket, socket.socket], anyio_backend: str
) -> AsyncIterator[Drained]:
    """The socket, its peer, and a stream over it whose last read took all there was (100
    bytes into room for 4,096); closed afterwards."""
    sock, peer = pair
    stream = SocketByteStream(sock)
    peer.sendall(b"x" * 100)
    assert await stream.receive_into(memoryview(bytearray(4096))) == 100
    assert sock.reads == 1
    yield sock, peer, stream
    await stream.aclose()


async def test_a_read_that_emptied_the_socket_is_followed_by_a_wait_not_a_read(
    drained: Drained,
) -> None:
    sock, peer, stream = drained
    async with anyio.create_task_group() as group:
        _once_all_wait(group, lambda: peer.sendall(b"y" * 50))
        assert await stream.receive_into(memoryview(bytearray(4096))) == 50
    assert sock.reads == 2, "a read that could only fail was made before waiting"
    assert stream.waited_to_receive


async def test_bytes_that_came_while_nobody_read_are_still_read(
    drained: Drained,
) -> None:
    _sock, peer, stream = drained
    buffer = memoryview(bytearray(4096))
    peer.sendall(b"y" * 50)
    peer.shutdown(socket.SHUT_WR)
    assert await stream.receive_into(buffer) == 50
    assert bytes(buffer[:50]) == b"y" * 50
    assert await stream.receive_into(buffer) == 0  # the end, after waiting once more
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive_into(buffer)


async def test_after_a_bulk_read_the_next_receive_reads_before_waiting(
    pair: tuple[_CountingSocket, socket.socket],
) -> None:
    """In a large transfer a short read says little: more is likely there by the next call."""
    sock, peer = pair
    stream = SocketByteStream(sock)
    buffer = memoryview(bytearray(1 << 20))
    peer.sendall(b"x" * (100 * 1024))
    first = await stream.receive_into(buffer)
    assert 64 * 1024 <= first <= 100 * 1024
    peer.sendall(b"y" * 10)
    await stream.receive_into(buffer)
    assert sock.reads == 2 and not stream.waited_to_receive
    await stream.aclose()


async def _ping_pong(stream: SocketByteStream, peer: socket.socket, count: int) -> None:
    """``count`` small messages from ``peer``, each sent once the stream waits for it."""
    buffer = memoryview(bytearray(4096))
    for n in range(count):
        async with anyio.create_task_group() as group:
            _once_all_wait(group, lambda n=n: peer.sendall(b"%d" % n))
            received = await stream.receive_into(buffer)
        assert bytes(buffer[:received]) == b"%d" % n
        assert stream.waited_to_receive


class _Registrations:
    """Counts the asyncio loop's ``add_reader`` calls and the callbacks they register."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = asyncio.get_running_loop()
        self.added = 0
        self.called = 0
        add_reader = loop.add_reader

        def counting(fd: int, callback: Callable[[], Any]) -> None:
            self.added += 1

            def counted() -> None:
                self.called += 1
                callback()

            add_reader(fd, counted)

        monkeypatch.setattr(loop, "add_reader", counting)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_asyncio_the_socket_stays_registered_from_one_message_to_the_next(
    drained: Drained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """anyio's wait_readable registers and removes the socket at every wait."""
    _sock, peer, stream = drained
    registrations = _Registrations(monkeypatch)  # the stream registers at its first wait
    await _ping_pong(stream, peer, 50)
    assert registrations.added == 1
    # asyncio's selector loop reports the bytes once more before the woken task reads them
    assert registrations.called <= 2 * 50


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_asyncio_readiness_with_nobody_waiting_lets_the_socket_go(
    drained: Drained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness is level-triggered: a socket left registered while nobody reads would call
    back at every turn of the loop."""
    _sock, peer, stream = drained
    registrations = _Registrations(monkeypatch)  # the stream registers at its first wait
    await _ping_pong(stream, peer, 1)
    peer.sendall(b"unread")
    called = registrations.called
    for _ in range(20):  # turns of the loop with bytes waiting and nobody reading
        await anyio.lowlevel.checkpoint()
    assert registrations.called - called <= 2, "the loop kept calling back with nobody waiting"
    buffer = memoryview(bytearray(4096))
    assert await stream.receive_into(buffer) == len(b"unread")
    assert not stream.waited_to_receive, "readiness already seen was waited for again"
    await _ping_pong(stream, peer, 3)
    assert registrations.added == 2


async def test_closing_the_stream_wakes_a_waiting_receive(
    drained: Drained,
) -> None:
    _sock, _peer, stream = drained
    with anyio.fail_after(10):  # not woken, it would wait for ever
        async with anyio.create_task_group() as group:
            _once_all_wait(group, stream.aclose)
            with pytest.raises(anyio.ClosedResourceError):
                await stream.receive_into(memoryview(bytearray(4096)))


async def test_a_cancelled_receive_loses_no_bytes_and_the_next_one_waits_again(
    drained: Drained,
) -> None:
    _sock, peer, stream = drained
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            _once_all_wait(group, scope.cancel)
            await stream.receive_into(memoryview(bytearray(4096)))
    assert scope.cancelled_caught
    await _ping_pong(stream, peer, 3)


async def test_two_tasks_cannot_wait_to_read_one_socket(
    drained: Drained,
) -> None:
    _sock, peer, stream = drained
    buffer = memoryview(bytearray(4096))
    async with anyio.create_task_group() as group:
        group.start_soon(stream.receive_into, buffer)
        await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(10), pytest.raises(anyio.BusyResourceError):
            await stream.receive_into(buffer)  # without the check, it would wait for ever
        peer.sendall(b"x")  # for the first


async def test_a_failed_tls_handshake_closes_the_socket_stream(
    pair: tuple[_CountingSocket, socket.socket],
) -> None:
    """The stream under TLS is closed on failure, which on asyncio also removes the socket from
    the loop before anyone closes it: a closed descriptor left registered would break the
    next socket that gets its number."""
    sock, peer = pair
    inner = SocketByteStream(sock)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(context)

    async with anyio.create_task_group() as group:
        _once_all_wait(group, lambda: peer.sendall(b"this is no TLS record" * 10))
        with pytest.raises(TransportError, match="handshake failed"):
            await TLSByteStream.wrap(inner, context, server_side=True)
    assert sock.fileno() == -1
    with pytest.raises(anyio.ClosedResourceError):
        await inner.receive_into(memoryview(bytearray(16)))


def test_on_uvloop_messages_arrive_and_a_close_wakes_the_reader() -> None:
    """The benchmarks' fastest loop: the same registration, on libuv's poll handles."""
    pytest.importorskip("uvloop")

    async def main() -> None:
        ours, peer = socket.socketpair()
        with peer:
            stream = SocketByteStream(ours)
            await _ping_pong(stream, peer, 20)
            peer.sendall(b"unread")
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            assert await stream.receive_into(memoryview(bytearray(64))) == len(b"unread")
            await _ping_pong(stream, peer, 3)
            async with anyio.create_task_group() as group:
                _once_all_wait(group, stream.aclose)
                with pytest.raises(anyio.ClosedResourceError):
                    await stream.receive_into(memoryview(bytearray(64)))

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
