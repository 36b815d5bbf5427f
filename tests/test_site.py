"""FlareSite: accepting agents, running tasks, collecting results, and surviving bad peers."""

from __future__ import annotations

import contextlib
import gc
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import ObjectStream, TaskGroup

from flare_agent_async import (
    AgentClosed,
    AgentGone,
    AsyncFlareAgent,
    CallStateError,
    Coming,
    ConnectionRejected,
    FlareSite,
    HeldResult,
    LogRecord,
    Task,
    TaskAborted,
    TaskLost,
    TaskResult,
    UnknownAgent,
)
from flare_agent_async.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Bye,
    Hello,
    Message,
    Part,
    Reject,
    Result,
    ResultAck,
    SiteTask,
    TaskAck,
    TaskAssign,
    Welcome,
)
from flare_agent_async.testing import FaultyConnector, site_and_agent
from flare_agent_async.transports import (
    MemoryListener,
    MessageStream,
    connector_for,
    memory_stream_pair,
)

pytestmark = pytest.mark.anyio

OK = TaskResult({}, {"ok": True})


def hello(agent_id: str = "raw", **fields: object) -> Hello:
    values: dict[str, object] = {
        "protocol_version": PROTOCOL_VERSION,
        "agent_id": agent_id,
        "site_name": "site-1",
        "instance_id": "i1",
    }
    values.update(fields)
    return Hello(**values)  # type: ignore[arg-type]


async def raw_agent(url: str, agent_id: str = "raw") -> MessageStream:
    """A hand-driven agent connection, welcomed."""
    stream = await connector_for(url).connect()
    await stream.send(hello(agent_id))
    assert isinstance(await stream.receive(), Welcome)
    return stream


async def test_listen_returns_the_bound_url_and_rejects_unknown_schemes() -> None:
    async with FlareSite("site-1") as site:
        assert (await site.listen("memory://bound-url-test")) == "memory://bound-url-test"
        assert (await site.listen("memory://")).startswith("memory://anonymous-")
        with pytest.raises(ValueError, match=r"scheme 'carrier'.*known: .*memory"):
            await site.listen("carrier://pigeon")
        with pytest.raises(ValueError, match="not a transport URL"):
            await site.listen("just-a-name")


async def test_calls_outside_async_with_are_call_state_errors() -> None:
    site = FlareSite("site-1")
    with pytest.raises(CallStateError, match="not running"):
        await site.run_task("a1", "train", 1)
    with pytest.raises(CallStateError, match="not running"):
        await site.listen("memory://")


async def test_wait_for_agent_times_out_and_returns_when_the_agent_connects() -> None:
    async with site_and_agent(agent_id="a1") as (site, _):
        await site.wait_for_agent("a1", timeout=5)
        assert site.agents == frozenset({"a1"})
        with pytest.raises(TimeoutError):
            await site.wait_for_agent("nobody", timeout=0.01)


