"""The behaviour table of DESIGN.md section 2, row by row, through AsyncFlareAgent."""

from __future__ import annotations

import math

import anyio
import pytest
from anyio.abc import TaskStatus

from flare_agent_async import (
    RC,
    AgentClosed,
    AsyncFlareAgent,
    CallStateError,
    FlareSite,
    Task,
    TaskAborted,
    TaskResult,
)
from flare_agent_async.protocol import (
    Abort,
    Bye,
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


def assign(task_id: str, data: object = None, meta: object = None) -> TaskAssign:
    return TaskAssign(
        task_id=task_id, task_name="train", meta=meta if meta is not None else {}, data=data
    )  # type: ignore[arg-type]


async def drain_until_closed(stream: MessageStream) -> None:
    """Receive until the peer closes the connection."""
    try:
        while True:
            await stream.receive()
    except anyio.EndOfStream:
        return


async def test_get_task_before_start_is_a_call_state_error() -> None:
    agent = AsyncFlareAgent("memory://nowhere", agent_id="a1", site_name="site-1")
    with pytest.raises(CallStateError, match="not started"):
        await agent.get_task(timeout=1)
    with pytest.raises(CallStateError, match="not started"):
        await agent.submit_result(OK)


@pytest.mark.parametrize("timeout", ["1", [1], True, object()])
async def test_get_task_rejects_a_timeout_that_is_not_a_number(timeout: object) -> None:
    async with site_and_agent() as (_, agent):
        with pytest.raises(TypeError, match="timeout must be"):
            await agent.get_task(timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, 0.0, -math.inf, math.nan])
async def test_get_task_rejects_a_timeout_that_is_not_positive(timeout: float) -> None:
    async with site_and_agent() as (_, agent):
        with pytest.raises(ValueError, match="timeout must > 0"):
            await agent.get_task(timeout)


async def test_no_task_within_timeout_returns_none_and_a_later_task_is_kept() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        assert await agent.get_task(timeout=0.01) is None
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task("agent-1", "train", {"x": 1}))

        group.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        task = await agent.get_task(timeout=5)
        assert task is not None and task.data == {"x": 1}
        assert await agent.submit_result(OK)
    assert results[0].data == {"ok": True}


async def test_get_task_without_timeout_waits_for_a_task() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        got: list[Task | None] = []

        async def fetch() -> None:
            got.append(await agent.get_task())

        group.start_soon(fetch)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        group.start_soon(site.run_task, "agent-1", "train", 7)
        with anyio.fail_after(5):
            while not got:
                await anyio.wait_all_tasks_blocked()
        assert got[0] is not None and got[0].data == 7
        await agent.submit_result(OK)


async def test_get_task_without_timeout_wakes_with_agent_closed_when_the_agent_stops() -> None:
    async with site_and_agent() as (_, agent):
        errors: list[BaseException] = []

        async def fetch() -> None:
            try:
                await agent.get_task()
            except AgentClosed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(fetch)
            await anyio.wait_all_tasks_blocked()
            await agent.stop()
        assert len(errors) == 1
        with pytest.raises(AgentClosed):
            await agent.get_task(timeout=1)


async def test_get_task_while_the_fetched_task_has_no_result_is_a_call_state_error() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        group.start_soon(site.run_task, "agent-1", "train", 1)
        task = await agent.get_task(timeout=5)
        assert task is not None
        with pytest.raises(CallStateError, match="submit_result first"):
            await agent.get_task(timeout=1)
        assert await agent.submit_result(OK)


async def test_site_goodbye_closes_the_agent() -> None:
    leave = anyio.Event()

    async def run_site(*, task_status: TaskStatus[str]) -> None:
        async with FlareSite("site-1") as site:
            task_status.started(await site.listen("memory://"))
            await leave.wait()  # leaving the site says goodbye

    async with anyio.create_task_group() as group:
        url = await group.start(run_site)
        agent = AsyncFlareAgent(url, agent_id="a1", site_name="site-1")
        await agent.start()
        errors: list[AgentClosed] = []

        async def fetch() -> None:
            with pytest.raises(AgentClosed, match="goodbye") as info:
                await agent.get_task()
            errors.append(info.value)

        group.start_soon(fetch)
        await anyio.wait_all_tasks_blocked()
        leave.set()
        with anyio.fail_after(5):
            while not errors:
                await anyio.wait_all_tasks_blocked()
        assert [task async for task in agent.tasks()] == []  # ends quietly after a goodbye
        await agent.stop()


