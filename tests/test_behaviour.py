"""The behaviour table of DESIGN.md section 2, row by row, through both agents: the async agent
and the synchronous facade (the ``driver`` fixture), on asyncio and trio.

Rows that need the async API itself (cancelling a call, abort scopes) or fault injection inside
the agent's loop are in test_agent.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import TaskGroup, TaskStatus
from conftest import Agent, assign

from flare_agent_async import (
    RC,
    AgentClosed,
    CallStateError,
    FlareSite,
    LogRecord,
    Task,
    TaskAborted,
    TaskResult,
)
from flare_agent_async.protocol import (
    Abort,
    Bye,
    Hello,
    Log,
    PayloadType,
    Result,
    ResultAck,
    TaskAck,
    TaskAssign,
    _payload,
    register_payload_type,
)
from flare_agent_async.testing import FaultyConnector, ScriptedPeer
from flare_agent_async.transports import MessageStream, connector_for

pytestmark = pytest.mark.anyio

OK = TaskResult({}, {"ok": True})
MakeAgent = Callable[..., Agent]


@asynccontextmanager
async def connected(
    make_agent: MakeAgent, listen_url: str, **agent_options: Any
) -> AsyncIterator[tuple[FlareSite, Agent]]:
    async with FlareSite("site-1") as site:
        url = await site.listen(listen_url)
        async with make_agent(url, agent_id="agent-1", site_name="site-1", **agent_options) as a:
            yield site, a


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Bounded polling, for what happens in another thread's event loop."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - the state lives in another thread's loop
            await anyio.sleep(0.005)
    assert condition(), what


async def test_get_task_before_start_is_a_call_state_error(make_agent: MakeAgent) -> None:
    agent = make_agent("memory://nowhere", agent_id="a1", site_name="site-1")
    with pytest.raises(CallStateError, match="not started"):
        await agent.get_task(timeout=1)
    with pytest.raises(CallStateError, match="not started"):
        await agent.submit_result(OK)


@pytest.mark.parametrize("timeout", ["1", [1], True, object()])
async def test_get_task_rejects_a_timeout_that_is_not_a_number(
    make_agent: MakeAgent, listen_url: str, timeout: object
) -> None:
    async with connected(make_agent, listen_url) as (_, agent):
        with pytest.raises(TypeError, match="timeout must be"):
            await agent.get_task(timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, 0.0, -math.inf, math.nan])
async def test_get_task_rejects_a_timeout_that_is_not_positive(
    make_agent: MakeAgent, listen_url: str, timeout: float
) -> None:
    async with connected(make_agent, listen_url) as (_, agent):
        with pytest.raises(ValueError, match="timeout must > 0"):
            await agent.get_task(timeout)


async def test_no_task_within_timeout_returns_none_and_a_later_task_is_kept(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (site, agent):
        started = anyio.current_time()
        assert await agent.get_task(timeout=0.05) is None
        assert anyio.current_time() - started >= 0.05
        async with anyio.create_task_group() as group:
            results: list[TaskResult] = []

            async def run() -> None:
                results.append(await site.run_task("agent-1", "train", {"x": 1}))

            group.start_soon(run)
            task = await agent.get_task(timeout=5)
            assert task is not None and task.data == {"x": 1}
            assert await agent.submit_result(OK)
        assert results[0].data == {"ok": True}


async def test_get_task_without_timeout_waits_for_a_task(
    make_agent: MakeAgent, listen_url: str
) -> None:
    got: list[Task | None] = []
    fetched = anyio.Event()
    async with connected(make_agent, listen_url) as (site, agent), anyio.create_task_group() as g:

        async def fetch() -> None:
            got.append(await agent.get_task())
            fetched.set()

        g.start_soon(fetch)
        g.start_soon(site.run_task, "agent-1", "train", 7)
        with anyio.fail_after(10):
            await fetched.wait()
        assert got[0] is not None and got[0].data == 7
        await agent.submit_result(OK)


async def test_a_blocked_get_task_wakes_with_agent_closed_when_the_agent_stops(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (_, agent):
        errors: list[AgentClosed] = []

        async def fetch() -> None:
            with pytest.raises(AgentClosed) as info:
                await agent.get_task()
            errors.append(info.value)

        async with anyio.create_task_group() as group:
            group.start_soon(fetch)
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10):
                await agent.stop()  # from another task (and thread, for the facade)
        assert len(errors) == 1
        with pytest.raises(AgentClosed):
            await agent.get_task(timeout=1)


async def test_get_task_while_the_fetched_task_has_no_result_is_a_call_state_error(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (site, agent), anyio.create_task_group() as g:
        g.start_soon(site.run_task, "agent-1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        with pytest.raises(CallStateError, match="submit_result first"):
            await agent.get_task(timeout=1)
        assert await agent.submit_result(OK)


async def test_site_goodbye_closes_the_agent(make_agent: MakeAgent, listen_url: str) -> None:
    leave = anyio.Event()

    async def run_site(*, task_status: TaskStatus[str]) -> None:
        async with FlareSite("site-1") as site:
            task_status.started(await site.listen(listen_url))
            await leave.wait()  # leaving the site says goodbye

    async with anyio.create_task_group() as group:
        url = await group.start(run_site)
        agent = make_agent(url, agent_id="a1", site_name="site-1")
        await agent.start()
        closed: list[AgentClosed] = []

        async def fetch() -> None:
            with pytest.raises(AgentClosed, match="goodbye") as info:
                await agent.get_task()
            closed.append(info.value)

        group.start_soon(fetch)
        await anyio.wait_all_tasks_blocked()
        leave.set()
        await wait_until(lambda: bool(closed), "get_task raised AgentClosed")
        assert [task async for task in agent.tasks()] == []  # ends quietly after a goodbye
        await agent.stop()


async def test_a_silent_site_is_declared_dead_and_the_agent_closes(
    make_agent: MakeAgent, listen_url: str
) -> None:
    options = {"heartbeat_interval": 0.02, "heartbeat_timeout": 0.1, "url": listen_url}
    async with ScriptedPeer(**options) as peer, anyio.create_task_group() as group:
        agent = make_agent(peer.url, agent_id="a1", site_name="site-1", reconnect_timeout=0.2)
        await peer.start_agent(agent, group)  # type: ignore[arg-type]
        await peer.aclose()  # the agent cannot reconnect, and nothing answers its heartbeats
        with anyio.fail_after(10), pytest.raises(AgentClosed, match="site is gone"):
            await agent.get_task()
        with pytest.raises(AgentClosed):
            async for _ in agent.tasks():
                pass
        await agent.stop()


async def submit_in_flight(
    agent: Agent, peer: ScriptedPeer, stream: MessageStream, group: TaskGroup
) -> list[bool]:
    """Give ``agent`` a task, submit its result in the background and wait until the site has
    it, unacknowledged; ``submit_result``'s answer lands in the list returned."""
    await stream.send(assign("t1", 1))
    assert await agent.get_task(timeout=5) is not None
    outcome: list[bool] = []

    async def submit() -> None:
        outcome.append(await agent.submit_result(OK))

    group.start_soon(submit)
    assert (await peer.receive_until(stream, Result)).task_id == "t1"
    return outcome


