"""Faults in flight: every task ends with exactly one intact result, each trainer sees it once.

The faults come from `flare_agent_async.testing.FaultyConnector`, which users can wrap around their
own agents' connections too.
"""

from __future__ import annotations

import tracemalloc
from collections import Counter
from collections.abc import Callable
from contextlib import aclosing

import anyio
import numpy as np
import pytest
from reliability_helpers import Ledger, big_payload, checksum, echo_trainer, report

from flare_agent_async import AsyncFlareAgent, FlareSite, TaskAborted, TaskResult
from flare_agent_async.protocol import (
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    Message,
    Result,
    TaskAssign,
)
from flare_agent_async.testing import FaultyConnector
from flare_agent_async.transports import MemoryConnector

pytestmark = pytest.mark.anyio

MiB = 2**20


def is_result(message: Message) -> bool:
    return isinstance(message, Result)


def is_task(message: Message) -> bool:
    return isinstance(message, TaskAssign)


FAULTS: dict[str, Callable[[FaultyConnector], None]] = {
    "drop_before_result": lambda f: f.drop_before(is_result),
    "drop_after_result": lambda f: f.drop_after(is_result),
    "duplicate_result": lambda f: f.duplicate(is_result),
    "truncate_result": lambda f: f.truncate(is_result),
    "drop_task_on_receive": lambda f: f.drop_on_receive(is_task),
    "duplicate_task_on_receive": lambda f: f.duplicate_on_receive(is_task),
    "drop_after_bytes_of_task": lambda f: f.drop_after_bytes(100_000, "receive"),
    "drop_after_bytes_of_result": lambda f: f.drop_after_bytes(100_000, "send"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_every_kind_of_fault_is_survived_exactly_once(fault: str) -> None:
    ledger, seen = Ledger(), Counter[str]()
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(await site.listen("tcp://127.0.0.1:0"))
        FAULTS[fault](faulty)
        async with (
            AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent,
            anyio.create_task_group() as group,
        ):
            group.start_soon(echo_trainer, agent, seen)
            with anyio.fail_after(20):
                for index in range(3):
                    data = {"w": np.full(50_000, index, dtype=np.float32)}  # 200 kB
                    await ledger.run(site, "a1", f"t{index}", data)
            group.cancel_scope.cancel()
    assert sum(faulty.faults.values()) == 1, f"the fault was not injected: {faulty.faults}"
    ledger.check({("a1", task_id): count for task_id, count in seen.items()})


@pytest.mark.parametrize("direction", ["receive", "send"])
async def test_a_64_mib_payload_survives_a_connection_dropped_halfway(direction: str) -> None:
    """``receive``: dropped while the task is on its way to the agent; ``send``: while its
    result is on its way back."""
    data = big_payload(64)
    ledger, seen = Ledger(), Counter[str]()
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(await site.listen("tcp://127.0.0.1:0"))
        faulty.drop_after_bytes(32 * MiB, direction)
        async with (
            AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent,
            anyio.create_task_group() as group,
        ):
            group.start_soon(echo_trainer, agent, seen)
            with anyio.fail_after(60):
                await ledger.run(site, "a1", "t1", data)
            group.cancel_scope.cancel()
    assert faulty.faults == {f"drop_after_bytes_{direction}": 1}
    assert faulty.connections == 2
    ledger.check({("a1", task_id): count for task_id, count in seen.items()})


async def test_abort_racing_with_the_result_has_one_outcome_on_both_sides() -> None:
    """The site aborts at every moment around a submission: either the result is kept (run_task
    returns it, submit_result is True) or the abort wins (TaskAborted, False), never both."""
    outcomes: Counter[str] = Counter()
    kept: list[bool] = []

    async def run(site: FlareSite, task_id: str) -> None:
        try:
            await site.run_task("a1", "train", 1, task_id=task_id)
            kept.append(True)
        except TaskAborted:
            kept.append(False)

    async def abort_later(site: FlareSite, steps: int, task_id: str) -> None:
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        await site.abort_task("a1", task_id)

    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
            for delay in range(12):  # scheduling steps between the submission and the abort
                task_id = f"t{delay}"
                kept.clear()
                async with anyio.create_task_group() as group:
                    group.start_soon(run, site, task_id)
                    task = await agent.get_task(timeout=5)
                    assert task is not None and task.task_id == task_id
                    group.start_soon(abort_later, site, delay, task_id)
                    submitted = await agent.submit_result(TaskResult({}, 2))
                assert kept == [submitted], f"step {delay}: site kept {kept}, agent {submitted}"
                outcomes["kept" if submitted else "aborted"] += 1
            # an abort before the fetch, and of a task nobody knows
            async with anyio.create_task_group() as group:
                group.start_soon(run, site, "early")
                await anyio.wait_all_tasks_blocked()
                assert await site.abort_task("a1", "early")
                await anyio.wait_all_tasks_blocked()  # the abort reached the agent
            assert kept[-1] is False
            assert await agent.get_task(timeout=0.05) is None
            assert not await site.abort_task("a1", "no-such-task")
    assert outcomes["kept"] and outcomes["aborted"], f"the race was not exercised: {outcomes}"


async def test_a_peer_that_sends_without_reading_is_held_back() -> None:
    """Every heartbeat asks for a reply; a peer that never reads cannot make the site queue
    replies without end: the site stops reading it, so its own sends block."""
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        stream = await MemoryConnector(url).connect()
        await stream.send(
            Hello(
                protocol_version=PROTOCOL_VERSION,
                agent_id="flood",
                site_name="site-1",
                instance_id="i",
            )
        )
        await site.wait_for_agent("flood", timeout=5)
        sent = 0
        send_stream = stream.send_stream  # type: ignore[attr-defined]
        with anyio.fail_after(10):
            while sent < 20_000:
                try:
                    send_stream.send_nowait(Heartbeat())
                    sent += 1
                except anyio.WouldBlock:
                    await anyio.wait_all_tasks_blocked()
                    try:
                        send_stream.send_nowait(Heartbeat())
                        sent += 1
                    except anyio.WouldBlock:
                        break  # everyone else is blocked, and the site no longer reads
        await stream.aclose()
    assert sent < 1_000, f"the site read {sent} heartbeats from a peer that never reads"
    report("sender that never reads", heartbeats_accepted_before_blocked=sent)


async def test_a_slow_consumer_does_not_slow_the_others_and_memory_stays_bounded() -> None:
    """One agent stops reading in the middle of a 16 MiB task while four others each run 50
    small tasks at full speed; then it reads the rest at about 12 MiB/s. The site holds no copy
    of the payload and queues nothing for the stalled agent."""
    payload = big_payload(16)
    ledger, seen = Ledger(), Counter[tuple[str, str]]()
    slow_done = anyio.Event()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        async with FlareSite("site-1") as site:
            url = await site.listen("tcp://127.0.0.1:0")
            slow = FaultyConnector(url)

            async def serve(agent_id: str, connector: FaultyConnector | str) -> None:
                agent = AsyncFlareAgent(connector, agent_id=agent_id, site_name="site-1")
                async with agent, aclosing(agent.tasks()) as tasks:
                    async for task in tasks:
                        seen[agent_id, task.task_id] += 1
                        reply = {"checksum": checksum(task.data)}
                        small = task.data if agent_id != "slow" else {"n": 1}
                        await agent.submit_result(TaskResult(reply, small))

            async def run_slow() -> None:
                result = await site.run_task("slow", "train", payload, task_id="big")
                assert result.meta["checksum"] == checksum(payload)
                slow_done.set()

            async def run_fast(agent_id: str) -> None:
                for index in range(50):
                    await ledger.run(site, agent_id, f"t{index}", {"i": index})

            with anyio.fail_after(60):
                async with anyio.create_task_group() as agents:
                    agents.start_soon(serve, "slow", slow)
                    for index in range(4):
                        agents.start_soon(serve, f"fast{index}", url)
                    for agent_id in ["slow", "fast0", "fast1", "fast2", "fast3"]:
                        await site.wait_for_agent(agent_id, timeout=10)
                    slow.read_gate = anyio.Event()  # the slow agent stops reading
                    agents.start_soon(run_slow)
                    async with anyio.create_task_group() as runs:
                        for index in range(4):
                            runs.start_soon(run_fast, f"fast{index}")
                    assert not slow_done.is_set()
                    slow.read_chunk_bytes, slow.read_delay = 64 * 1024, 0.005
                    slow.read_gate.set()  # and now reads slowly
                    await slow_done.wait()
                    agents.cancel_scope.cancel()
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    ledger.check({key: count for key, count in seen.items() if key[0] != "slow"})
    assert seen["slow", "big"] == 1
    # beyond the payload itself: the slow agent's receive buffer, and no copy at the site
    assert peak < payload["w"].nbytes + 4 * MiB, f"peak {peak / MiB:.1f} MiB"
    report("slow consumer", peak_mib=round(peak / MiB, 1), fast_tasks=200, payload_mib=16)


def test_the_fault_injector_refuses_bad_settings_clearly() -> None:
    faulty = FaultyConnector("memory://nowhere")
    with pytest.raises(ValueError, match="'send' or 'receive'"):
        faulty.drop_after_bytes(10, "sideways")
    with pytest.raises(ValueError, match="at least 0"):
        faulty.drop_after_bytes(-1)
    with pytest.raises(ValueError, match="probability"):
        faulty.inject_randomly(1.5)
    with pytest.raises(ValueError, match="kinds among"):
        faulty.inject_randomly(0.1, kinds=["explode"])


@pytest.mark.parametrize("transport", ["memory://", "tcp://127.0.0.1:0"])
async def test_a_read_gate_stalls_the_agent_and_a_send_delay_holds_its_messages(
    transport: str,
) -> None:
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(await site.listen(transport))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            faulty.read_gate = anyio.Event()
            async with anyio.create_task_group() as group:
                results: list[TaskResult] = []

                async def run() -> None:
                    results.append(await site.run_task("a1", "train", 7))

                group.start_soon(run)
                assert await agent.get_task(timeout=0.2) is None, "the stalled agent read"
                faulty.read_gate.set()
                task = await agent.get_task(timeout=5)
                assert task is not None and task.data == 7
                faulty.send_delay = 0.2
                submitted = anyio.current_time()
                assert await agent.submit_result(TaskResult({}, 8))
                assert anyio.current_time() - submitted >= 0.2
            assert results[0].data == 8