async def test_a_silent_site_is_declared_dead_and_the_agent_closes() -> None:
    async with ScriptedPeer(heartbeat_interval=0.02, heartbeat_timeout=0.1) as peer:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1", reconnect_timeout=0.2)
        async with anyio.create_task_group() as group:
            stream = await peer.start_agent(agent, group)
            await peer.aclose()  # the agent cannot reconnect
            # The peer never answers: the agent's heartbeats go unanswered.
            with anyio.fail_after(5), pytest.raises(AgentClosed, match="site is gone"):
                await agent.get_task()
            await stream.aclose()
            with pytest.raises(AgentClosed):
                async for _ in agent.tasks():
                    pass
            await agent.stop()


async def test_a_submit_in_flight_returns_false_when_the_site_says_goodbye() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("t1", 1))
        task = await agent.get_task(timeout=5)
        assert task is not None
        outcome: list[bool] = []

        async def submit() -> None:
            outcome.append(await agent.submit_result(OK))

        group.start_soon(submit)
        result = await peer.receive_until(stream, Result)
        assert result.task_id == "t1"
        await stream.send(Bye(reason="job ended"))
        with anyio.fail_after(5):
            while not outcome:
                await anyio.wait_all_tasks_blocked()
        assert outcome == [False]
        await agent.stop()


async def test_submit_result_with_a_wrong_type_is_a_type_error_and_changes_nothing() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        group.start_soon(site.run_task, "agent-1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        with pytest.raises(TypeError, match="TaskResult"):
            await agent.submit_result({"ok": True})  # type: ignore[arg-type]
        assert await agent.submit_result(OK)


async def test_submit_result_without_a_task_or_twice_is_a_call_state_error() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        with pytest.raises(CallStateError, match="without a fetched task"):
            await agent.submit_result(OK)
        group.start_soon(site.run_task, "agent-1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        assert await agent.submit_result(OK)
        with pytest.raises(CallStateError, match="without a fetched task"):
            await agent.submit_result(OK)


async def test_submit_result_returns_true_once_the_site_acknowledged() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("t1"))
        assert await agent.get_task(timeout=5) is not None
        outcome: list[bool] = []

        async def submit() -> None:
            outcome.append(await agent.submit_result(OK))

        group.start_soon(submit)
        await peer.receive_until(stream, Result)
        await anyio.wait_all_tasks_blocked()
        assert outcome == []  # not before the acknowledgement
        await stream.send(ResultAck(task_id="t1", accepted=True))
        with anyio.fail_after(5):
            while not outcome:
                await anyio.wait_all_tasks_blocked()
        assert outcome == [True]
        await agent.stop()


async def test_submit_result_returns_false_when_the_site_refuses_the_result() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("t1"))
        assert await agent.get_task(timeout=5) is not None

        async def refuse() -> None:
            result = await peer.receive_until(stream, Result)
            await stream.send(ResultAck(task_id=result.task_id, accepted=False, reason="no"))

        group.start_soon(refuse)
        assert await agent.submit_result(OK) is False
        await agent.stop()


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


async def test_a_task_aborted_before_fetch_is_dropped() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        outcome: list[BaseException] = []

        async def run() -> None:
            try:
                await site.run_task("agent-1", "train", 1, task_id="t1")
            except TaskAborted as exc:
                outcome.append(exc)

        group.start_soon(run)
        await anyio.wait_all_tasks_blocked()  # t1 is pending at the agent
        assert await site.abort_task("agent-1", "t1")
        await anyio.wait_all_tasks_blocked()
        assert len(outcome) == 1
        assert await agent.get_task(timeout=0.05) is None
        group.start_soon(site.run_task, "agent-1", "train", 2)
        task = await agent.get_task(timeout=5)
        assert task is not None and task.data == 2  # not wedged, unlike NVFlare's agent
        assert await agent.submit_result(OK)


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


async def test_a_new_task_while_the_current_one_is_unsubmitted_aborts_the_current() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("t1", 1))
        first = await agent.get_task(timeout=5)
        assert first is not None
        await stream.send(assign("t2", 2))  # no Abort: NVFlare's sites just send the next task
        await anyio.wait_all_tasks_blocked()
        assert first.aborted
        second = await agent.get_task(timeout=5)
        assert second is not None and second.task_id == "t2" and not second.aborted
        await agent.stop()


