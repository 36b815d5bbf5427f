"""Messages leave as soon as they can, and messages that become ready together leave together:
fewer system calls and wake-ups per task."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
from conftest import assign

from flare_agent_async import AsyncFlareAgent, FlareSite, TaskResult
from flare_agent_async.protocol import (
    ACK_DELAY,
    FrameReader,
    Heartbeat,
    Message,
    Result,
    TaskAck,
    TaskAssign,
    encode_frame,
)
from flare_agent_async.testing import ScriptedPeer
from flare_agent_async.transports import ByteStream, FramedMessageStream
from flare_agent_async.transports import _framed as framed

pytestmark = pytest.mark.anyio


async def test_small_messages_leave_in_the_turn_that_made_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over a socket, a task leaves from `run_task` itself and a result from `submit_result`,
    without waking the connection's writer; a task's acknowledgement rides with its result."""
    at_once: list[list[type]] = []
    by_writer: list[list[type]] = []
    send_batch, send_batch_nowait = (
        FramedMessageStream.send_batch,
        FramedMessageStream.send_batch_nowait,
    )

    async def recording(self: FramedMessageStream, items: Sequence[Message]) -> None:
        by_writer.append([type(item) for item in items])
        await send_batch(self, items)

    def recording_nowait(self: FramedMessageStream, items: Sequence[Message]) -> bool:
        sent = send_batch_nowait(self, items)
        (at_once if sent else by_writer).append([type(item) for item in items])
        return sent

    monkeypatch.setattr(FramedMessageStream, "send_batch", recording)
    monkeypatch.setattr(FramedMessageStream, "send_batch_nowait", recording_nowait)
    tasks = 20
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group, FlareSite("site-1") as site:
            url = await site.listen("tcp://127.0.0.1:0")

            async def trainer() -> None:
                async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
                    async for task in agent.tasks():
                        await agent.submit_result(TaskResult({}, task.data))

            group.start_soon(trainer)
            await site.wait_for_agent("a1", timeout=10)
            for n in range(tasks):
                await site.run_task("a1", "ping", n)
    # The first task may ride with the welcome, and its result leave with the writer the
    # welcome woke; every later one leaves at once.
    tasks_at_once = [b for b in at_once if TaskAssign in b]
    results_at_once = [b for b in at_once if Result in b]
    assert tasks_at_once == [[TaskAssign]] * len(tasks_at_once) and len(tasks_at_once) >= tasks - 1
    assert results_at_once == [[TaskAck, Result]] * len(results_at_once), results_at_once
    assert len(results_at_once) >= tasks - 1, by_writer


async def test_an_acknowledgement_waits_for_the_result_at_most_ack_delay() -> None:
    """A task nobody takes yet is still acknowledged, ACK_DELAY later: the task's arrival arms
    the idle writer's timer, which would otherwise sleep until the next heartbeat is due."""
    peer = ScriptedPeer(url="tcp://127.0.0.1:0", heartbeat_interval=60, heartbeat_timeout=120)
    with anyio.fail_after(30):
        async with peer, anyio.create_task_group() as g:
            agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
            stream = await peer.start_agent(agent, g)
            sent_at = anyio.current_time()
            await stream.send(assign("t1"))
            ack = await peer.receive_until(stream, TaskAck)
            waited = anyio.current_time() - sent_at
            assert ack.task_id == "t1"
            assert ACK_DELAY * 0.9 <= waited < 10  # a result could ride along; no heartbeat did
            await agent.stop()