async def hold_silently(stream: MessageStream) -> None:
    """Keep a connection open and read what comes, answering nothing."""
    with suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        while True:
            await stream.receive()


async def test_a_site_that_holds_its_connections_and_goes_silent_is_declared_dead(
    make_agent: MakeAgent, listen_url: str
) -> None:
    # A stopped site process looks like this: its connections stay open and nothing comes back,
    # and a new connection is still accepted (by the kernel) but never welcomed.
    heartbeat_timeout, reconnect_timeout = 0.5, 1.0
    options = {"heartbeat_interval": 0.05, "heartbeat_timeout": heartbeat_timeout}
    async with ScriptedPeer(url=listen_url, **options) as peer, anyio.create_task_group() as group:
        agent = make_agent(
            peer.url, agent_id="a1", site_name="site-1", reconnect_timeout=reconnect_timeout
        )
        stream = await peer.start_agent(agent, group)  # type: ignore[arg-type]
        silent_since = anyio.current_time()  # the task is the last the agent hears
        outcome = await submit_in_flight(agent, peer, stream, group)
        group.start_soon(hold_silently, stream)  # no acknowledgement, no heartbeat, no close
        with anyio.fail_after(30):
            again = await peer.accept()  # the agent gave up on the silent connection
        reconnected_after = anyio.current_time() - silent_since
        assert isinstance(await again.receive(), Hello)
        group.start_soon(hold_silently, again)  # accepted, never welcomed
        with anyio.fail_after(30), pytest.raises(AgentClosed, match="site is gone"):
            await agent.get_task()
        closed_after = anyio.current_time() - silent_since
        await wait_until(lambda: bool(outcome), "submit_result returned")
        assert outcome == [False], "a result the site never acknowledged is not kept"
        await agent.stop()
    assert reconnected_after >= heartbeat_timeout, "declared dead before heartbeat_timeout"
    assert closed_after >= heartbeat_timeout + reconnect_timeout, "closed before reconnect_timeout"