async def test_run_task_on_an_unknown_agent_or_with_bad_arguments() -> None:
    async with site_and_agent() as (site, _):
        with pytest.raises(UnknownAgent, match="wait_for_agent"):
            await site.run_task("nobody", "train", 1)
        with pytest.raises(TypeError, match="meta must be a dict"):
            await site.run_task("agent-1", "train", 1, meta=[1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="task_name must be str"):
            await site.run_task("agent-1", 5, 1)  # type: ignore[arg-type]


async def test_run_task_returns_the_agents_result_with_meta_and_return_code() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:

        async def trainer() -> None:
            task = await agent.get_task()
            assert task is not None
            assert (task.task_name, task.meta, task.data) == ("train", {"round": 3}, [1, 2])
            await agent.submit_result(TaskResult({"n": 2}, {"sum": 3}, "CUSTOM"))

        group.start_soon(trainer)
        result = await site.run_task("agent-1", "train", [1, 2], {"round": 3}, task_id="t-1")
        assert (result.meta, result.data, result.return_code) == ({"n": 2}, {"sum": 3}, "CUSTOM")
        with pytest.raises(ValueError, match="already used"):
            await site.run_task("agent-1", "train", 1, task_id="t-1")


async def test_a_run_task_timeout_aborts_the_task_at_the_agent() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        fetched: list[Task] = []

        async def trainer() -> None:
            task = await agent.get_task()
            assert task is not None
            fetched.append(task)
            await task.wait_aborted()

        group.start_soon(trainer)
        with pytest.raises(TimeoutError):
            await site.run_task("agent-1", "train", 1, timeout=0.05)
        with anyio.fail_after(5):
            while not (fetched and fetched[0].aborted):
                await anyio.wait_all_tasks_blocked()
        assert await agent.submit_result(OK) is False


async def test_cancelling_run_task_aborts_the_task_at_the_agent() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        with anyio.CancelScope() as scope:
            group.start_soon(lambda: agent.get_task())
            await anyio.wait_all_tasks_blocked()

            async def cancel_when_fetched() -> None:
                await anyio.wait_all_tasks_blocked()
                scope.cancel()

            group.start_soon(cancel_when_fetched)
            await site.run_task("agent-1", "train", 1)
        assert scope.cancelled_caught
        assert await site.abort_task("agent-1", "no-such-task") is False
        await anyio.wait_all_tasks_blocked()
        assert await agent.submit_result(OK) is False  # the fetched task was aborted


async def test_abort_task_ends_run_task_with_task_aborted() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        outcome: list[BaseException] = []

        async def run() -> None:
            with pytest.raises(TaskAborted) as info:
                await site.run_task("agent-1", "train", 1, task_id="t1")
            outcome.append(info.value)

        group.start_soon(run)
        task = await agent.get_task(timeout=5)
        assert task is not None
        assert await site.abort_task("agent-1", "t1") is True
        assert await site.abort_task("agent-1", "t1") is False
        await anyio.wait_all_tasks_blocked()
        assert len(outcome) == 1 and task.aborted


async def test_an_agent_that_stops_ends_its_tasks_with_agent_gone() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        outcome: list[BaseException] = []

        async def run() -> None:
            with pytest.raises(AgentGone, match="goodbye") as info:
                await site.run_task("agent-1", "train", 1)
            outcome.append(info.value)

        group.start_soon(run)
        assert await agent.get_task(timeout=5) is not None
        await agent.stop()
        with anyio.fail_after(5):
            while not outcome:
                await anyio.wait_all_tasks_blocked()
        assert site.agents == frozenset()
        with pytest.raises(AgentGone):
            await site.run_task("agent-1", "train", 2)


async def test_an_agent_that_does_not_come_back_in_time_is_gone() -> None:
    async with FlareSite("site-1", reconnect_timeout=0.05) as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            assert await agent.get_task(timeout=0.01) is None  # connected and idle
            faulty.refuse_connections = True
            await faulty.drop()
            with anyio.fail_after(5), pytest.raises(AgentGone, match="did not reconnect"):
                await site.run_task("a1", "train", 1)


async def test_an_agent_that_comes_back_in_time_gets_its_task() -> None:
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        # The task arrives, but the connection drops before its acknowledgement is sent.
        faulty.drop_before(lambda message: isinstance(message, TaskAck))
        async with AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent:
            async with anyio.create_task_group() as group:
                results: list[TaskResult] = []

                async def run() -> None:
                    results.append(await site.run_task("a1", "train", 1))

                group.start_soon(run)
                task = await agent.get_task(timeout=5)
                assert task is not None
                assert await agent.submit_result(OK)
                assert await agent.get_task(timeout=0.05) is None  # the resend is not a new task
            assert len(results) == 1
            assert faulty.connections == 2


async def test_a_restarted_agent_gets_the_unfinished_task_again() -> None:
    async with FlareSite("site-1") as site, anyio.create_task_group() as group:
        url = await site.listen("memory://")
        faulty = FaultyConnector(connector_for(url))
        first = AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1", reconnect_timeout=0.01)
        await first.start()
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task("a1", "train", 7))

        group.start_soon(run)
        assert await first.get_task(timeout=5) is not None
        faulty.refuse_connections = True  # the first process dies with its task
        await faulty.drop()
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as second:
            task = await second.get_task(timeout=5)
            assert task is not None and task.data == 7
            assert await second.submit_result(TaskResult({}, {"by": "second"}))
        await first.stop()
    assert [result.data for result in results] == [{"by": "second"}]