class _Wire(ByteStream):
    """Bytes into a list; ``take`` limits what each `try_send` accepts."""

    sends_at_once = True

    def __init__(self, take: list[int | Exception]) -> None:
        self.bytes = bytearray()
        self.take = take
        self.release = anyio.Event()
        self.hold_next_send = False

    def try_send(self, buffers: Sequence[memoryview]) -> int:
        limit = self.take.pop(0) if self.take else 1 << 30
        if isinstance(limit, Exception):
            raise limit
        return self._write(buffers, limit)

    def _write(self, buffers: Sequence[memoryview], limit: int) -> int:
        start = len(self.bytes)
        for part in buffers:
            room = limit - (len(self.bytes) - start)
            self.bytes += part[:room]
            if room <= part.nbytes:
                break
        return len(self.bytes) - start

    async def send_some(self, buffers: Sequence[memoryview]) -> int:
        if self.hold_next_send:
            self.hold_next_send = False
            await self.release.wait()
        return self._write(buffers, 1 << 30)

    async def receive_into(self, buffer: memoryview) -> int:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    def messages(self) -> list[Message]:
        reader, view, out = FrameReader(), memoryview(self.bytes), []
        while view:
            target = reader.buffer_for_read()
            count = min(target.nbytes, view.nbytes)
            target[:count] = view[:count]
            reader.bytes_read(count)
            view = view[count:]
            while (message := reader.next_message()) is not None:
                out.append(message)
        return out


def _beats(n: int) -> list[Message]:
    return [Heartbeat() for _ in range(n)]


async def test_what_could_not_go_at_once_goes_first_with_the_next_send() -> None:
    wire = _Wire(take=[7])
    stream = FramedMessageStream(wire)
    first, second, third = assign("t1"), assign("t2"), assign("t3")
    assert not stream.send_batch_nowait([first])  # 7 bytes of its frame went
    assert not stream.send_batch_nowait([second])  # a frame is half out: kept whole
    await stream.send_batch([third])
    assert [m.task_id for m in wire.messages()] == ["t1", "t2", "t3"]  # type: ignore[attr-defined]
    assert stream.send_batch_nowait([assign("t4")])  # nothing held back now: it goes at once
    assert wire.messages()[-1].task_id == "t4"  # type: ignore[attr-defined]


async def test_nothing_goes_at_once_past_a_send_in_progress_or_a_large_frame() -> None:
    wire = _Wire(take=[])
    stream = FramedMessageStream(wire)
    wire.hold_next_send = True
    async with anyio.create_task_group() as group:
        group.start_soon(stream.send_batch, [assign("t1")])
        await anyio.wait_all_tasks_blocked()
        assert not stream.send_batch_nowait([assign("t2")])  # t1 is on its way
        wire.release.set()
    assert not stream.send_batch_nowait([assign("t3", data=b"x" * (128 * 1024))])
    await stream.send_batch([])  # the writer's flush, with nothing new
    assert [m.task_id for m in wire.messages()] == ["t1", "t2", "t3"]  # type: ignore[attr-defined]


async def test_a_send_that_breaks_at_once_fails_the_writers_next_send() -> None:
    stream = FramedMessageStream(_Wire(take=[anyio.BrokenResourceError("reset")]))
    assert not stream.send_batch_nowait(_beats(1))
    with pytest.raises(anyio.BrokenResourceError):
        await stream.send_batch([])


async def test_a_frame_begun_at_once_and_then_cancelled_breaks_the_stream() -> None:
    """Half a frame is out: a cancelled send of the rest leaves a stream nothing can follow."""
    wire = _Wire(take=[3])
    stream = FramedMessageStream(wire)
    assert not stream.send_batch_nowait(_beats(1))
    wire.hold_next_send = True
    with anyio.move_on_after(0.01):
        await stream.send_batch([])
    with pytest.raises(anyio.BrokenResourceError):
        await stream.send_batch(_beats(1))


async def test_a_frame_kept_for_being_large_is_not_encoded_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded: list[str] = []

    def counting(item: Message) -> list[memoryview]:
        encoded.append(item.task_id)  # type: ignore[union-attr]
        return encode_frame(item)

    monkeypatch.setattr(framed, "encode_frame", counting)
    wire = _Wire(take=[])
    stream = FramedMessageStream(wire)
    assert not stream.send_batch_nowait([assign("big", data=b"x" * (128 * 1024))])
    await stream.send_batch([assign("next")])
    assert encoded == ["big", "next"]
    assert [m.task_id for m in wire.messages()] == ["big", "next"]  # type: ignore[attr-defined]
