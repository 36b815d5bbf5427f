"""AsyncFlareAgent beyond the shared behaviour suite (test_behaviour.py): cancelling its calls,
abort scopes, faults injected inside its event loop, reconnects and shutdown races."""

from __future__ import annotations

import gc
import weakref

import anyio
import numpy as np
import pytest
from conftest import assign

from flare_agent_async import (
    AgentClosed,
    AsyncFlareAgent,
    CallStateError,
    FlareSite,
    Task,
    TaskAborted,
    TaskResult,
    TransportError,
)
from flare_agent_async.protocol import (
    Abort,
    Heartbeat,
    Log,
    Result,
    ResultAck,
    TaskAck,
    TaskAssign,
    Welcome,
)
from flare_agent_async.testing import FaultyConnector, ScriptedPeer, site_and_agent
from flare_agent_async.transports import MessageStream, connector_for

pytestmark = pytest.mark.anyio

OK = TaskResult({}, {"ok": True})


async def drain_until_closed(stream: MessageStream) -> None:
    """Receive until the peer closes the connection."""
    try:
        while True:
            await stream.receive()
    except anyio.EndOfStream:
        return


async def test_a_lost_connection_while_submitting_resends_and_the_site_keeps_one_result() -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        faulty = FaultyConnector(connector_for(url))
        # The result reaches the site, then the connection drops before the acknowledgement.
        faulty.drop_after(lambda message: isinstance(message, Result))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            async with anyio.create_task_group() as group:
                results: list[TaskResult] = []

                async def run() -> None:
                    results.append(await site.run_task("a1", "train", 1))

                group.start_soon(run)
                assert await agent.get_task(timeout=5) is not None
                assert await agent.submit_result(TaskResult({}, {"n": 1}))
            assert [result.data for result in results] == [{"n": 1}]
            assert faulty.connections == 2


async def test_a_result_lost_with_its_connection_is_resent_after_reconnecting() -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        faulty = FaultyConnector(connector_for(url))
        faulty.drop_before(lambda message: isinstance(message, Result))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            async with anyio.create_task_group() as group:
                results: list[TaskResult] = []

                async def run() -> None:
                    results.append(await site.run_task("a1", "train", 1))

                group.start_soon(run)
                assert await agent.get_task(timeout=5) is not None
                assert await agent.submit_result(TaskResult({}, {"n": 2}))
            assert [result.data for result in results] == [{"n": 2}]
            assert faulty.connections == 2


async def test_a_fetched_task_aborted_by_the_site_signals_the_trainer() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("t1"))
        task = await agent.get_task(timeout=5)
        assert task is not None and not task.aborted
        trained = False
        async with anyio.create_task_group() as trainer:

            async def train() -> None:
                nonlocal trained
                with task.cancel_on_abort():
                    await anyio.sleep_forever()
                trained = True

            trainer.start_soon(train)
            trainer.start_soon(task.wait_aborted)
            await anyio.wait_all_tasks_blocked()
            await stream.send(Abort(task_id="t1"))
        assert task.aborted and trained
        assert await agent.submit_result(OK) is False
        # Nothing was sent for the aborted task: the next message is the log record.
        await agent.log("loss", 0.5)
        message = await stream.receive()
        while isinstance(message, TaskAck):
            message = await stream.receive()
        assert isinstance(message, Log) and message.key == "loss"
        await agent.stop()


async def test_cancelling_get_task_while_waiting_loses_no_task() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        with anyio.move_on_after(0.01):
            await agent.get_task()
        group.start_soon(site.run_task, "agent-1", "train", 3)
        task = await agent.get_task(timeout=5)
        assert task is not None and task.data == 3
        await agent.submit_result(OK)


async def test_cancelling_get_task_as_the_task_arrives_loses_no_task() -> None:
    async with FlareSite("site-1") as site, anyio.create_task_group() as group:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            got: list[Task | None] = []
            scope = anyio.CancelScope()

            async def fetch() -> None:
                with scope:
                    got.append(await agent.get_task())

            group.start_soon(fetch)
            await anyio.wait_all_tasks_blocked()
            # The task's arrival wakes the getter; cancel it before it resumes.
            faulty.after_receive(lambda message: isinstance(message, TaskAssign), scope.cancel)
            group.start_soon(site.run_task, "a1", "train", 4)
            await anyio.wait_all_tasks_blocked()
            assert scope.cancel_called
            task = got[0] if got else await agent.get_task(timeout=5)
            assert task is not None and task.data == 4
            assert await agent.submit_result(OK)