async def test_without_keep_task_data_a_restarted_agent_loses_its_task() -> None:
    async with FlareSite("site-1", keep_task_data=False) as site:
        url = await site.listen("memory://")
        faulty = FaultyConnector(connector_for(url))
        first = AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1", reconnect_timeout=0.01)
        await first.start()
        async with anyio.create_task_group() as group:
            errors: list[Exception] = []

            async def run() -> None:
                try:
                    await site.run_task("a1", "train", 7)
                except TaskLost as exc:
                    errors.append(exc)

            # The first process dies with its task, right after saying it has it.
            faulty.refuse_connections = True
            faulty.drop_after(lambda message: isinstance(message, TaskAck))
            group.start_soon(run)
            assert await first.get_task(timeout=5) is not None
            with anyio.fail_after(10):
                while not faulty.sent["TaskAck"]:
                    await anyio.wait_all_tasks_blocked()
            await anyio.wait_all_tasks_blocked()  # the site has read the ack, and the close
            async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as second:
                with anyio.fail_after(10):
                    while not errors:
                        await anyio.wait_all_tasks_blocked()
                assert "restarted" in str(errors[0])
                assert await second.get_task(timeout=0.05) is None  # nothing sent again
        await first.stop()


async def test_without_keep_task_data_the_site_lets_go_of_the_data_once_the_agent_has_it() -> None:
    site = FlareSite("site-1", keep_task_data=False)
    async with site, anyio.create_task_group() as group:
        url = await site.listen("tcp://127.0.0.1:0")  # a wire: the agent gets arrays of its own
        box = [{"w": np.arange(1000, dtype=np.float32)}]
        gone = weakref.ref(box[0]["w"])
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task("a1", "train", box.pop()))

        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
            group.start_soon(run)
            task = await agent.get_task(timeout=10)
            assert task is not None
            for _ in range(1000):  # bounded polling, 10 s: until the site has the agent's ack
                gc.collect()
                if gone() is None:
                    break
                await anyio.sleep(0.01)
            assert gone() is None, "the site still holds the task's data after the agent's ack"
            assert await agent.submit_result(TaskResult({}, {"w": task.data["w"] + 1}))
        assert float(results[0].data["w"][-1]) == 1000.0


@pytest.mark.parametrize(
    ("agent_options", "reason"),
    [
        ({"site_name": "site-2"}, "this is site 'site-1', not 'site-2'"),
        ({"site_name": "site-1", "job_id": "job-9"}, "runs job 'job-1', not 'job-9'"),
    ],
)
async def test_a_wrong_hello_is_rejected_with_a_clear_reason(
    agent_options: dict[str, str], reason: str
) -> None:
    async with FlareSite("site-1", job_id="job-1") as site:
        url = await site.listen("memory://")
        agent = AsyncFlareAgent(url, agent_id="a1", **agent_options)
        with pytest.raises(ConnectionRejected, match=reason):
            await agent.start()
        assert site.rejected_hellos == 1
        with pytest.raises(AgentClosed):
            await agent.get_task(timeout=1)


async def test_a_wrong_protocol_version_is_rejected_naming_both_versions() -> None:
    async with FlareSite("site-1") as site:
        stream = await connector_for(await site.listen("memory://")).connect()
        await stream.send(hello(protocol_version=99))
        reject = await stream.receive()
        assert isinstance(reject, Reject)
        assert f"version 99, this site speaks version {PROTOCOL_VERSION}" in reject.reason
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        await stream.aclose()


async def test_a_connection_that_does_not_say_hello_is_dropped() -> None:
    async with FlareSite("site-1", hello_timeout=0.05) as site:
        url = await site.listen("memory://")
        silent = await connector_for(url).connect()
        wrong = await connector_for(url).connect()
        await wrong.send(TaskAck(task_id="x"))
        reject = await wrong.receive()
        assert isinstance(reject, Reject) and "expected a hello" in reject.reason
        with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
            await silent.receive()
        assert site.rejected_hellos == 2
        await silent.aclose()
        await wrong.aclose()


