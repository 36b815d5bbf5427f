"""The socket byte stream's system calls: one read per arrival of bytes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import pytest

from flare_agent_async.transports._socket import SocketByteStream

pytestmark = pytest.mark.anyio


class _CountingSocket(socket.socket):
    reads = 0

    def recv_into(self, *args: object) -> int:  # type: ignore[override]
        self.reads += 1
        return super().recv_into(*args)  # type: ignore[arg-type]


@pytest.fixture
def pair() -> Iterator[tuple[_CountingSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    counting = _CountingSocket(fileno=ours.detach())
    yield counting, peer
    counting.close()
    peer.close()


async def _drained(sock: _CountingSocket, peer: socket.socket) -> SocketByteStream:
    """A stream whose last read took all there was (100 bytes into room for 4,096)."""
    stream = SocketByteStream(sock)
    peer.sendall(b"x" * 100)
    assert await stream.receive_into(memoryview(bytearray(4096))) == 100
    assert sock.reads == 1
    return stream


async def test_a_read_that_emptied_the_socket_is_followed_by_a_wait_not_a_read(
    pair: tuple[_CountingSocket, socket.socket],
) -> None:
    sock, peer = pair
    stream = await _drained(sock, peer)

    async def send_later() -> None:
        await anyio.wait_all_tasks_blocked()
        peer.sendall(b"y" * 50)

    async with anyio.create_task_group() as group:
        group.start_soon(send_later)
        assert await stream.receive_into(memoryview(bytearray(4096))) == 50
    assert sock.reads == 2, "a read that could only fail was made before waiting"
    assert stream.waited_to_receive


async def test_bytes_that_came_while_nobody_read_are_still_read(
    pair: tuple[_CountingSocket, socket.socket],
) -> None:
    sock, peer = pair
    stream = await _drained(sock, peer)
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