async def test_cancelling_submit_result_still_delivers_the_result() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task("agent-1", "train", 1))

        group.start_soon(run)
        assert await agent.get_task(timeout=5) is not None
        with anyio.CancelScope() as scope:
            scope.cancel()
            await agent.submit_result(TaskResult({}, {"kept": True}))
        with anyio.fail_after(5):
            while not results:
                await anyio.wait_all_tasks_blocked()
        assert results[0].data == {"kept": True}
        with pytest.raises(CallStateError):
            await agent.submit_result(OK)  # the one submission was made


async def test_stop_waits_for_submitted_results() -> None:
    async with FlareSite("site-1") as site, anyio.create_task_group() as group:
        url = await site.listen("memory://")
        results: list[TaskResult] = []
        agent = AsyncFlareAgent(url, agent_id="a1", site_name="site-1")
        await agent.start()

        async def run() -> None:
            results.append(await site.run_task("a1", "train", 1))

        group.start_soon(run)
        assert await agent.get_task(timeout=5) is not None
        with anyio.CancelScope() as scope:
            scope.cancel()
            await agent.submit_result(TaskResult({}, {"last": True}))
        await agent.stop()
        await anyio.wait_all_tasks_blocked()
        assert [result.data for result in results] == [{"last": True}]


async def test_an_idle_agent_keeps_its_connection_alive_with_heartbeats() -> None:
    # A timeout a loaded machine's scheduling delays cannot reach, and 50 intervals in it.
    site_options = {"heartbeat_interval": 0.01, "heartbeat_timeout": 0.5}
    async with FlareSite("site-1", **site_options) as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            # Idle for two heartbeat timeouts at least: until the site answered 100 heartbeats.
            last = anyio.Event()
            for n in range(100):
                faulty.after_receive(
                    lambda message: isinstance(message, Heartbeat),
                    last.set if n == 99 else lambda: None,
                )
            with anyio.fail_after(30):
                await last.wait()
            assert faulty.connections == 1, "an idle connection was dropped"
            assert site.agents == frozenset({"a1"})
            assert agent.connected


async def test_stop_is_bounded_when_the_site_never_acknowledges() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1", close_timeout=0.05)
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("t1"))
        assert await agent.get_task(timeout=5) is not None
        outcome: list[bool] = []

        async def submit() -> None:
            outcome.append(await agent.submit_result(OK))

        group.start_soon(submit)
        await peer.receive_until(stream, Result)  # and never acknowledged
        await agent.stop()
        with anyio.fail_after(5):
            await drain_until_closed(stream)  # the agent closed its connection
            await anyio.wait_all_tasks_blocked()
        assert outcome == [False]
        with pytest.raises(AgentClosed):
            await agent.get_task(timeout=1)


async def test_a_result_submitted_in_a_cancelled_body_is_still_delivered() -> None:
    async with FlareSite("site-1") as site, anyio.create_task_group() as group:
        url = await site.listen("memory://")
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task("a1", "train", 1))

        with anyio.CancelScope() as body:
            async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
                group.start_soon(run)
                assert await agent.get_task(timeout=5) is not None
                body.cancel()
                await agent.submit_result(TaskResult({}, {"delivered": True}))
        with anyio.fail_after(5):
            while not results:
                await anyio.wait_all_tasks_blocked()
        assert results[0].data == {"delivered": True}
        assert site.agents == frozenset()  # and the agent said goodbye


async def test_stop_in_the_instant_a_reconnect_completes() -> None:
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        with anyio.fail_after(5):
            async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
                faulty.connect_gate = anyio.Event()
                await faulty.drop()
                await anyio.wait_all_tasks_blocked()  # reconnecting: held at the gate
                assert not agent.connected
                faulty.connect_gate.set()  # the connection is made ...
                await agent.stop()  # ... as the trainer stops
        assert faulty.connections == 2
        await anyio.wait_all_tasks_blocked()
        assert site.agents == frozenset()


