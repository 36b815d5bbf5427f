"""Processes that die, stop or restart: an agent killed mid-task and started again, a site process
restarted while its agents wait, a peer frozen by SIGSTOP."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
from reliability_helpers import Peer, big_payload, checksum, report, wait_until

from flare_agent_async import AgentClosed, AsyncFlareAgent, FlareSite, TaskResult

pytestmark = pytest.mark.anyio


@pytest.fixture
def unix_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        yield f"unix://{Path(folder) / 'site.sock'}"


async def test_an_agent_killed_mid_task_and_restarted_gets_the_task_again(
    anyio_backend: str,
) -> None:
    data = big_payload(4)
    results: list[TaskResult] = []
    finished = anyio.Event()
    async with FlareSite("site-1", reconnect_timeout=30) as site:
        url = await site.listen("tcp://127.0.0.1:0")
        async with anyio.create_task_group() as group:

            async def run() -> None:
                results.append(await site.run_task("a1", "train", data, task_id="t1"))
                finished.set()

            async with Peer("agent", url, "a1", anyio_backend, "hang") as first:
                await first.expect("ready")
                group.start_soon(run)
                assert await first.line() == f"task t1 {checksum(data)}"
                await first.kill()
            # the site noticed: the agent is away, its task waits for it
            await wait_until(lambda: "a1" not in site.agents, "the site noticed the death")
            assert not results
            async with Peer("agent", url, "a1", anyio_backend, "echo") as second:
                await second.expect("ready")
                assert await second.line() == f"task t1 {checksum(data)}"  # sent once, again
                with anyio.fail_after(20):
                    await finished.wait()
    assert len(results) == 1
    assert results[0].meta["checksum"] == checksum(data) == checksum(results[0].data)


async def test_a_restarted_site_gets_its_agents_back_and_a_site_that_stays_away_closes_them(
    anyio_backend: str, unix_url: str
) -> None:
    reconnect_timeout = 2.0
    seen: list[str] = []
    agent = AsyncFlareAgent(
        unix_url, agent_id="a1", site_name="site-1", reconnect_timeout=reconnect_timeout
    )

    async def trainer() -> None:
        with contextlib.suppress(AgentClosed):
            async with aclosing(agent.tasks()) as tasks:
                async for task in tasks:
                    seen.append(task.task_id)
                    await agent.submit_result(TaskResult({}, task.data))

    async with (
        Peer("site", unix_url, anyio_backend) as first,
        Peer("site", unix_url, anyio_backend) as second,
    ):
        await first.tell("go")
        await first.expect("listening")
        async with agent, anyio.create_task_group() as group:
            group.start_soon(trainer)
            done = await first.expect("done")
            assert done == f"done {checksum({'x': list(range(10))})}"
            await first.kill()
            await second.tell("go")  # the new site process, its imports done, listens now
            await second.expect("listening")
            with anyio.fail_after(reconnect_timeout + 10):
                assert await second.expect("done") == done
            assert len(seen) == 2  # one task from each site process
            # the site goes away for good: the agent closes after reconnect_timeout, saying why
            await second.kill()
            lost = anyio.current_time()
            with (
                anyio.fail_after(reconnect_timeout + 10),
                pytest.raises(AgentClosed, match="the site is gone") as closed,
            ):
                await agent.get_task()
            waited = anyio.current_time() - lost
            group.cancel_scope.cancel()
    assert reconnect_timeout - 0.1 <= waited < reconnect_timeout + 5, waited
    assert f"within {reconnect_timeout:g} s" in str(closed.value)
    report("site restart", reconnect_s=reconnect_timeout, closed_after_s=round(waited, 2))


async def test_a_stopped_agent_is_declared_dead_after_heartbeat_timeout_not_before(
    anyio_backend: str,
) -> None:
    # A timeout well beyond a loaded machine's scheduling delays (heartbeats may leave late)
    interval, timeout = 0.1, 1.5
    options = {"heartbeat_interval": interval, "heartbeat_timeout": timeout}
    async with FlareSite("site-1", reconnect_timeout=30, **options) as site:
        url = await site.listen("tcp://127.0.0.1:0")
        async with Peer("agent", url, "a1", anyio_backend, "echo") as peer:
            await peer.expect("ready")
            await site.wait_for_agent("a1", timeout=10)
            # alive and idle for two timeouts: heartbeats keep it
            with anyio.move_on_after(2 * timeout):
                await wait_until(lambda: "a1" not in site.agents, "", timeout=math.inf)
                pytest.fail("a live, idle agent was declared dead")
            os.kill(peer.pid, signal.SIGSTOP)
            stopped = anyio.current_time()
            took = await wait_until(
                lambda: "a1" not in site.agents, "a stopped agent was never declared dead"
            )
            os.kill(peer.pid, signal.SIGCONT)
            elapsed = anyio.current_time() - stopped
    # its last heartbeat left about one interval before it stopped (a late one: half a second)
    assert timeout - interval - 0.5 <= elapsed < timeout + 5, elapsed
    report("heartbeat silence", heartbeat_timeout_s=timeout, declared_dead_after_s=round(took, 2))