async def test_a_result_for_a_task_not_assigned_to_the_agent_is_refused() -> None:
    async with site_and_agent(agent_id="a1") as (site, agent), anyio.create_task_group() as group:
        group.start_soon(partial(site.run_task, "a1", "train", 1, task_id="t-a1"))
        assert await agent.get_task(timeout=5) is not None
        intruder = await raw_agent(site._listeners[0].url, agent_id="intruder")
        await intruder.send(Result(task_id="t-a1", return_code="OK", meta={}, data="forged"))
        ack = await intruder.receive()
        assert isinstance(ack, ResultAck) and not ack.accepted
        assert "not assigned to agent 'intruder'" in ack.reason
        assert await agent.submit_result(TaskResult({}, "genuine"))
        await intruder.aclose()


async def test_a_peer_that_breaks_the_protocol_loses_only_its_connection() -> None:
    async with site_and_agent(agent_id="a1") as (site, agent), anyio.create_task_group() as group:
        rogue = await raw_agent(site._listeners[0].url, agent_id="rogue")
        await rogue.send(
            Welcome(protocol_version=1, site_name="x", heartbeat_interval=1, heartbeat_timeout=2)
        )
        with anyio.fail_after(5):
            bye = await rogue.receive()
            while not isinstance(bye, Bye):
                bye = await rogue.receive()
        assert "unexpected Welcome message from agent 'rogue'" in bye.reason
        await rogue.aclose()
        group.start_soon(site.run_task, "a1", "train", 1)
        assert await agent.get_task(timeout=5) is not None
        assert await agent.submit_result(OK)


async def test_a_second_connection_with_the_same_agent_id_replaces_the_first() -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        first = await raw_agent(url, agent_id="a1")
        second = await raw_agent(url, agent_id="a1")
        with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
            await first.receive()
        async with anyio.create_task_group() as group:
            group.start_soon(partial(site.run_task, "a1", "train", 1, task_id="t1"))
            assign = await second.receive()
            assert isinstance(assign, TaskAssign) and assign.task_id == "t1"
            await second.send(Result(task_id="t1", return_code="OK", meta={}, data=None))
        await first.aclose()
        await second.aclose()


async def test_log_records_reach_on_log() -> None:
    records: list[LogRecord] = []
    options = {"on_log": records.append}
    async with (
        site_and_agent(site_options=options) as (site, agent),
        anyio.create_task_group() as g,
    ):
        g.start_soon(partial(site.run_task, "agent-1", "train", 1, task_id="t1"))
        assert await agent.get_task(timeout=5) is not None
        await agent.log("loss", 0.25, step=3)
        assert await agent.submit_result(OK)
    assert records == [LogRecord("agent-1", "loss", 0.25, 3, "t1")]


async def test_leaving_the_site_says_goodbye_to_every_agent() -> None:
    closed: list[str] = []
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen("memory://")

        async def agent(agent_id: str) -> None:
            async with AsyncFlareAgent(url, agent_id=agent_id, site_name="site-1") as flare:
                with pytest.raises(AgentClosed, match="goodbye"):
                    await flare.get_task()
                closed.append(agent_id)

        for n in range(3):
            group.start_soon(agent, f"a{n}")
        for n in range(3):
            await site.wait_for_agent(f"a{n}", timeout=5)
    assert sorted(closed) == ["a0", "a1", "a2"]


