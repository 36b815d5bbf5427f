"""Hostile input against a running site while two agents work: each bad connection gets a clear
error and is closed, the site keeps serving, the agents' tasks end exactly once, and file
descriptors and memory return to where they were."""

from __future__ import annotations

import gc
import logging
import os
import random
import struct
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import pytest
from reliability_helpers import Ledger, echo_trainer, report, wait_until

import flare_agent_async.site
from flare_agent_async import AgentGone, AsyncFlareAgent, FlareSite, UnknownAgent
from flare_agent_async.protocol import (
    PROTOCOL_VERSION,
    Bye,
    Hello,
    Limits,
    Message,
    Reject,
    Result,
    ResultAck,
    Welcome,
)
from flare_agent_async.protocol._codec import FrameReader, encode_frame
from flare_agent_async.transports import MemoryConnector

pytestmark = pytest.mark.anyio

HELLO_TIMEOUT = 0.3
LIMITS = Limits(max_header_bytes=64 * 1024, max_frame_bytes=4 * 2**20, max_buffers=16)


def hello(agent_id: str = "raw", version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(protocol_version=version, agent_id=agent_id, site_name="site-1", instance_id="i")


def frame(message: Message) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(message))


def raw_frame(header: object, *, buffers: int = 0, header_bytes: int | None = None) -> bytes:
    """A frame built by hand: any header, any declared sizes."""
    encoded = msgspec.msgpack.encode(header)
    size = len(encoded) if header_bytes is None else header_bytes
    return struct.pack("<2sBBII", b"FA", 1, 0, size, buffers) + encoded


class Traffic:
    """The working agents' stream of tasks, which can be held still (to measure memory)."""

    def __init__(self) -> None:
        self.go = anyio.Event()
        self.go.set()
        self.busy = 0

    async def hold(self) -> None:
        """Stop new tasks and wait for those running to end."""
        self.go = anyio.Event()
        await wait_until(lambda: self.busy == 0, "the agents' tasks did not end")

    def release(self) -> None:
        self.go.set()


