"""TLS byte streams: what the framing above relies on."""

from __future__ import annotations

import socket
import ssl

import anyio
import pytest
import trustme

from flare_agent_async.transports._socket import SocketByteStream
from flare_agent_async.transports._tls import TLSByteStream

pytestmark = pytest.mark.anyio


async def connected_pair() -> tuple[TLSByteStream, TLSByteStream]:
    """A TLS server stream and client stream over a socket pair, handshake done."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    left, right = socket.socketpair()
    streams: dict[str, TLSByteStream] = {}

    async def wrap(name: str, sock: socket.socket, **options: object) -> None:
        context = server_context if options.get("server_side") else client_context
        streams[name] = await TLSByteStream.wrap(SocketByteStream(sock), context, **options)  # type: ignore[arg-type]

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: wrap("server", left, server_side=True))
            group.start_soon(
                lambda: wrap("client", right, server_side=False, server_hostname="localhost")
            )
    return streams["server"], streams["client"]


async def test_a_read_served_from_bytes_already_decrypted_is_not_reported_as_a_wait() -> None:
    """A large frame arriving faster than it is read must not starve other tasks: the framed
    stream yields every so many bytes unless the byte stream says it waited."""
    server, client = await connected_pair()
    try:
        data = memoryview(bytes(64 * 1024))
        sent = 0
        while sent < len(data):
            sent += await server.send_some([data[sent:]])
        await server.flush()
        buffer = memoryview(bytearray(1024))
        assert await client.receive_into(buffer) == 1024  # decrypts a whole record or more
        reads_without_wait = 0
        for _ in range(8):  # a record holds 16 KiB: these are served from it
            assert await client.receive_into(buffer) == 1024
            reads_without_wait += not client.waited_to_receive
        assert reads_without_wait == 8
    finally:
        await server.aclose()
        await client.aclose()


async def test_an_idle_connection_holds_a_small_read_buffer_and_a_busy_one_a_larger() -> None:
    """Thousands of agents over TLS each hold one read-ahead buffer: small until needed."""
    server, client = await connected_pair()
    try:
        assert len(client._buffer) <= 16 * 1024
        data = memoryview(bytes(4 * 2**20))
        received = 0
        buffer = memoryview(bytearray(2**20))

        async def send() -> None:
            sent = 0
            while sent < len(data):
                sent += await server.send_some([data[sent:]])
            await server.flush()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(send)
                while received < len(data):
                    received += await client.receive_into(buffer)
        assert 16 * 1024 < len(client._buffer) <= 256 * 1024
    finally:
        await server.aclose()
        await client.aclose()