async def test_fifty_agents_twenty_tasks_each_every_result_exactly_once() -> None:
    agents, rounds = 50, 20
    trained: Counter[str] = Counter()
    results: Counter[str] = Counter()
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen("memory://")

        async def trainer(agent_id: str) -> None:
            async with AsyncFlareAgent(url, agent_id=agent_id, site_name="site-1") as agent:
                async for task in agent.tasks():
                    trained[task.task_id] += 1
                    await agent.submit_result(TaskResult({}, {"echo": task.data}))

        async def drive(agent_id: str) -> None:
            await site.wait_for_agent(agent_id, timeout=10)
            for n in range(rounds):
                task_id = f"{agent_id}/{n}"
                result = await site.run_task(agent_id, "train", task_id, task_id=task_id)
                assert result.data == {"echo": task_id}
                results[task_id] += 1

        for n in range(agents):
            group.start_soon(trainer, f"a{n}")
        with anyio.fail_after(60):
            async with anyio.create_task_group() as drivers:
                for n in range(agents):
                    drivers.start_soon(drive, f"a{n}")
    expected = {f"a{a}/{n}" for a in range(agents) for n in range(rounds)}
    assert set(results) == expected and set(results.values()) == {1}
    assert set(trained) == expected and set(trained.values()) == {1}


async def test_an_on_log_callback_that_raises_costs_nothing_but_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(record: LogRecord) -> None:
        raise ValueError("callback bug")

    async with site_and_agent(site_options={"on_log": broken}) as (site, agent):
        async with anyio.create_task_group() as group:
            group.start_soon(site.run_task, "agent-1", "train", 1)
            assert await agent.get_task(timeout=5) is not None
            await agent.log("loss", 1.0)
            assert await agent.submit_result(OK)
        assert site.agents == frozenset({"agent-1"})
    assert "on_log failed" in caplog.text and "callback bug" in caplog.text


async def test_a_cancelled_abort_task_still_ends_run_task() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        outcome: list[TaskAborted] = []

        async def run() -> None:
            with pytest.raises(TaskAborted) as info:
                await site.run_task("agent-1", "train", 1, task_id="t1")
            outcome.append(info.value)

        group.start_soon(run)
        assert await agent.get_task(timeout=5) is not None
        with anyio.CancelScope() as scope:
            scope.cancel()
            await site.abort_task("agent-1", "t1")
        with anyio.fail_after(5):
            while not outcome:
                await anyio.wait_all_tasks_blocked()


async def test_wait_for_agent_ends_when_the_site_closes() -> None:
    errors: list[CallStateError] = []
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:

        async def wait() -> None:
            with pytest.raises(CallStateError, match="closed while waiting") as info:
                await site.wait_for_agent("never")
            errors.append(info.value)

        group.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
    assert len(errors) == 1


class _LateHello(ObjectStream[Message]):
    """The site's end of a connection whose hello arrives at a set time."""

    def __init__(self, inner: MessageStream, at: float) -> None:
        self._inner, self._at, self._first = inner, at, True

    async def receive(self) -> Message:
        if self._first:
            self._first = False
            await anyio.sleep_until(self._at)
            return hello("a1")
        return await self._inner.receive()

    async def send(self, item: Message) -> None:
        await self._inner.send(item)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_reconnect_in_the_instant_of_the_expiry_keeps_the_site_and_the_agent() -> None:
    listener = MemoryListener()
    async with FlareSite("site-1", reconnect_timeout=0.2) as site:
        await site.listen(listener)
        first = await connector_for(listener.url).connect()
        await first.send(hello("a1"))
        assert isinstance(await first.receive(), Welcome)
        await first.aclose()  # disconnected: the expiry timer starts
        await anyio.wait_all_tasks_blocked()
        mine, theirs = memory_stream_pair()
        listener._accept_send.send_nowait(_LateHello(theirs, anyio.current_time() + 0.05))
        await anyio.wait_all_tasks_blocked()
        # Block the loop until both the hello's and the expiry's timers are due, so that they
        # fire in one iteration: the reconnect cancels an expiry whose sleep already ended.
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
        with anyio.fail_after(5):
            assert isinstance(await mine.receive(), Welcome)
            await anyio.wait_all_tasks_blocked()
        assert site.agents == frozenset({"a1"})
        await mine.aclose()


# -- results that hold back their arrays ----------------------------------------------------------

HELD = {"w": np.arange(200_000, dtype=np.float32), "n": 5, "b": np.ones((3, 4))}