class Raw:
    """A hostile client on a bare socket: sends bytes, reads the site's frames until it closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.replies: list[Message] = []

    async def exchange(
        self, *chunks: bytes, eof: bool = False, timeout: float = 5
    ) -> list[Message]:
        """Send ``chunks`` (ending the sending side if ``eof``), then read until the site closes.

        :raises AssertionError: the site did not close the connection within ``timeout``.
        """
        reader = FrameReader()
        async with await anyio.connect_tcp("127.0.0.1", self.port) as stream:
            try:
                for chunk in chunks:
                    await stream.send(chunk)
                if eof:
                    await stream.send_eof()
            except anyio.BrokenResourceError:
                pass  # the site closed first: fine, it said why in its log
            with anyio.move_on_after(timeout) as timer:
                while True:
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
                    view = memoryview(data)
                    while view:
                        target = reader.buffer_for_read()
                        count = min(len(target), len(view))
                        target[:count] = view[:count]
                        reader.bytes_read(count)
                        view = view[count:]
                        while (message := reader.next_message()) is not None:
                            self.replies.append(message)
                    if self.replies and isinstance(self.replies[-1], Bye):
                        break
            assert not timer.cancelled_caught, "the site kept a hostile connection open"
        return self.replies


async def test_hostile_connections_cost_only_themselves(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flare_agent_async")
    ledger, seen = Ledger(), Counter[str]()
    tried: Counter[str] = Counter()
    stop_working = anyio.Event()
    traffic = Traffic()
    async with FlareSite("site-1", hello_timeout=HELLO_TIMEOUT, limits=LIMITS) as site:
        url = await site.listen("tcp://127.0.0.1:0")
        port = int(url.rsplit(":", 1)[1])

        async def worker(agent_id: str) -> None:
            async with (
                AsyncFlareAgent(url, agent_id=agent_id, site_name="site-1") as agent,
                anyio.create_task_group() as group,
            ):
                group.start_soon(echo_trainer, agent, seen)
                index = 0
                while not stop_working.is_set():
                    await traffic.go.wait()
                    traffic.busy += 1
                    await ledger.run(site, agent_id, f"{agent_id}-{index}", {"i": index})
                    traffic.busy -= 1
                    index += 1
                group.cancel_scope.cancel()

        async def attempt(name: str, expect: str, *chunks: bytes, eof: bool = False) -> None:
            """One hostile connection; ``expect`` must appear in the site's log for it."""
            before = len(caplog.records)
            replies = await Raw(port).exchange(*chunks, eof=eof)
            tried[name] += 1
            said = [r.getMessage() for r in caplog.records[before:]]
            said += [getattr(reply, "reason", "") for reply in replies]
            assert any(expect in line for line in said), f"{name}: no {expect!r} in {said}"

        with anyio.fail_after(120):
            async with anyio.create_task_group() as work:
                work.start_soon(worker, "w1")
                work.start_soon(worker, "w2")
                await site.wait_for_agent("w1", timeout=10)
                await site.wait_for_agent("w2", timeout=10)
                gc.collect()
                fds = len(os.listdir("/proc/self/fd"))

                await run_hostile_inputs(attempt, port, ledger, traffic)

                stop_working.set()
            # the site still serves: a new agent gets a task done
            late = AsyncFlareAgent(url, agent_id="late", site_name="site-1")
            async with late, anyio.create_task_group() as group:
                group.start_soon(echo_trainer, late, seen)
                await ledger.run(site, "late", "late-0", {"ok": True})
                group.cancel_scope.cancel()
            await wait_until(
                lambda: len(os.listdir("/proc/self/fd")) <= fds, "file descriptors leaked"
            )
    ledger.check({(key.rsplit("-", 1)[0], key): count for key, count in seen.items()})
    report(
        "hostile input",
        inputs_tried=sum(tried.values()),
        kinds=len(tried),
        tasks_completed_meanwhile=len(ledger.sent),
        results_lost=ledger.lost,
        results_duplicated=ledger.duplicated,
    )