async def test_an_abort_lost_with_the_connection_still_reaches_the_agent() -> None:
    async with FlareSite("site-1") as site, anyio.create_task_group() as group:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            aborted: list[TaskAborted] = []

            async def run() -> None:
                with pytest.raises(TaskAborted) as info:
                    await site.run_task("a1", "train", 1, task_id="t1")
                aborted.append(info.value)

            group.start_soon(run)
            await anyio.wait_all_tasks_blocked()  # t1 is pending at the agent
            arrived = anyio.Event()
            faulty.after_receive(lambda message: isinstance(message, Welcome), arrived.set)
            await faulty.drop()  # the connection breaks ...
            assert await site.abort_task("a1", "t1")  # ... as the site aborts the task
            with anyio.fail_after(5):
                await arrived.wait()
            await anyio.wait_all_tasks_blocked()
            assert len(aborted) == 1
            assert await agent.get_task(timeout=0.05) is None


async def test_get_task_nowait_takes_a_task_that_is_here_and_never_waits() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        with pytest.raises(CallStateError, match="not started"):
            agent.get_task_nowait()
        stream = await peer.start_agent(agent, group)
        assert agent.get_task_nowait() is None  # nothing here: None at once
        await stream.send(assign("t1", data=7))
        await anyio.wait_all_tasks_blocked()  # in memory: the agent has taken it in
        task = agent.get_task_nowait()
        assert task is not None
        assert (task.task_id, task.data) == ("t1", 7)
        with pytest.raises(CallStateError, match="submit_result first"):
            agent.get_task_nowait()  # the task has no result yet
        assert agent.failure is None
        await agent.stop()
        with pytest.raises(AgentClosed):
            agent.get_task_nowait()
        assert agent.failure is None, "a stop is not a failure"


async def test_submit_result_nowait_gives_the_sites_verdict_to_its_callback() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1", close_timeout=0.05)
        stream = await peer.start_agent(agent, group)
        verdicts: list[bool] = []
        with pytest.raises(CallStateError, match="without a fetched task"):
            agent.submit_result_nowait(OK, verdicts.append)
        for done, (task_id, accepted) in enumerate((("t1", True), ("t2", False))):
            await stream.send(assign(task_id))
            assert await agent.get_task(timeout=5) is not None
            agent.submit_result_nowait(OK, verdicts.append)
            await peer.receive_until(stream, Result)
            await anyio.wait_all_tasks_blocked()
            assert len(verdicts) == done, "a verdict before the site's answer"
            await stream.send(ResultAck(task_id=task_id, accepted=accepted, reason="full"))
            with anyio.fail_after(5):
                while len(verdicts) == done:
                    await anyio.wait_all_tasks_blocked()
        assert verdicts == [True, False]
        # Aborted before its result: False at once, and nothing is sent.
        await stream.send(assign("t3"))
        assert await agent.get_task(timeout=5) is not None
        await stream.send(Abort(task_id="t3"))
        await anyio.wait_all_tasks_blocked()
        agent.submit_result_nowait(OK, verdicts.append)
        assert verdicts == [True, False, False]
        # Never answered: False once the agent closes.
        await stream.send(assign("t4"))
        assert await agent.get_task(timeout=5) is not None
        agent.submit_result_nowait(OK, verdicts.append)
        await peer.receive_until(stream, Result)
        await agent.stop()
        assert verdicts == [True, False, False, False]


async def test_a_settled_result_is_not_kept_alive() -> None:
    # Models are large and do not set off the cyclic collector: a reference cycle around a
    # submission would keep every result of a training loop alive.
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        gc.disable()
        try:
            for task_id, nowait in (("t1", True), ("t2", False)):
                await stream.send(assign(task_id))
                assert await agent.get_task(timeout=5) is not None
                weights = np.arange(10, dtype=np.float32)
                alive = weakref.ref(weights)
                result = TaskResult({}, {"w": weights})
                del weights
                settled = anyio.Event()
                if nowait:
                    agent.submit_result_nowait(result, lambda kept, s=settled: s.set())
                else:
                    group.start_soon(agent.submit_result, result)
                del result
                await peer.receive_until(stream, Result)
                await stream.send(ResultAck(task_id=task_id, accepted=True))
                if nowait:
                    with anyio.fail_after(5):
                        await settled.wait()
                await anyio.wait_all_tasks_blocked()  # submit_result has returned
                assert alive() is None, f"the result of {task_id} is kept alive"
        finally:
            gc.enable()
        await agent.stop()


async def test_failure_says_why_an_agent_closed_when_the_site_is_gone() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1", reconnect_timeout=0.2)
        await peer.start_agent(agent, group)
        await peer.aclose()  # the connection ends and nothing listens any more
        with anyio.fail_after(10), pytest.raises(AgentClosed, match="site is gone"):
            await agent.get_task()
        assert isinstance(agent.failure, TransportError)
        await agent.stop()
