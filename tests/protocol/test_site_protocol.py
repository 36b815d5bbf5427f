"""The site's sans-IO session, driven by hand, and whole agent-site conversations in memory."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flare_agent_async.defs import RC, TaskResult
from flare_agent_async.exceptions import (
    AgentGone,
    CallStateError,
    ProtocolError,
    RemoteProtocolError,
    TaskLost,
)
from flare_agent_async.exceptions import TaskAborted as TaskAbortedError
from flare_agent_async.protocol import (
    PROTOCOL_VERSION,
    Abort,
    AgentProtocol,
    AgentState,
    BadTaskReceived,
    Bye,
    FetchEnded,
    Heartbeat,
    Hello,
    Log,
    LogReceived,
    LogRecord,
    Message,
    Part,
    PartAck,
    PartRequest,
    Result,
    ResultAck,
    ResultRefused,
    SessionState,
    SiteConfig,
    SiteSession,
    SiteTask,
    Submission,
    TaskAck,
    TaskAssign,
    TaskFinished,
    Welcome,
    check_hello,
)

AGENT_ID = "agent-1"
SITE = "site-1"
JOB = "job-1"
CONFIG = SiteConfig(SITE, job_id=JOB, heartbeat_interval=2.0, heartbeat_timeout=9.0)


# -- helpers --------------------------------------------------------------------------------------


def hello(
    *,
    protocol_version: int = PROTOCOL_VERSION,
    agent_id: str = AGENT_ID,
    site_name: str = SITE,
    job_id: str | None = JOB,
    instance_id: str = "instance-1",
) -> Hello:
    return Hello(
        protocol_version=protocol_version,
        agent_id=agent_id,
        site_name=site_name,
        job_id=job_id,
        instance_id=instance_id,
    )


WELCOME = Welcome(
    protocol_version=PROTOCOL_VERSION,
    site_name=SITE,
    heartbeat_interval=2.0,
    heartbeat_timeout=9.0,
)


def connected_session(instance_id: str = "instance-1", config: SiteConfig = CONFIG) -> SiteSession:
    session = SiteSession(AGENT_ID, config)
    session.connection_made(hello(instance_id=instance_id))
    assert session.data_to_send() == [WELCOME]
    return session


def assign(session: SiteSession, task_id: str, data: Any = None) -> SiteTask:
    task, _ = session.assign(task_id, "train", {"round": 1}, {"w": 1} if data is None else data)
    return task


def result(task_id: str, data: Any = None, meta: Any = None, rc: Any = RC.OK) -> Result:
    return Result(
        task_id=task_id,
        return_code=rc,
        meta={"m": 1} if meta is None else meta,
        data={"w": 2} if data is None else data,
    )


# -- check_hello ----------------------------------------------------------------------------------


def test_check_hello_accepts_a_good_hello() -> None:
    assert check_hello(hello(), CONFIG) is None


def test_check_hello_accepts_agent_without_job_id_at_site_with_job_id() -> None:
    assert check_hello(hello(job_id=None), CONFIG) is None


def test_check_hello_accepts_agent_without_job_id_at_site_without_job_id() -> None:
    assert check_hello(hello(job_id=None), SiteConfig(SITE)) is None


def test_check_hello_rejects_wrong_protocol_version() -> None:
    reason = check_hello(hello(protocol_version=99), CONFIG)
    assert reason is not None
    assert "version 99" in reason
    assert f"version {PROTOCOL_VERSION}" in reason


def test_check_hello_rejects_wrong_site_name() -> None:
    reason = check_hello(hello(site_name="other-site"), CONFIG)
    assert reason is not None
    assert "'other-site'" in reason
    assert f"'{SITE}'" in reason


def test_check_hello_rejects_wrong_job_id() -> None:
    reason = check_hello(hello(job_id="job-2"), CONFIG)
    assert reason is not None
    assert "'job-2'" in reason
    assert f"'{JOB}'" in reason


def test_check_hello_rejects_job_id_at_site_without_job() -> None:
    reason = check_hello(hello(job_id="job-2"), SiteConfig(SITE))
    assert reason is not None
    assert "'job-2'" in reason


def test_check_hello_rejects_empty_agent_id() -> None:
    reason = check_hello(hello(agent_id=""), CONFIG)
    assert reason is not None
    assert "agent id" in reason


# -- connections and assignment -------------------------------------------------------------------


def test_connection_made_queues_welcome_with_site_config() -> None:
    session = SiteSession(AGENT_ID, CONFIG)
    assert session.state is SessionState.DISCONNECTED
    assert session.data_to_send() == []

    session.connection_made(hello(instance_id="abc"))

    assert session.state is SessionState.CONNECTED
    assert session.instance_id == "abc"
    assert session.data_to_send() == [
        Welcome(
            protocol_version=PROTOCOL_VERSION,
            site_name=SITE,
            heartbeat_interval=2.0,
            heartbeat_timeout=9.0,
        )
    ]
    assert session.data_to_send() == []


def test_assign_queues_task_assign() -> None:
    session = connected_session()

    task, superseded = session.assign("t1", "train", {"round": 3}, {"w": [1, 2]})

    assert superseded == []
    assert session.data_to_send() == [
        TaskAssign(task_id="t1", task_name="train", meta={"round": 3}, data={"w": [1, 2]})
    ]
    assert task.task_id == "t1"
    assert task.agent_id == AGENT_ID
    assert not task.acked
    assert not task.done
    assert session.unfinished == 1
    assert session.receive(TaskAck(task_id="t1")) == []
    assert task.acked
    assert session.receive(TaskAck(task_id="unknown")) == []


def test_assign_while_disconnected_is_sent_on_connection() -> None:
    session = SiteSession(AGENT_ID, CONFIG)
    task = assign(session, "t1")
    assert session.data_to_send() == []

    session.connection_made(hello())

    assert session.data_to_send() == [WELCOME, task.message]


def test_assign_with_outstanding_task_id_raises_value_error() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.data_to_send()

    with pytest.raises(ValueError, match="'t1'"):
        assign(session, "t1")

    assert not task.done
    assert session.unfinished == 1
    assert session.data_to_send() == []


def test_assign_with_finished_task_id_raises_value_error() -> None:
    session = connected_session()
    assign(session, "t1")
    session.receive(result("t1"))
    assign(session, "t2")
    session.abort("t2")

    with pytest.raises(ValueError, match="already used"):
        assign(session, "t1")
    with pytest.raises(ValueError, match="already used"):
        assign(session, "t2")


def test_assigning_a_second_task_supersedes_the_first() -> None:
    session = connected_session()
    first = assign(session, "t1")
    session.data_to_send()

    second, superseded = session.assign("t2", "train", {}, None)

    assert superseded == [first]
    assert first.done
    assert first.result is None
    assert isinstance(first.error, TaskAbortedError)
    assert "superseded" in str(first.error)
    assert not second.done
    assert session.unfinished == 1
    assert session.data_to_send() == [Abort(task_id="t1"), second.message]


def test_result_for_outstanding_task_finishes_it() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.data_to_send()

    events = session.receive(result("t1", data={"w": 5}, meta={"n": 10}))

    assert events == [TaskFinished(task)]
    assert task.done
    assert task.error is None
    assert isinstance(task.result, TaskResult)
    assert task.result.return_code == RC.OK
    assert task.result.meta == {"n": 10}
    assert task.result.data == {"w": 5}
    assert session.data_to_send() == [ResultAck(task_id="t1", accepted=True)]
    assert session.unfinished == 0


def test_resent_duplicate_result_is_acked_again_without_second_finish() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.receive(result("t1", data={"w": 5}))
    first_result = task.result
    session.data_to_send()

    events = session.receive(result("t1", data={"w": 6}))

    assert events == []
    [ack] = session.data_to_send()
    assert isinstance(ack, ResultAck)
    assert ack.task_id == "t1"
    assert ack.accepted is True
    assert task.result is first_result
    assert task.result is not None
    assert task.result.data == {"w": 5}


def test_result_for_task_never_assigned_is_refused() -> None:
    session = connected_session()
    assign(session, "t1")
    session.data_to_send()

    events = session.receive(result("other"))

    [ack] = session.data_to_send()
    assert isinstance(ack, ResultAck)
    assert ack.task_id == "other"
    assert ack.accepted is False
    assert "not assigned" in ack.reason
    assert events == [ResultRefused("other", ack.reason)]
    assert session.unfinished == 1


def test_result_for_aborted_task_is_refused() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.abort("t1")
    session.data_to_send()

    events = session.receive(result("t1"))

    [ack] = session.data_to_send()
    assert ack == ResultAck(task_id="t1", accepted=False, reason=ack.reason)
    assert "abort" in ack.reason
    assert events == [ResultRefused("t1", ack.reason)]
    assert task.result is None
    assert isinstance(task.error, TaskAbortedError)


def test_result_for_superseded_task_is_refused() -> None:
    session = connected_session()
    assign(session, "t1")
    assign(session, "t2")
    session.data_to_send()

    events = session.receive(result("t1"))

    assert len(events) == 1
    assert isinstance(events[0], ResultRefused)
    assert "abort" in events[0].reason


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(result("t1", meta="not a dict"), id="meta-not-dict"),
        pytest.param(result("t1", rc=3), id="return-code-not-str"),
    ],
)
def test_malformed_result_ends_task_with_error_and_is_refused(bad: Result) -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.data_to_send()

    events = session.receive(bad)

    [ack] = session.data_to_send()
    assert isinstance(ack, ResultAck)
    assert ack.accepted is False
    assert "malformed" in ack.reason
    assert events == [ResultRefused("t1", ack.reason), TaskFinished(task)]
    assert task.done
    assert task.result is None
    assert isinstance(task.error, RemoteProtocolError)
    assert session.unfinished == 0


def test_resent_malformed_result_is_refused_again_without_second_finish() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.receive(result("t1", meta="not a dict"))
    error = task.error
    session.data_to_send()

    events = session.receive(result("t1", meta="not a dict"))

    [ack] = session.data_to_send()
    assert isinstance(ack, ResultAck)
    assert ack.accepted is False
    assert [type(e) for e in events] == [ResultRefused]
    assert task.error is error


def test_abort_of_unknown_task_returns_none() -> None:
    session = connected_session()
    assert session.abort("nope") is None
    assign(session, "t1")
    session.receive(result("t1"))
    session.data_to_send()
    assert session.abort("t1") is None  # finished already
    assert session.data_to_send() == []


def test_abort_of_outstanding_task_ends_it_and_queues_abort() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.data_to_send()

    assert session.abort("t1") is task

    assert isinstance(task.error, TaskAbortedError)
    assert session.data_to_send() == [Abort(task_id="t1")]
    assert session.unfinished == 0


def test_abort_while_disconnected_is_delivered_after_next_connection() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.receive(TaskAck(task_id="t1"))
    session.connection_lost()
    assert session.state is SessionState.DISCONNECTED

    assert session.abort("t1") is task

    assert isinstance(task.error, TaskAbortedError)
    assert session.data_to_send() == []
    session.connection_made(hello())
    assert session.data_to_send() == [WELCOME, Abort(task_id="t1")]


def test_an_abort_lost_with_its_connection_is_sent_again() -> None:
    session = connected_session()
    assign(session, "t1")
    session.receive(TaskAck(task_id="t1"))
    session.abort("t1")
    session.connection_lost()  # the Abort was queued, never sent
    session.connection_made(hello())
    assert session.data_to_send() == [WELCOME, Abort(task_id="t1")]
    # Recent aborts go with every new connection: the agent ignores ids it has finished.
    session.connection_lost()
    session.connection_made(hello())
    assert session.data_to_send() == [WELCOME, Abort(task_id="t1")]


def test_supersede_while_disconnected_sends_abort_then_new_task() -> None:
    session = connected_session()
    assign(session, "t1")
    session.receive(TaskAck(task_id="t1"))
    session.connection_lost()
    second = assign(session, "t2")

    session.connection_made(hello())

    assert session.data_to_send() == [WELCOME, Abort(task_id="t1"), second.message]


@pytest.mark.parametrize(
    ("acked", "instance_id", "resent"),
    [
        pytest.param(True, "instance-1", False, id="same-instance-acked"),
        pytest.param(False, "instance-1", True, id="same-instance-unacked"),
        pytest.param(True, "instance-2", True, id="new-instance-acked"),
        pytest.param(False, "instance-2", True, id="new-instance-unacked"),
    ],
)
def test_reconnect_resends_unacked_tasks_and_restart_resends_all(
    acked: bool, instance_id: str, resent: bool
) -> None:
    session = connected_session(instance_id="instance-1")
    task = assign(session, "t1")
    session.data_to_send()
    if acked:
        session.receive(TaskAck(task_id="t1"))
    session.connection_lost()
    assert session.data_to_send() == []

    session.connection_made(hello(instance_id=instance_id))

    expected: list[Message] = [WELCOME, task.message] if resent else [WELCOME]
    assert session.data_to_send() == expected
    assert session.instance_id == instance_id
    assert task.acked is (acked and not resent)


def test_without_keep_task_data_the_data_goes_once_acked_and_a_restart_loses_the_task() -> None:
    config = dataclasses.replace(CONFIG, keep_task_data=False)
    session = connected_session(config=config)
    task = assign(session, "t1", data={"w": [1, 2]})
    assert session.data_to_send() == [task.message]
    assert task.message.data == {"w": [1, 2]}  # until the agent says it has the task
    session.receive(TaskAck(task_id="t1"))
    assert task.message.data is None and task.message.task_id == "t1"
    # A reconnect of the same process needs nothing sent again: the task stays.
    session.connection_lost()
    assert session.connection_made(hello(instance_id="instance-1")) == []
    assert session.data_to_send() == [WELCOME]
    # A restart cannot be sent the task again: it fails, and its late result is refused.
    session.connection_lost()
    assert session.connection_made(hello(instance_id="instance-2")) == [task]
    assert isinstance(task.error, TaskLost) and "restarted" in str(task.error)
    assert session.data_to_send() == [WELCOME]
    assert session.unfinished == 0
    events = session.receive(result("t1"))
    assert [type(event) for event in events] == [ResultRefused]
    # An unacknowledged task still has its data, and is sent to the restarted agent.
    fresh = assign(session, "t2")
    session.connection_lost()
    assert session.connection_made(hello(instance_id="instance-3")) == []
    assert session.data_to_send() == [WELCOME, fresh.message]


def test_reconnect_drops_unsent_messages() -> None:
    session = connected_session()
    assign(session, "t1")
    session.receive(TaskAck(task_id="t1"))
    session.receive(Heartbeat())  # the answer is never sent
    session.connection_lost()
    session.connection_made(hello())
    assert session.data_to_send() == [WELCOME]


def test_heartbeat_is_answered_with_heartbeat() -> None:
    session = connected_session()
    assert session.receive(Heartbeat()) == []
    assert session.data_to_send() == [Heartbeat()]


def test_log_yields_log_received() -> None:
    session = connected_session()

    events = session.receive(Log(key="loss", value=0.5, step=3, task_id="t1"))

    assert events == [LogReceived(LogRecord(AGENT_ID, "loss", 0.5, 3, "t1"))]
    assert session.receive(Log(key="acc", value=1)) == [
        LogReceived(LogRecord(AGENT_ID, "acc", 1, None, None))
    ]
    assert session.data_to_send() == []


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(hello(), id="hello"),
        pytest.param(WELCOME, id="welcome"),
        pytest.param(TaskAssign(task_id="t", task_name="n", meta={}), id="task"),
        pytest.param(ResultAck(task_id="t", accepted=True), id="result-ack"),
        pytest.param(Abort(task_id="t"), id="abort"),
    ],
)
def test_unexpected_message_raises_remote_protocol_error(message: Message) -> None:
    session = connected_session()
    with pytest.raises(RemoteProtocolError, match=f"unexpected {type(message).__name__}"):
        session.receive(message)


def test_messages_while_disconnected_are_ignored() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.connection_lost()
    assert session.receive(result("t1")) == []
    assert session.receive(Heartbeat()) == []
    assert not task.done
    assert session.data_to_send() == []


def test_bye_makes_session_gone_and_fails_unfinished_tasks() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.data_to_send()

    events = session.receive(Bye(reason="trainer exited"))

    assert events == [TaskFinished(task)]
    assert session.state is SessionState.GONE
    assert "trainer exited" in session.gone_reason
    assert isinstance(task.error, AgentGone)
    assert task.result is None
    assert session.unfinished == 0
    assert session.data_to_send() == []
    # Whatever the agent still sends is ignored; the session stays gone.
    assert session.receive(result("t1")) == []
    session.connection_lost()
    assert session.state is SessionState.GONE


def test_give_up_fails_unfinished_tasks() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.connection_lost()

    failed = session.give_up("no reconnect within 60 s")

    assert failed == [task]
    assert isinstance(task.error, AgentGone)
    assert "no reconnect within 60 s" in str(task.error)
    assert session.state is SessionState.GONE
    assert session.unfinished == 0
    assert session.data_to_send() == []
    assert session.give_up("again") == []


def test_close_queues_bye_and_fails_unfinished_tasks() -> None:
    session = connected_session()
    task = assign(session, "t1")
    session.data_to_send()

    failed = session.close("site shutting down")

    assert failed == [task]
    assert isinstance(task.error, AgentGone)
    assert session.data_to_send() == [Bye(reason="site shutting down")]
    assert session.state is SessionState.GONE
    assert "site shutting down" in session.gone_reason


def test_close_while_disconnected_queues_no_bye() -> None:
    session = connected_session()
    session.connection_lost()
    assert session.close("bye") == []
    assert session.data_to_send() == []
    assert session.state is SessionState.GONE


def test_gone_session_stays_gone_on_connection_made() -> None:
    session = connected_session()
    session.receive(Bye(reason="done"))

    with contextlib.suppress(ProtocolError):
        session.connection_made(hello())

    assert session.state is SessionState.GONE
    with pytest.raises(AgentGone):
        assign(session, "t1")


def test_assign_on_gone_session_raises_agent_gone() -> None:
    session = connected_session()
    session.receive(Bye(reason="done"))

    with pytest.raises(AgentGone, match="done"):
        assign(session, "t1")

    assert session.unfinished == 0
    assert session.data_to_send() == []


# -- whole conversations --------------------------------------------------------------------------


class Link:
    """An `AgentProtocol` and its `SiteSession`, joined in memory one message at a time.

    Messages taken from an outbox are in flight until delivered; a drop loses them, as a broken
    connection would.
    """

    def __init__(self, agent: AgentProtocol, config: SiteConfig = CONFIG) -> None:
        self.agent = agent
        self.config = config
        self.session = SiteSession(agent.agent_id, config)
        self.connected = False
        self.agent_events: list[object] = []
        self.site_events: list[object] = []
        self._to_site: list[Message] = []
        self._to_agent: list[Message] = []

    def connect(self) -> None:
        assert not self.connected
        self.agent.connection_made()
        [first] = self.agent.data_to_send()
        assert isinstance(first, Hello)
        assert check_hello(first, self.config) is None
        self.session.connection_made(first)
        self.connected = True

    def drop(self) -> None:
        self.agent.connection_lost()
        self.session.connection_lost()
        self._to_site.clear()
        self._to_agent.clear()
        self.connected = False

    def reconnect(self) -> None:
        self.drop()
        self.connect()

    def _collect(self) -> None:
        if self.connected:
            self._to_site.extend(self.agent.data_to_send())
            self._to_agent.extend(self.session.data_to_send())
        else:
            # Nothing may be queued for a connection that does not exist.
            assert self.agent.data_to_send() == []
            assert self.session.data_to_send() == []

    def to_site(self, limit: int | None = None) -> list[Message]:
        """Deliver up to ``limit`` messages from the agent to the site; returns them."""
        self._collect()
        count = len(self._to_site) if limit is None else min(limit, len(self._to_site))
        delivered, self._to_site = self._to_site[:count], self._to_site[count:]
        for message in delivered:
            self.site_events.extend(self.session.receive(message))
        return delivered

    def to_agent(self, limit: int | None = None) -> list[Message]:
        """Deliver up to ``limit`` messages from the site to the agent; returns them."""
        self._collect()
        count = len(self._to_agent) if limit is None else min(limit, len(self._to_agent))
        delivered, self._to_agent = self._to_agent[:count], self._to_agent[count:]
        for message in delivered:
            self.agent_events.extend(self.agent.receive(message))
        return delivered

    def pump(self) -> None:
        """Deliver both ways until nothing is left."""
        while self.to_agent() or self.to_site():
            pass

    def finished(self) -> Counter[str]:
        return Counter(e.task.task_id for e in self.site_events if isinstance(e, TaskFinished))


def new_link() -> Link:
    link = Link(AgentProtocol(AGENT_ID, SITE, JOB, instance_id="instance-1"))
    link.connect()
    link.pump()
    assert link.agent.state is AgentState.READY
    return link


def test_link_bad_task_data_reaches_site_as_bad_task_data_result() -> None:
    link = new_link()
    task, _ = link.session.assign("bad", "train", {1: "x"}, None)

    link.pump()

    assert [type(e) for e in link.agent_events if isinstance(e, BadTaskReceived)] == [
        BadTaskReceived
    ]
    assert task.result is not None
    assert task.result.return_code == RC.BAD_TASK_DATA
    assert link.agent.unsettled == 0
    assert link.agent.fetch_task() is None


def test_link_abort_of_fetched_task_refuses_late_result() -> None:
    link = new_link()
    site_task, _ = link.session.assign("t1", "train", {}, {"x": 1})
    link.pump()
    task = link.agent.fetch_task()
    assert task is not None
    # The trainer submits before the abort arrives: the site refuses the result.
    submission = link.agent.submit(TaskResult({}, {"y": 1}))
    link.session.abort("t1")
    link.pump()

    assert submission is not None
    assert submission.accepted is False
    assert "abort" in submission.reason
    assert isinstance(site_task.error, TaskAbortedError)


def test_link_site_bye_closes_agent() -> None:
    link = new_link()
    link.session.close("job done")
    link.pump()
    assert link.agent.state is AgentState.CLOSED
    assert "job done" in link.agent.close_reason


def test_link_agent_bye_makes_session_gone() -> None:
    link = new_link()
    site_task, _ = link.session.assign("t1", "train", {}, None)
    link.pump()
    link.agent.close("stopping")
    link.pump()
    assert link.session.state is SessionState.GONE
    assert isinstance(site_task.error, AgentGone)


def test_end_to_end_twenty_tasks_with_connection_drops() -> None:
    link = new_link()
    agent, session = link.agent, link.session
    # Which faults hit which task: a drop (and reconnect) at one or two points of its life.
    schedule: list[set[str]] = [
        set(),
        {"assign_lost"},
        {"task_ack_lost"},
        {"result_lost"},
        {"result_ack_lost"},
        {"submit_offline"},
        {"assign_lost", "result_ack_lost"},
        {"task_ack_lost", "result_lost"},
        set(),
        {"task_ack_lost", "result_ack_lost"},
    ]
    site_tasks: dict[str, SiteTask] = {}
    submissions: dict[str, Submission] = {}
    reconnects = 0

    for i in range(20):
        faults = schedule[i % len(schedule)]
        task_id = f"task-{i}"
        site_task, superseded = session.assign(task_id, "train", {"round": i}, {"w": i})
        assert superseded == []
        site_tasks[task_id] = site_task

        # -- between assign and fetch
        if "assign_lost" in faults:
            link.reconnect()  # the TaskAssign never left the site
            reconnects += 1
            assert agent.fetch_task() is None
        elif "task_ack_lost" in faults:
            assert link.to_agent() == [site_task.message]
            link.reconnect()  # the TaskAck never reached the site
            reconnects += 1
            assert not site_task.acked
        link.pump()
        assert site_task.acked
        task = agent.fetch_task()
        assert task is not None
        assert (task.task_id, task.task_name, task.meta, task.data) == (
            task_id,
            "train",
            {"round": i},
            {"w": i},
        )
        with pytest.raises(CallStateError):
            agent.fetch_task()

        # -- between submit and ack
        if "submit_offline" in faults:
            link.drop()
        submission = agent.submit(TaskResult({"round": i}, {"w": i + 100}))
        assert submission is not None
        submissions[task_id] = submission
        if "submit_offline" in faults:
            link.connect()
            reconnects += 1
        elif "result_lost" in faults:
            link.reconnect()  # the Result never left the agent
            reconnects += 1
        elif "result_ack_lost" in faults:
            assert link.to_site() == [submission.message]
            assert site_task.done
            link.reconnect()  # the ResultAck never reached the agent
            reconnects += 1
            assert submission.accepted is None
        link.pump()

        assert submission.accepted is True, submission.reason
        assert agent.unsettled == 0
        assert agent.fetch_task() is None
        assert session.unfinished == 0

    assert reconnects == 22
    assert link.finished() == Counter({f"task-{i}": 1 for i in range(20)})
    assert not [e for e in link.site_events if isinstance(e, ResultRefused)]
    for i in range(20):
        site_task = site_tasks[f"task-{i}"]
        assert site_task.error is None
        assert site_task.result is not None
        assert site_task.result.return_code == RC.OK
        assert site_task.result.meta == {"round": i}
        assert site_task.result.data == {"w": i + 100}
        assert submissions[f"task-{i}"].accepted is True


ACTIONS = ["assign", "abort", "fetch", "submit", "to_site", "to_agent", "drop", "reconnect"]


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from(ACTIONS), max_size=60))
def test_random_interleavings_keep_the_guarantees(actions: list[str]) -> None:
    link = new_link()
    agent, session = link.agent, link.session
    site_tasks: dict[str, SiteTask] = {}
    handed: list[str] = []
    submissions: list[tuple[Submission, dict[str, int]]] = []
    current: list[Any] = []  # the trainer's view: the task it works on, if any

    def fetch() -> None:
        try:
            task = agent.fetch_task()
        except CallStateError:
            return
        if task is not None:
            handed.append(task.task_id)
            current[:] = [task]

    def submit() -> None:
        data = {"y": current[0].data["x"]} if current else {"y": -1}
        try:
            submission = agent.submit(TaskResult({}, data))
        except CallStateError:
            return
        current.clear()
        if submission is not None:
            submissions.append((submission, data))

    for action in actions:
        if action == "assign":
            task_id = f"t{len(site_tasks)}"
            site_tasks[task_id], _ = session.assign(task_id, "train", {}, {"x": len(site_tasks)})
        elif action == "abort":
            if site_tasks:
                session.abort(f"t{len(site_tasks) - 1}")
        elif action == "fetch":
            fetch()
        elif action == "submit":
            submit()
        elif action == "to_site":
            link.to_site(limit=1)
        elif action == "to_agent":
            link.to_agent(limit=1)
        elif action == "drop":
            link.drop()
        elif action == "reconnect" and not link.connected:
            link.connect()

    # Let the trainer finish whatever is left over a healthy connection.
    if not link.connected:
        link.connect()
    for _ in range(5):
        link.pump()
        if current:
            submit()
        fetch()
        if current:
            submit()
    link.pump()

    # A task id is handed to the trainer at most once; a site task finishes at most once.
    assert len(handed) == len(set(handed))
    assert all(count == 1 for count in link.finished().values())
    # Everything ended: every site task is done, every submission settled.
    assert session.unfinished == 0
    assert all(task.done for task in site_tasks.values())
    assert agent.unsettled == 0
    assert agent.fetch_task() is None  # nothing left pending
    assert set(link.finished()) <= set(site_tasks)
    for submission, data in submissions:
        assert submission.accepted is not None
        site_task = site_tasks[submission.task_id]
        if submission.accepted:
            assert site_task.result is not None
            assert site_task.result.data == data
        else:
            assert site_task.result is None
    # Every result the site kept was accepted by exactly one submission.
    kept = [tid for tid, task in site_tasks.items() if task.result is not None]
    accepted = [s.task_id for s, _ in submissions if s.accepted]
    assert sorted(kept) == sorted(accepted)


# -- results that hold back their arrays ----------------------------------------------------------


def held_link(arrays: dict[str, Any] | None = None) -> tuple[Link, SiteTask, Submission]:
    """A link whose agent submitted ``{"a": .., "n": 3, "b": ..}`` for a task that holds arrays."""
    link = new_link()
    site_task, _ = link.session.assign("t1", "train", {}, {"x": 1}, hold_arrays=True)
    link.pump()
    assert link.agent.fetch_task() is not None
    data = arrays if arrays is not None else {"a": np.arange(3), "n": 3, "b": np.ones(2)}
    submission = link.agent.submit(TaskResult({"m": 1}, data))
    assert submission is not None
    link.pump()
    return link, site_task, submission


def test_a_held_result_finishes_the_task_without_its_arrays_and_waits_for_release() -> None:
    link, site_task, submission = held_link()

    assert site_task.held == ("a", "b")
    assert site_task.held_nbytes == (24, 16)  # int64 and float64, as the agent said
    assert site_task.result is not None
    assert site_task.result.data == {"a": None, "n": 3, "b": None}
    assert submission.accepted is None  # no acknowledgement before the release
    assert link.agent.unsettled == 1


def test_a_part_request_gets_the_agents_own_array_and_the_release_settles_the_result() -> None:
    link, _, submission = held_link()
    array = submission.held["b"]

    fetch = link.session.request_part("t1", "b")
    link.pump()

    assert [type(e) for e in link.site_events[-1:]] == [FetchEnded]
    assert fetch.done and fetch.error is None and fetch.value is array
    assert link.session.release("t1") == []
    link.pump()
    assert submission.accepted is True
    assert link.agent.unsettled == 0 and submission.held == {}


def test_a_part_request_lost_with_its_connection_is_asked_again_and_the_result_not_twice() -> None:
    link, _, submission = held_link()
    fetch = link.session.request_part("t1", "a")
    link.to_agent()  # the request arrives; its answer is lost with the connection

    link.reconnect()
    link.pump()

    assert fetch.done and fetch.value is submission.held["a"]
    assert link.finished() == Counter({"t1": 1})  # the resent result is not a second finish


def test_an_agent_that_restarts_or_leaves_fails_the_open_fetches() -> None:
    link, _, _ = held_link()
    fetch = link.session.request_part("t1", "a")
    link.drop()
    lost = link.session.connection_made(hello(instance_id="instance-2"))
    assert lost == [fetch]
    assert isinstance(fetch.error, TaskLost)
    with pytest.raises(TaskLost, match="restarted"):
        link.session.request_part("t1", "a")

    link, _, _ = held_link()
    fetch = link.session.request_part("t1", "a")
    link.agent.close("stopping")
    link.to_site()
    assert isinstance(fetch.error, AgentGone)
    assert [type(e) for e in link.site_events[-1:]] == [FetchEnded]
    with pytest.raises(AgentGone):
        link.session.request_part("t1", "b")


def test_part_requests_that_cannot_be_made() -> None:
    link, _, _ = held_link()
    with pytest.raises(ValueError, match="holds back 'n'"):
        link.session.request_part("t1", "n")  # not held back
    with pytest.raises(ValueError, match="holds back"):
        link.session.request_part("t2", "a")
    fetch = link.session.request_part("t1", "a")
    assert link.session.request_part("t1", "a") is fetch  # asked once while it is open
    assert link.session.data_to_send() == [PartRequest(task_id="t1", key="a")]
    (open_fetch,) = link.session.release("t1")
    assert isinstance(open_fetch.error, TaskLost)
    with pytest.raises(ValueError, match="holds back"):
        link.session.request_part("t1", "b")
    assert link.session.release("t1") == []  # a second release does nothing


def test_a_cancelled_fetch_drops_its_late_part_and_may_be_asked_again() -> None:
    link, _, submission = held_link()
    fetch = link.session.request_part("t1", "a")
    link.to_agent()
    link.session.cancel_part(fetch)
    events = len(link.site_events)
    link.pump()
    assert not fetch.done and len(link.site_events) == events

    again = link.session.request_part("t1", "a")
    link.pump()
    assert again.value is submission.held["a"]


def test_a_refused_release_is_what_the_agent_and_a_later_resend_are_told() -> None:
    link, _, submission = held_link()
    link.drop()
    link.session.release("t1", accepted=False, reason="upload failed")
    link.connect()  # the agent resends its result: it is refused with the same reason
    link.pump()
    assert submission.accepted is False
    assert submission.reason == "upload failed"


def test_an_agent_asked_for_what_it_does_not_hold_says_so_and_the_fetch_fails() -> None:
    link, _, _ = held_link()
    agent = link.agent
    agent.data_to_send()
    for task_id, key in [("t1", "n"), ("t9", "a")]:
        assert agent.receive(PartRequest(task_id=task_id, key=key)) == []
    replies = agent.data_to_send()
    assert [(r.key, r.value) for r in replies if isinstance(r, Part)] == [("n", None), ("a", None)]
    assert all(isinstance(r, Part) and r.error for r in replies)

    fetch = link.session.request_part("t1", "a")
    link.session.data_to_send()
    assert link.session.receive(Part(task_id="t1", key="a", error="it is gone")) == [
        FetchEnded(fetch)
    ]
    assert isinstance(fetch.error, TaskLost) and "it is gone" in str(fetch.error)


def test_a_task_that_holds_arrays_with_a_result_of_none_is_acknowledged_at_once() -> None:
    _, site_task, submission = held_link({"n": 1})
    assert site_task.held == ()
    assert submission.accepted is True


def test_a_result_that_holds_back_what_it_should_not_is_a_protocol_error() -> None:
    held = Result(task_id="t1", return_code=RC.OK, meta={}, data={"a": None}, held=["a", "b"])
    session = connected_session()
    session.assign("t1", "train", {}, None, hold_arrays=True)
    with pytest.raises(RemoteProtocolError, match="holds back entries its result's data does"):
        session.receive(held)  # "b" is not in the data
    session = connected_session()
    assign(session, "t1")
    with pytest.raises(RemoteProtocolError, match="which did not ask it to"):
        session.receive(msgspec.structs.replace(held, held=["a"]))


@pytest.mark.parametrize(
    ("nbytes", "kept"),
    [([], ()), ([8, 0], (8, 0)), ([8], None), ([8, 4, 2], None), ([8, -1], None)],
    ids=["unsaid", "said", "too-few", "too-many", "negative"],
)
def test_the_sizes_of_held_arrays_are_kept_when_they_fit_and_a_protocol_error_otherwise(
    nbytes: list[int], kept: tuple[int, ...] | None
) -> None:
    session = connected_session()
    site_task, _ = session.assign("t1", "train", {}, None, hold_arrays=True)
    result = Result(
        task_id="t1",
        return_code=RC.OK,
        meta={},
        data={"a": None, "b": None},
        held=["a", "b"],
        held_nbytes=nbytes,
    )
    if kept is None:
        with pytest.raises(RemoteProtocolError, match="sizes for 2 held-back entries"):
            session.receive(result)
    else:
        session.receive(result)
        assert site_task.held == ("a", "b") and site_task.held_nbytes == kept


def test_a_held_result_lost_with_a_restart_says_so_to_a_later_fetch() -> None:
    link, _, _ = held_link()
    link.drop()
    assert link.session.connection_made(hello(instance_id="instance-2")) == []
    with pytest.raises(TaskLost, match="restarted"):
        link.session.request_part("t1", "a")


# -- tasks whose entries come after them ----------------------------------------------------------


def announced(session: SiteSession, task_id: str = "t1") -> SiteTask:
    task, _ = session.assign(task_id, "train", {}, {"w": None, "n": 1}, coming=["w", "b"])
    return task


def test_a_tasks_coming_entries_follow_it_and_go_again_with_every_resend() -> None:
    session = connected_session()
    task = announced(session)
    (sent,) = session.data_to_send()
    assert isinstance(sent, TaskAssign) and sent.coming == ["w", "b"]
    assert sent.data == {"w": None, "n": 1, "b": None}
    w = np.arange(3.0)
    assert session.send_part("t1", "w", w)
    assert session.data_to_send() == [Part(task_id="t1", key="w", value=w)]
    session.receive(PartAck(task_id="t1", key="w"))  # kept all the same: keep_task_data
    session.connection_lost()
    assert session.send_part("t1", "b", 2)  # kept for the resend
    session.connection_made(hello())
    assert session.data_to_send()[1:] == [
        sent,
        Part(task_id="t1", key="w", value=w),
        Part(task_id="t1", key="b", value=2),
    ]
    assert session.receive(TaskAck(task_id="t1")) == []
    assert task.acked and task.parts == {"w": w, "b": 2}  # kept: the data is, by default


def test_without_keep_task_data_each_entry_goes_once_the_agent_has_it() -> None:
    session = connected_session(config=dataclasses.replace(CONFIG, keep_task_data=False))
    task = announced(session)
    session.send_part("t1", "w", 1)
    session.send_part("t1", "b", 2)
    session.receive(PartAck(task_id="t1", key="w"))
    session.receive(PartAck(task_id="t1", key="w"))  # twice: after a reconnect, say
    assert task.parts == {"b": 2}
    session.connection_lost()
    session.connection_made(hello())  # a reconnect: the task, and what the agent may lack
    assert session.data_to_send()[1:] == [task.message, Part(task_id="t1", key="b", value=2)]
    session.receive(TaskAck(task_id="t1"))
    assert task.released and task.parts == {} and task.message.data is None


def test_without_keep_task_data_a_restart_after_an_entry_was_let_go_loses_the_task() -> None:
    session = connected_session(config=dataclasses.replace(CONFIG, keep_task_data=False))
    task = announced(session)
    session.send_part("t1", "w", 1)
    session.receive(PartAck(task_id="t1", key="w"))
    session.connection_lost()
    assert session.connection_made(hello(instance_id="instance-2")) == [task]
    assert isinstance(task.error, TaskLost)


def test_entries_are_checked_and_those_of_an_ended_task_are_not_sent() -> None:
    session = connected_session()
    with pytest.raises(ValueError, match="needs dict data"):
        session.assign("t0", "train", {}, [1], coming=["w"])
    with pytest.raises(ValueError, match="distinct str keys"):
        session.assign("t0", "train", {}, {}, coming=["w", "w"])
    with pytest.raises(ValueError, match="entries that coming says are still to come"):
        session.assign("t0", "train", {}, {"w": 1}, coming=["w"])
    announced(session)
    session.send_part("t1", "w", 1)
    with pytest.raises(ValueError, match="entry 'w' of task 't1' is not one still to come"):
        session.send_part("t1", "w", 1)
    with pytest.raises(ValueError, match="entry 'x'"):
        session.send_part("t1", "x", 1)
    session.abort("t1")
    session.data_to_send()
    assert session.send_part("t1", "b", 2) is False
    assert session.data_to_send() == []


def test_an_agent_that_acknowledges_a_task_before_its_entries_came_breaks_the_protocol() -> None:
    session = connected_session()
    announced(session)
    session.send_part("t1", "w", 1)
    with pytest.raises(RemoteProtocolError, match="before all its entries came"):
        session.receive(TaskAck(task_id="t1"))


def test_a_task_with_coming_entries_reaches_the_agents_trainer_whole() -> None:
    session, agent = connected_session(), AgentProtocol(AGENT_ID, SITE, JOB, instance_id="i")
    agent.connection_made()
    session.connection_made(agent.data_to_send()[0])  # type: ignore[arg-type]
    w = np.arange(4.0)

    def exchange() -> None:
        for message in session.data_to_send():
            agent.receive(message)
        for message in agent.data_to_send():
            session.receive(message)

    task = announced(session)
    exchange()
    session.send_part("t1", "b", "b")
    exchange()
    assert not agent.task_pending and not task.acked
    session.send_part("t1", "w", w)
    exchange()
    fetched = agent.fetch_task()
    assert task.acked and fetched is not None
    assert fetched.data == {"w": w, "n": 1, "b": "b"}