async def held_result(
    site: FlareSite, agent: AsyncFlareAgent, group: TaskGroup
) -> tuple[HeldResult, list[bool]]:
    """Run a task that holds arrays; returns its result, and the list the agent's
    ``submit_result`` outcome lands in once it returns."""
    submitted: list[bool] = []

    async def trainer() -> None:
        task = await agent.get_task()
        assert task is not None
        submitted.append(await agent.submit_result(TaskResult({"m": 1}, dict(HELD))))

    group.start_soon(trainer)
    result = await site.run_task(agent.agent_id, "train", None, hold_arrays=True)
    assert isinstance(result, HeldResult)
    return result, submitted


@pytest.mark.parametrize("scheme", ["memory", "tcp"])
async def test_a_held_result_sends_each_array_when_fetched_and_is_settled_by_its_release(
    scheme: str,
) -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://" if scheme == "memory" else "tcp://127.0.0.1:0")
        async with (
            AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent,
            anyio.create_task_group() as group,
        ):
            result, submitted = await held_result(site, agent, group)
            assert result.held == ("w", "b")
            assert result.held_nbytes == {"w": 800_000, "b": 96}  # known before any fetch
            assert (result.meta, result.data) == ({"m": 1}, {"w": None, "n": 5, "b": None})
            for key in reversed(result.held):
                np.testing.assert_array_equal(await result.fetch(key), HELD[key])
            np.testing.assert_array_equal(await result.fetch("w"), HELD["w"])  # again
            await anyio.wait_all_tasks_blocked()
            assert submitted == []
            await result.release()
        assert submitted == [True]
        with pytest.raises(CallStateError, match="released"):
            await result.fetch("w")


async def test_a_held_result_released_on_error_is_refused_at_the_agent() -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        result, submitted = await held_result(site, agent, group)

        async def take_and_fail() -> None:
            async with result:
                await result.fetch("b")
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            await take_and_fail()
        assert result.released
    assert submitted == [False]


async def test_a_held_result_that_arrives_as_its_call_is_cancelled_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with site_and_agent() as (site, agent), anyio.create_task_group() as group:
        submitted: list[bool] = []
        returned = anyio.Event()

        async def trainer() -> None:
            assert await agent.get_task() is not None
            submitted.append(await agent.submit_result(TaskResult({}, dict(HELD))))
            returned.set()

        group.start_soon(trainer)
        caller = anyio.CancelScope()
        finished = site._finished

        def cancelled_then_finished(ended: list[SiteTask]) -> None:
            if any(item.result for item in ended if isinstance(item, SiteTask)):
                caller.cancel()  # the caller gives up, and in the same turn the result is in
            finished(ended)

        monkeypatch.setattr(site, "_finished", cancelled_then_finished)
        with anyio.fail_after(10):
            with caller:
                await site.run_task(agent.agent_id, "train", None, hold_arrays=True)
            assert caller.cancelled_caught
            # Nobody will fetch or release what the agent holds back: the site refuses the
            # result at once, and the agent's submit_result returns instead of waiting.
            await returned.wait()
        assert submitted == [False]


async def test_a_cancelled_fetch_loses_nothing_and_a_fetch_survives_a_reconnect() -> None:
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        # The first request for the array arrives, and the connection drops before the answer.
        faulty.drop_before(lambda message: isinstance(message, Part))
        async with (
            AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent,
            anyio.create_task_group() as group,
        ):
            result, submitted = await held_result(site, agent, group)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await result.fetch("w")
            assert scope.cancelled_caught
            with anyio.fail_after(10):
                array = await result.fetch("w")
            np.testing.assert_array_equal(array, HELD["w"])
            assert faulty.connections == 2
            await result.release()
        assert submitted == [True]


async def test_an_agent_that_does_not_come_back_fails_the_open_fetch_with_agent_gone() -> None:
    async with FlareSite("site-1", reconnect_timeout=0.2) as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        async with (
            # Its stop waits for the unsettled result no longer than this.
            AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1", close_timeout=0.1) as agent,
            anyio.create_task_group() as group,
        ):
            result, submitted = await held_result(site, agent, group)
            faulty.drop_before(lambda message: isinstance(message, Part))
            faulty.refuse_connections = True
            with anyio.fail_after(10), pytest.raises(AgentGone, match="did not reconnect"):
                await result.fetch("w")
            with pytest.raises(AgentGone, match="did not reconnect"):
                await result.fetch("b")
            await agent.stop()
        assert submitted == [False]


