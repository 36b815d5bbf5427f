"""The in-memory transport: anyio's stream semantics, listeners and names."""

from __future__ import annotations

import anyio
import pytest

from flare_agent_async import TransportError
from flare_agent_async.protocol import Heartbeat, TaskAck
from flare_agent_async.transports import MemoryListener, connector_for, memory_stream_pair

pytestmark = pytest.mark.anyio


async def test_a_pair_carries_messages_both_ways_in_order() -> None:
    left, right = memory_stream_pair()
    async with left, right:
        for n in range(10):
            await left.send(TaskAck(task_id=str(n)))
        await right.send(Heartbeat())
        assert [await right.receive() for _ in range(10)] == [
            TaskAck(task_id=str(n)) for n in range(10)
        ]
        assert await left.receive() == Heartbeat()


async def test_closing_one_end_is_end_of_stream_and_broken_at_the_other() -> None:
    left, right = memory_stream_pair()
    await left.aclose()
    with pytest.raises(anyio.EndOfStream):
        await right.receive()
    with pytest.raises(anyio.BrokenResourceError):
        await right.send(Heartbeat())
    with pytest.raises(anyio.ClosedResourceError):
        await left.send(Heartbeat())
    await right.aclose()


async def test_a_full_buffer_makes_the_sender_wait() -> None:
    left, right = memory_stream_pair(buffer=1)
    async with left, right:
        await left.send(Heartbeat())
        with anyio.move_on_after(0.01) as scope:
            await left.send(Heartbeat())
        assert scope.cancelled_caught
        assert await right.receive() == Heartbeat()


async def test_connect_reaches_the_named_listener() -> None:
    listener = MemoryListener("memory://named-test")
    assert listener.url == "memory://named-test"
    client = await connector_for("memory://named-test").connect()
    server = await listener.accept()
    async with client, server:
        await client.send(Heartbeat())
        assert await server.receive() == Heartbeat()
    await listener.aclose()


async def test_a_name_is_used_once_and_free_again_after_close() -> None:
    listener = MemoryListener("memory://once-test")
    with pytest.raises(TransportError, match="already in use"):
        MemoryListener("memory://once-test")
    await listener.aclose()
    await MemoryListener("memory://once-test").aclose()


async def test_connecting_where_nothing_listens_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="nothing listens at memory://nowhere-test"):
        await connector_for("memory://nowhere-test").connect()


async def test_closing_a_listener_ends_serve_and_closes_unaccepted_connections() -> None:
    listener = MemoryListener()
    pending = await connector_for(listener.url).connect()
    await listener.aclose()
    with pytest.raises(anyio.EndOfStream):
        await pending.receive()
    await pending.aclose()
    with pytest.raises(TransportError, match="nothing listens"):
        await connector_for(listener.url).connect()


async def test_serve_hands_each_connection_to_the_handler() -> None:
    listener = MemoryListener()
    served: list[object] = []

    async def handler(stream: object) -> None:
        async with stream:  # type: ignore[attr-defined]
            served.append(await stream.receive())  # type: ignore[attr-defined]

    async with anyio.create_task_group() as group:
        group.start_soon(listener.serve, handler)
        for n in range(3):
            async with await connector_for(listener.url).connect() as client:
                await client.send(TaskAck(task_id=str(n)))
        with anyio.fail_after(5):
            while len(served) < 3:
                await anyio.wait_all_tasks_blocked()
        await listener.aclose()
    assert sorted(message.task_id for message in served) == ["0", "1", "2"]  # type: ignore[attr-defined]