async def test_a_submit_in_flight_returns_false_when_the_site_says_goodbye(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with ScriptedPeer(url=listen_url) as peer, anyio.create_task_group() as group:
        agent = make_agent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)  # type: ignore[arg-type]
        outcome = await submit_in_flight(agent, peer, stream, group)
        await stream.send(Bye(reason="job ended"))
        await wait_until(lambda: bool(outcome), "submit_result returned")
        assert outcome == [False]
        await agent.stop()


async def test_submit_result_with_a_wrong_type_is_a_type_error_and_changes_nothing(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (site, agent), anyio.create_task_group() as g:
        g.start_soon(site.run_task, "agent-1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        with pytest.raises(TypeError, match="TaskResult"):
            await agent.submit_result({"ok": True})  # type: ignore[arg-type]
        assert await agent.submit_result(OK)


async def test_submit_result_without_a_task_or_twice_is_a_call_state_error(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (site, agent), anyio.create_task_group() as g:
        with pytest.raises(CallStateError, match="without a fetched task"):
            await agent.submit_result(OK)
        g.start_soon(site.run_task, "agent-1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        assert await agent.submit_result(OK)
        with pytest.raises(CallStateError, match="without a fetched task"):
            await agent.submit_result(OK)


@pytest.mark.parametrize("accepted", [True, False])
async def test_submit_result_returns_the_sites_verdict_once_it_arrives(
    make_agent: MakeAgent, listen_url: str, accepted: bool
) -> None:
    async with ScriptedPeer(url=listen_url) as peer, anyio.create_task_group() as group:
        agent = make_agent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)  # type: ignore[arg-type]
        await stream.send(assign("t1"))
        assert await agent.get_task(timeout=5) is not None
        outcome: list[bool] = []

        async def submit() -> None:
            outcome.append(await agent.submit_result(OK))

        group.start_soon(submit)
        await peer.receive_until(stream, Result)
        assert outcome == []  # not before the verdict
        await stream.send(ResultAck(task_id="t1", accepted=accepted, reason="checked"))
        await wait_until(lambda: bool(outcome), "submit_result returned")
        assert outcome == [accepted]
        await agent.stop()


async def test_a_task_aborted_before_fetch_is_dropped(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(connector_for(await site.listen(listen_url)))
        reached, dropped = threading.Event(), threading.Event()  # set in the agent's loop
        faulty.after_receive(lambda m: isinstance(m, TaskAssign), reached.set)
        faulty.after_receive(lambda m: isinstance(m, Abort), dropped.set)
        agent = make_agent(faulty, agent_id="agent-1", site_name="site-1")
        async with agent, anyio.create_task_group() as g:
            outcome: list[TaskAborted] = []

            async def run() -> None:
                with pytest.raises(TaskAborted) as info:
                    await site.run_task("agent-1", "train", 1, task_id="t1")
                outcome.append(info.value)

            g.start_soon(run)
            await wait_until(reached.is_set, "the task reached the agent")
            assert await site.abort_task("agent-1", "t1")
            await wait_until(dropped.is_set, "the abort reached the agent")
            assert await agent.get_task(timeout=0.05) is None
            g.start_soon(site.run_task, "agent-1", "train", 2)
            task = await agent.get_task(timeout=5)
            assert task is not None and task.data == 2  # not wedged, unlike NVFlare's agent
            assert await agent.submit_result(OK)
            assert len(outcome) == 1


async def test_a_fetched_task_aborted_by_the_site_is_marked_and_its_result_not_sent(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with ScriptedPeer(url=listen_url) as peer, anyio.create_task_group() as group:
        agent = make_agent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)  # type: ignore[arg-type]
        await stream.send(assign("t1"))
        task = await agent.get_task(timeout=5)
        assert task is not None and not task.aborted
        called = anyio.Event()
        calls: list[str] = []
        task.add_abort_callback(lambda: calls.append("aborted"))
        await stream.send(Abort(task_id="t1"))
        await wait_until(lambda: task.aborted, "the task was marked aborted")
        assert calls == ["aborted"]
        called.set()
        assert await agent.submit_result(OK) is False
        await agent.log("loss", 0.5)  # nothing was sent for the task: the next message is this
        message = await stream.receive()
        while isinstance(message, TaskAck):
            message = await stream.receive()
        assert isinstance(message, Log) and message.key == "loss"
        await agent.stop()


async def test_a_new_task_while_the_current_one_is_unsubmitted_aborts_the_current(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with ScriptedPeer(url=listen_url) as peer, anyio.create_task_group() as group:
        agent = make_agent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)  # type: ignore[arg-type]
        await stream.send(assign("t1", 1))
        first = await agent.get_task(timeout=5)
        assert first is not None
        await stream.send(assign("t2", 2))  # no Abort: NVFlare's sites just send the next task
        await wait_until(lambda: first.aborted, "the current task was marked aborted")
        second = await agent.get_task(timeout=5)
        assert second is not None and second.task_id == "t2" and not second.aborted
        await agent.stop()


async def test_a_new_task_from_the_site_supersedes_the_running_one(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (site, agent), anyio.create_task_group() as g:
        outcome: list[object] = []

        async def run(data: int) -> None:
            try:
                outcome.append(await site.run_task("agent-1", "train", data))
            except TaskAborted as exc:
                outcome.append(exc)

        g.start_soon(run, 1)
        first = await agent.get_task(timeout=5)
        assert first is not None
        g.start_soon(run, 2)
        await wait_until(lambda: first.aborted, "the running task was aborted")
        assert isinstance(outcome[0], TaskAborted)
        second = await agent.get_task(timeout=5)
        assert second is not None and second.data == 2
        assert await agent.submit_result(OK)
    assert isinstance(outcome[1], TaskResult)


async def test_the_same_task_twice_is_acknowledged_and_handed_over_once(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with ScriptedPeer(url=listen_url) as peer, anyio.create_task_group() as group:
        agent = make_agent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)  # type: ignore[arg-type]
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


class Unreadable:
    """Sent fine, refused on arrival: its registered type fails to rebuild it."""


def _refuse(wire: object) -> object:
    raise ValueError("this value cannot be rebuilt")


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> Unreadable:
    monkeypatch.setattr(_payload, "_types_by_name", dict(_payload._types_by_name))
    monkeypatch.setattr(_payload, "_types_by_class", dict(_payload._types_by_class))
    register_payload_type(PayloadType("tests.Unreadable", Unreadable, lambda _: 0, _refuse))
    return Unreadable()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"meta": [1, 2]}, id="meta-not-a-dict"),
        pytest.param({"meta": {1: "x"}}, id="meta-key-not-str"),
        pytest.param({"data": "unreadable"}, id="data-that-cannot-be-decoded"),
    ],
)
async def test_bad_task_data_is_answered_with_bad_task_data_and_the_agent_goes_on(
    make_agent: MakeAgent, listen_url: str, bad: dict[str, object], unreadable: Unreadable
) -> None:
    if ("meta" in bad) != (listen_url == "memory://"):
        pytest.skip("bad meta travels only in memory; undecodable data only over a wire")
    if "data" in bad:
        bad = {"data": {"w": unreadable}}
    async with ScriptedPeer(url=listen_url) as peer, anyio.create_task_group() as group:
        agent = make_agent(peer.url, agent_id="a1", site_name="site-1")
        stream = await peer.start_agent(agent, group)  # type: ignore[arg-type]
        await stream.send(assign("bad", **bad))
        result = await peer.receive_until(stream, Result)
        assert (result.task_id, result.return_code) == ("bad", RC.BAD_TASK_DATA)
        await stream.send(ResultAck(task_id="bad", accepted=True))
        await stream.send(assign("good", 5))
        task = await agent.get_task(timeout=5)
        assert task is not None and task.task_id == "good"
        await agent.stop()


async def test_payloads_that_cannot_be_sent_are_refused_where_they_are_given(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (site, agent), anyio.create_task_group() as g:
        g.start_soon(site.run_task, "agent-1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        with pytest.raises(TypeError, match=r"result.data\['w'\] is of type set"):
            await agent.submit_result(TaskResult({}, {"w": {1, 2}}))
        with pytest.raises(TypeError, match=r"log value 'loss' is of type complex"):
            await agent.log("loss", 1j)
        assert await agent.submit_result(OK)  # nothing changed: the task still takes a result


async def test_a_log_records_data_type_and_options_reach_the_site_as_sent(
    make_agent: MakeAgent, listen_url: str
) -> None:
    records: list[LogRecord] = []
    site = FlareSite("site-1", on_log=records.append)
    async with anyio.create_task_group() as group, site:
        url = await site.listen(listen_url)
        async with make_agent(url, agent_id="a1", site_name="site-1") as agent:
            group.start_soon(site.run_task, "a1", "train", 1)
            assert await agent.get_task(timeout=5) is not None
            options = {"writer": "MLFLOW", "global_step": 4, "weights": np.arange(3.0)}
            await agent.log("acc", {"top1": 0.5}, 4, data_type="METRICS", options=options)
            await agent.log("loss", 0.25)
            with pytest.raises(TypeError, match="options"):
                await agent.log("loss", 0.25, options={"bad": 1j})
            assert await agent.submit_result(OK)
    first, second = records
    assert (first.key, first.value, first.step) == ("acc", {"top1": 0.5}, 4)
    assert first.data_type == "METRICS"
    assert (first.options["writer"], first.options["global_step"]) == ("MLFLOW", 4)
    np.testing.assert_array_equal(first.options["weights"], np.arange(3.0))
    assert (second.data_type, second.options) == (None, {})


async def test_tasks_iterates_until_the_site_says_goodbye(
    make_agent: MakeAgent, listen_url: str
) -> None:
    seen: list[int] = []
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen(listen_url)

        async def trainer() -> None:
            async with make_agent(url, agent_id="a1", site_name="site-1") as agent:
                async for task in agent.tasks():
                    seen.append(task.data)
                    await agent.submit_result(TaskResult({}, {"y": task.data * 10}))

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=10)
        results = [await site.run_task("a1", "train", n) for n in range(3)]
    assert seen == [0, 1, 2]
    assert [result.data for result in results] == [{"y": 0}, {"y": 10}, {"y": 20}]


async def test_start_twice_is_a_call_state_error(make_agent: MakeAgent, listen_url: str) -> None:
    async with connected(make_agent, listen_url) as (_, agent):
        with pytest.raises(CallStateError, match="already started"):
            await agent.start()


async def test_stop_is_idempotent_and_a_stopped_agent_is_closed(
    make_agent: MakeAgent, listen_url: str
) -> None:
    async with connected(make_agent, listen_url) as (_, agent):
        await agent.stop()
        await agent.stop()
        with pytest.raises(AgentClosed):
            await agent.get_task(timeout=1)