async def test_fetches_of_one_key_at_once_share_a_request_and_one_may_give_up() -> None:
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        async with (
            AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent,
            anyio.create_task_group() as group,
        ):
            result, submitted = await held_result(site, agent, group)
            # The answer is lost with its connection: both wait while the agent reconnects.
            faulty.drop_before(lambda message: isinstance(message, Part))
            gate = faulty.connect_gate = anyio.Event()
            arrays: list[np.ndarray] = []
            first = anyio.CancelScope()

            async def fetch(scope: anyio.CancelScope) -> None:
                with scope:
                    arrays.append(await result.fetch("w"))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as fetches:
                    fetches.start_soon(fetch, first)
                    fetches.start_soon(fetch, anyio.CancelScope())
                    await anyio.wait_all_tasks_blocked()  # both wait; the agent reconnects
                    first.cancel()
                    await anyio.wait_all_tasks_blocked()
                    gate.set()
            assert first.cancelled_caught and len(arrays) == 1
            np.testing.assert_array_equal(arrays[0], HELD["w"])
            assert faulty.connections == 2
            await result.release()
        assert submitted == [True]


# -- tasks whose entries come after them ----------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_site(**options: Any) -> AsyncIterator[tuple[FlareSite, MessageStream]]:
    """A running site, and a hand-driven agent connection to it, welcomed."""
    async with FlareSite("site-1", **options) as site:
        stream = await raw_agent(await site.listen("memory://"))
        async with stream:
            yield site, stream


def entries() -> tuple[
    anyio.abc.ObjectSendStream[tuple[str, object]],
    anyio.abc.ObjectReceiveStream[tuple[str, object]],
]:
    return anyio.create_memory_object_stream[tuple[str, object]]()


async def test_coming_entries_reach_the_agent_each_as_it_comes() -> None:
    w, b = np.arange(6.0), np.ones((2, 2), dtype=np.float32)
    async with raw_site() as (site, stream), anyio.create_task_group() as group:
        give, coming = entries()
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(
                await site.run_task("raw", "train", {"n": 1}, coming=Coming(["w", "b"], coming))
            )

        group.start_soon(run)
        with anyio.fail_after(10), give:
            task = await stream.receive()
            assert isinstance(task, TaskAssign) and task.coming == ["w", "b"]
            assert task.data == {"n": 1, "w": None, "b": None}
            await give.send(("w", w))
            part = await stream.receive()  # before the next entry is even given
            assert isinstance(part, Part) and part.key == "w"
            np.testing.assert_array_equal(part.value, w)
            await give.send(("b", b))
            part = await stream.receive()
            assert isinstance(part, Part) and part.key == "b"
            await stream.send(TaskAck(task_id=task.task_id))
            await stream.send(Result(task_id=task.task_id, return_code="OK", meta={}, data=1))
            assert isinstance(await stream.receive(), ResultAck)
    assert [(result.data, result.return_code) for result in results] == [(1, "OK")]


@pytest.mark.parametrize("scheme", ["memory", "tcp"])
async def test_a_trainer_gets_a_task_once_its_coming_entries_came(scheme: str) -> None:
    w = np.arange(300_000, dtype=np.float32)  # large: read straight into the array
    async with FlareSite("site-1", keep_task_data=False) as site:
        url = await site.listen("memory://" if scheme == "memory" else "tcp://127.0.0.1:0")
        async with (
            AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent,
            anyio.create_task_group() as group,
        ):
            give, coming = entries()

            async def trainer() -> None:
                task = await agent.get_task()
                assert task is not None and list(task.data) == ["n", "w", "b"]
                np.testing.assert_array_equal(task.data["w"], w)
                await agent.submit_result(TaskResult({}, {"sum": float(task.data["w"].sum())}))

            async def download() -> None:
                async with give:
                    await give.send(("b", "bias"))
                    await give.send(("w", w))

            group.start_soon(trainer)
            group.start_soon(download)
            with anyio.fail_after(20):
                data = {"n": 1, "w": None}
                result = await site.run_task("a1", "train", data, coming=Coming(["w", "b"], coming))
            assert result.data == {"sum": float(w.sum())}