async def run_hostile_inputs(
    attempt: Callable[..., Awaitable[None]], port: int, ledger: Ledger, traffic: Traffic
) -> None:
    rng = random.Random(8)
    for _ in range(20):
        noise = rng.randbytes(rng.randrange(1, 4096))
        await attempt("random bytes", "not a flare_agent_async peer", b"XX" + noise)
    whole = frame(hello("truncated"))
    for cut in (3, len(whole) // 2, len(whole) - 1):
        await attempt("truncated frame", "middle of a frame", whole[:cut], eof=True)
    await attempt(
        "oversized header", "exceeds the limit of 65536", raw_frame([], header_bytes=2**30)
    )
    await attempt("too many buffers", "exceeds the limit of 16", raw_frame([], buffers=10**6))
    body = [[8 * 2**20], {"kind": "hello"}]
    await attempt("oversized frame", "exceeds the limit of 4194304", raw_frame(body, buffers=1))
    await attempt("wrong version", "protocol version 99", frame(hello(version=99)))
    await attempt("unknown kind", "malformed nope", raw_frame([[], {"kind": "nope"}]))
    await attempt("malformed header", "malformed frame header", raw_frame("just a string"))
    result = Result(task_id="t", return_code="OK", meta={})
    await attempt("result before hello", "expected a hello, got Result", frame(result))
    # a second hello after a rejection finds the connection closed: one attempt per connection
    raw = Raw(port)
    await raw.exchange(frame(hello(version=99)), frame(hello()), frame(hello()))
    assert [type(reply) for reply in raw.replies] == [Reject]
    await attempt("hello after a rejection", "protocol version 99", frame(hello(version=99)))
    # a duplicate hello once welcomed is a protocol error: goodbye, closed
    await attempt("duplicate hello", "unexpected Hello", frame(hello("dup")), frame(hello("dup")))
    # a result for another agent's task: refused, logged, and that task goes on
    running = next(iter(ledger.sent))[1]
    intruder = Raw(port)
    await intruder.exchange(
        frame(hello("intruder")),
        frame(Result(task_id=running, return_code="OK", meta={})),
        frame(Bye(reason="done")),
    )
    acks = [reply for reply in intruder.replies if isinstance(reply, ResultAck)]
    assert [(ack.accepted, "not assigned to agent 'intruder'" in ack.reason) for ack in acks] == [
        (False, True)
    ]
    await attempt(
        "result for another agent's task",
        "refused a result from agent intruder",
        frame(hello("intruder2")),
        frame(Result(task_id=running, return_code="OK", meta={})),
        frame(Bye()),
    )
    await slowloris(port)
    await traffic.hold()
    await connection_storm(port)
    traffic.release()
    # and garbage after a proper welcome: the site says goodbye, the session ends, it goes on
    after = Raw(port)
    await after.exchange(frame(hello("g")), b"??" + bytes(10))
    assert [type(reply) for reply in after.replies] == [Welcome, Bye]
    assert "not a flare_agent_async peer" in after.replies[-1].reason  # type: ignore[union-attr]


async def slowloris(port: int, count: int = 50) -> None:
    """Connections that start a hello and never finish it are closed after the hello timeout."""
    start = anyio.current_time()
    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(Raw(port).exchange, frame(hello("slow"))[:5])
    took = anyio.current_time() - start
    assert HELLO_TIMEOUT <= took < HELLO_TIMEOUT + 5, took


async def connection_storm(port: int, count: int = 2000, at_once: int = 100) -> None:
    """Thousands of connections opened and dropped: memory returns to where it was."""
    logging.getLogger("flare_agent_async").setLevel(logging.WARNING)  # keep no record per drop
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]

        async def open_and_drop() -> None:
            stream = await anyio.connect_tcp("127.0.0.1", port)
            await stream.aclose()

        for _ in range(count // at_once):
            async with anyio.create_task_group() as group:
                for _ in range(at_once):
                    group.start_soon(open_and_drop)
        await wait_until(
            lambda: len(os.listdir("/proc/self/fd")) <= fds, "the site kept dropped connections"
        )
        await anyio.wait_all_tasks_blocked()  # the tasks that closed them have ended too
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert grown < 2**20, f"{grown} bytes still held after {count} dropped connections"


async def test_agents_that_come_and_go_leave_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hellos under made-up ids, each followed by a goodbye: the site remembers the last of them
    (a task for one says why it is gone) and forgets the rest, so memory stays flat."""
    monkeypatch.setattr(flare_agent_async.site, "_GONE_SESSIONS_KEPT", 50)  # 1024 otherwise
    count = 500

    async def come_and_go(agent_id: str) -> None:
        stream = await MemoryConnector(url).connect()
        await stream.send(hello(agent_id))
        await stream.send(Bye(reason="passing by"))
        with anyio.fail_after(5):
            async for _ in stream:  # until the site closes the connection
                pass
        await stream.aclose()

    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        await come_and_go("warm-up")  # whatever is imported or cached on first use
        await anyio.wait_all_tasks_blocked()  # (on trio, this imports trio.testing)
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for index in range(count):
                await come_and_go(f"ghost{index}")
            await anyio.wait_all_tasks_blocked()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        with pytest.raises(AgentGone, match="said goodbye: passing by"):
            await site.run_task(f"ghost{count - 1}", "train", 1)
        with pytest.raises(UnknownAgent):
            await site.run_task("ghost0", "train", 1)
    assert grown < count * 512, f"{grown / count:.0f} bytes kept per agent that left"
    report("agents that come and go", agents=count, bytes_kept_per_agent=round(grown / count))