async def test_a_new_task_from_the_site_supersedes_the_running_one() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        outcome: list[object] = []

        async def run(data: int) -> None:
            try:
                outcome.append(await site.run_task("agent-1", "train", data))
            except TaskAborted as exc:
                outcome.append(exc)

        group.start_soon(run, 1)
        first = await agent.get_task(timeout=5)
        assert first is not None
        group.start_soon(run, 2)
        await anyio.wait_all_tasks_blocked()
        assert first.aborted
        assert isinstance(outcome[0], TaskAborted)
        second = await agent.get_task(timeout=5)
        assert second is not None and second.data == 2
        assert await agent.submit_result(OK)
    assert isinstance(outcome[1], TaskResult)


async def test_the_same_task_twice_is_acknowledged_and_handed_over_once() -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("t1"))
        await stream.send(assign("t1"))
        assert (await peer.receive_until(stream, TaskAck)).task_id == "t1"
        assert (await peer.receive_until(stream, TaskAck)).task_id == "t1"
        assert await agent.get_task(timeout=5) is not None
        group.start_soon(agent.submit_result, OK)
        await peer.receive_until(stream, Result)
        await stream.send(ResultAck(task_id="t1", accepted=True))
        await stream.send(assign("t1"))  # a resend after the result: still not a new task
        await peer.receive_until(stream, TaskAck)
        assert await agent.get_task(timeout=0.05) is None
        await agent.stop()


@pytest.mark.parametrize(
    "meta",
    [pytest.param([1, 2], id="meta-not-a-dict"), pytest.param({1: "x"}, id="meta-key-not-str")],
)
async def test_bad_task_data_is_answered_with_bad_task_data_and_the_agent_goes_on(
    meta: object,
) -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        agent = AsyncFlareAgent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)
        await stream.send(assign("bad", meta=meta))
        result = await peer.receive_until(stream, Result)
        assert (result.task_id, result.return_code) == ("bad", RC.BAD_TASK_DATA)
        await stream.send(ResultAck(task_id="bad", accepted=True))
        await stream.send(assign("good", 5))
        task = await agent.get_task(timeout=5)
        assert task is not None and task.task_id == "good"
        await agent.stop()


async def test_payloads_that_cannot_be_sent_are_refused_where_they_are_given() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        with pytest.raises(TypeError, match=r"meta has a key 1 of type int"):
            await site.run_task("agent-1", "train", 1, meta={1: "x"})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match=r"data\['model'\]\[0\] is of type object"):
            await site.run_task("agent-1", "train", {"model": [object()]})
        group.start_soon(site.run_task, "agent-1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        with pytest.raises(TypeError, match=r"result.data\['w'\] is of type set"):
            await agent.submit_result(TaskResult({}, {"w": {1, 2}}))
        with pytest.raises(TypeError, match=r"log value 'loss' is of type complex"):
            await agent.log("loss", 1j)
        assert await agent.submit_result(OK)  # nothing changed: the task still takes a result


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


async def test_tasks_iterates_until_the_site_says_goodbye() -> None:
    seen: list[int] = []
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen("memory://")

        async def trainer() -> None:
            async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
                async for task in agent.tasks():
                    seen.append(task.data)
                    await agent.submit_result(TaskResult({}, {"y": task.data * 10}))

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=5)
        results = [await site.run_task("a1", "train", n) for n in range(3)]
    assert seen == [0, 1, 2]
    assert [result.data for result in results] == [{"y": 0}, {"y": 10}, {"y": 20}]


async def test_start_twice_is_a_call_state_error() -> None:
    async with site_and_agent() as (_, agent):
        with pytest.raises(CallStateError, match="already started"):
            await agent.start()


async def test_stop_is_idempotent_and_a_stopped_agent_is_closed() -> None:
    async with site_and_agent() as (_, agent):
        await agent.stop()
        await agent.stop()
        with pytest.raises(AgentClosed):
            await agent.get_task(timeout=1)


async def test_an_idle_agent_keeps_its_connection_alive_with_heartbeats() -> None:
    site_options = {"heartbeat_interval": 0.01, "heartbeat_timeout": 0.05}
    async with FlareSite("site-1", **site_options) as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            # Idle for many heartbeat timeouts: until the site answered 20 heartbeats.
            twentieth = anyio.Event()
            for n in range(20):
                faulty.after_receive(
                    lambda message: isinstance(message, Heartbeat),
                    twentieth.set if n == 19 else lambda: None,
                )
            with anyio.fail_after(10):
                await twentieth.wait()
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