async def test_entries_the_site_let_go_of_once_the_agent_had_them_all_count_as_come() -> None:
    async with raw_site(keep_task_data=False) as (site, stream), anyio.create_task_group() as group:
        give, coming = entries()
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task("raw", "train", {}, coming=Coming(["w"], coming)))

        group.start_soon(run)
        with anyio.fail_after(10):
            async with give:
                task = await stream.receive()
                await give.send(("w", 1))
                assert isinstance(await stream.receive(), Part)
                await stream.send(TaskAck(task_id=task.task_id))  # the site lets go of "w"
                await anyio.wait_all_tasks_blocked()
            await anyio.wait_all_tasks_blocked()  # the site saw the end of the entries
            await stream.send(Result(task_id=task.task_id, return_code="OK", meta={}, data=2))
            assert isinstance(await stream.receive(), ResultAck)
    assert [result.data for result in results] == [2]


@pytest.mark.parametrize("failure", ["short", "raises", "unsendable"])
async def test_coming_entries_that_end_short_or_fail_abort_the_task(failure: str) -> None:
    async with raw_site() as (site, stream):

        async def download() -> AsyncIterator[tuple[str, object]]:
            yield "w", 1
            if failure == "raises":
                raise ConnectionError("the server went away")
            if failure == "unsendable":
                yield "b", object()

        expected = {
            "short": (ValueError, r"the entries \['b'\] of task 't1' never came"),
            "raises": (ConnectionError, "the server went away"),
            "unsendable": (TypeError, r"data\['b'\]"),
        }[failure]
        with anyio.fail_after(10), pytest.raises(expected[0], match=expected[1]):
            await site.run_task(
                "raw", "train", {}, task_id="t1", coming=Coming(["w", "b"], download())
            )
        with anyio.fail_after(10):
            received = [await stream.receive() for _ in range(3)]
        assert [type(message) for message in received] == [TaskAssign, Part, Abort]


async def test_a_task_that_ends_while_its_entries_come_closes_them() -> None:
    async with raw_site() as (site, stream):
        give, coming = entries()
        with anyio.move_on_after(0.05) as scope:  # the caller gives up: the task is aborted
            await site.run_task("raw", "train", {}, task_id="t1", coming=Coming(["w"], coming))
        assert scope.cancelled_caught
        with give, pytest.raises(anyio.BrokenResourceError):  # the downloader learns at once
            await give.send(("w", 1))
        with anyio.fail_after(10):
            assert isinstance(await stream.receive(), TaskAssign)
            assert await stream.receive() == Abort(task_id="t1")


@pytest.mark.parametrize("keep_task_data", [True, False])
async def test_a_reconnect_while_entries_come_sends_the_task_and_them_again(
    keep_task_data: bool,
) -> None:
    async with FlareSite("site-1", keep_task_data=keep_task_data) as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        faulty.drop_on_receive(lambda message: isinstance(message, Part) and message.key == "b")
        async with (
            AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1") as agent,
            anyio.create_task_group() as group,
        ):
            give, coming = entries()

            async def trainer() -> None:
                task = await agent.get_task()
                assert task is not None and task.data == {"w": "w", "b": "b", "c": "c"}
                await agent.submit_result(OK)

            async def download() -> None:
                async with give:
                    for key in "wbc":
                        await give.send((key, key))

            group.start_soon(trainer)
            group.start_soon(download)
            with anyio.fail_after(20):
                result = await site.run_task(
                    "a1", "train", {}, coming=Coming(["w", "b", "c"], coming)
                )
        assert result.data == OK.data
        assert faulty.connections == 2
        # "w" comes again if the site keeps it, or if its acknowledgement was lost with the
        # connection; the agent kept it either way.
        assert faulty.received["Part"] in ((4,) if keep_task_data else (3, 4))
