"""The agent's sans-IO state machine, driven by hand: no I/O, no event loop, no clock."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from flare_agent_async.defs import RC, TaskResult
from flare_agent_async.exceptions import (
    AgentClosed,
    CallStateError,
    LocalProtocolError,
    RemoteProtocolError,
)
from flare_agent_async.protocol import (
    PROTOCOL_VERSION,
    Abort,
    AbortReceived,
    AgentProtocol,
    AgentState,
    BadTaskReceived,
    Bye,
    ByeReceived,
    Heartbeat,
    Hello,
    Log,
    Message,
    Part,
    PartAck,
    Reject,
    RejectReceived,
    Result,
    ResultAck,
    ResultSettled,
    Submission,
    TaskAck,
    TaskAssign,
    TaskReceived,
    Welcome,
    WelcomeReceived,
)

AGENT_ID = "agent-1"
SITE = "site-1"
JOB = "job-1"
INSTANCE = "instance-1"


# -- helpers --------------------------------------------------------------------------------------


def make_agent(**kwargs: Any) -> AgentProtocol:
    return AgentProtocol(AGENT_ID, SITE, JOB, instance_id=INSTANCE, **kwargs)


def welcome(
    *,
    site_name: str = SITE,
    protocol_version: int = PROTOCOL_VERSION,
    heartbeat_interval: float = 2.0,
    heartbeat_timeout: float = 9.0,
) -> Welcome:
    return Welcome(
        protocol_version=protocol_version,
        site_name=site_name,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
    )


def assign(
    task_id: str, task_name: Any = "train", meta: Any = None, data: Any = None
) -> TaskAssign:
    # msgspec does not check field types on construction: this is how a bad task looks when it
    # comes over the memory transport.
    return TaskAssign(
        task_id=task_id,
        task_name=task_name,
        meta={"round": 1} if meta is None else meta,
        data={"w": [1, 2, 3]} if data is None else data,
    )


def connect(agent: AgentProtocol) -> None:
    """Make a connection and complete the handshake; the outbox is drained before the welcome."""
    agent.connection_made()
    [hello] = agent.data_to_send()
    assert isinstance(hello, Hello)
    assert agent.receive(welcome()) == [WelcomeReceived(2.0, 9.0)]


def ready_agent(**kwargs: Any) -> AgentProtocol:
    agent = make_agent(**kwargs)
    connect(agent)
    assert agent.data_to_send() == []
    return agent


def give_task(agent: AgentProtocol, task_id: str, **kwargs: Any) -> TaskAssign:
    """Deliver a task and fetch it; the outbox (ending with the task's ack) is drained."""
    events = agent.receive(assign(task_id, **kwargs))
    assert isinstance(events[-1], TaskReceived)
    assert agent.data_to_send()[-1] == TaskAck(task_id=task_id)
    task = agent.fetch_task()
    assert task is not None
    assert task.task_id == task_id
    return task


def results(messages: list[Message]) -> list[Result]:
    return [m for m in messages if isinstance(m, Result)]


# -- connection and handshake ---------------------------------------------------------------------


def test_hello_is_first_message_after_connection_made() -> None:
    agent = make_agent()
    assert agent.state is AgentState.IDLE
    assert agent.data_to_send() == []

    agent.connection_made()

    assert agent.state is AgentState.HANDSHAKE
    assert agent.data_to_send() == [
        Hello(
            protocol_version=PROTOCOL_VERSION,
            agent_id=AGENT_ID,
            site_name=SITE,
            job_id=JOB,
            instance_id=INSTANCE,
        )
    ]
    assert agent.data_to_send() == []


def test_hello_goes_alone_even_with_queued_logs_and_results() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    agent.connection_lost()
    assert agent.submit(TaskResult({}, {"x": 1})) is not None
    agent.log("loss", 0.5)

    agent.connection_made()

    # Nothing but the hello may go before the site's welcome.
    [hello] = agent.data_to_send()
    assert isinstance(hello, Hello)
    assert agent.state is AgentState.HANDSHAKE


def test_hello_without_job_id() -> None:
    agent = AgentProtocol(AGENT_ID, SITE, instance_id=INSTANCE)
    agent.connection_made()
    [hello] = agent.data_to_send()
    assert isinstance(hello, Hello)
    assert hello.job_id is None


def test_welcome_moves_to_ready_and_sets_heartbeat_settings() -> None:
    agent = make_agent()
    assert agent.heartbeat_interval is None
    assert agent.heartbeat_timeout is None
    agent.connection_made()
    agent.data_to_send()

    events = agent.receive(welcome(heartbeat_interval=1.5, heartbeat_timeout=12.0))

    assert events == [WelcomeReceived(1.5, 12.0)]
    assert agent.state is AgentState.READY
    assert agent.heartbeat_interval == 1.5
    assert agent.heartbeat_timeout == 12.0
    assert agent.data_to_send() == []


@pytest.mark.parametrize(
    "bad_welcome",
    [
        pytest.param(welcome(site_name="other-site"), id="wrong-site-name"),
        pytest.param(welcome(protocol_version=PROTOCOL_VERSION + 1), id="wrong-protocol-version"),
    ],
)
def test_bad_welcome_raises_remote_protocol_error(bad_welcome: Welcome) -> None:
    agent = make_agent()
    agent.connection_made()
    agent.data_to_send()

    with pytest.raises(RemoteProtocolError, match="welcome from site"):
        agent.receive(bad_welcome)

    assert agent.state is AgentState.HANDSHAKE
    assert agent.heartbeat_interval is None


def test_bad_welcome_error_names_both_sites() -> None:
    agent = make_agent()
    agent.connection_made()
    with pytest.raises(RemoteProtocolError) as info:
        agent.receive(welcome(site_name="other-site"))
    assert "'other-site'" in str(info.value)
    assert f"'{SITE}'" in str(info.value)


def test_reject_closes_agent_with_reason() -> None:
    agent = make_agent()
    agent.connection_made()
    agent.data_to_send()

    events = agent.receive(Reject(reason="wrong job id"))

    assert events == [RejectReceived("wrong job id")]
    assert agent.state is AgentState.CLOSED
    assert "wrong job id" in agent.close_reason
    with pytest.raises(AgentClosed, match="wrong job id"):
        agent.fetch_task()
    with pytest.raises(AgentClosed):
        agent.log("loss", 1.0)
    with pytest.raises(LocalProtocolError):
        agent.connection_made()
    # A closed agent ignores whatever still arrives.
    assert agent.receive(assign("t1")) == []
    assert agent.data_to_send() == []


def _idle(agent: AgentProtocol) -> None:
    pass


def _handshake(agent: AgentProtocol) -> None:
    agent.connection_made()
    agent.data_to_send()


def _ready(agent: AgentProtocol) -> None:
    connect(agent)
    agent.data_to_send()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param(_idle, welcome(), id="idle-welcome"),
        pytest.param(_idle, assign("t1"), id="idle-task"),
        pytest.param(_handshake, assign("t1"), id="handshake-task"),
        pytest.param(_handshake, Heartbeat(), id="handshake-heartbeat"),
        pytest.param(_handshake, ResultAck(task_id="t1", accepted=True), id="handshake-result-ack"),
        pytest.param(_handshake, Abort(task_id="t1"), id="handshake-abort"),
        pytest.param(_ready, welcome(), id="ready-welcome"),
        pytest.param(_ready, Reject(reason="late"), id="ready-reject"),
        pytest.param(_ready, TaskAck(task_id="t1"), id="ready-task-ack"),
        pytest.param(
            _ready,
            Result(task_id="t1", return_code=RC.OK, meta={}),
            id="ready-result",
        ),
        pytest.param(_ready, Log(key="k", value=1), id="ready-log"),
        pytest.param(
            _ready,
            Hello(protocol_version=1, agent_id="a", site_name=SITE, instance_id="i"),
            id="ready-hello",
        ),
    ],
)
def test_unexpected_message_raises_remote_protocol_error(setup: Any, message: Message) -> None:
    agent = make_agent()
    setup(agent)
    state = agent.state

    with pytest.raises(RemoteProtocolError, match=f"unexpected {type(message).__name__}"):
        agent.receive(message)

    assert agent.state is state


def test_heartbeat_only_while_ready() -> None:
    agent = make_agent()
    agent.heartbeat()
    assert agent.data_to_send() == []
    connect(agent)
    agent.heartbeat()
    assert agent.data_to_send() == [Heartbeat()]
    assert agent.receive(Heartbeat()) == []
    assert agent.data_to_send() == []


# -- tasks ----------------------------------------------------------------------------------------


def test_task_assign_is_acked_and_fetched_once() -> None:
    agent = ready_agent()
    assert agent.fetch_task() is None

    events = agent.receive(assign("t1", meta={"round": 3}, data={"w": 7}))

    [arrived] = events
    assert isinstance(arrived, TaskReceived)
    assert agent.data_to_send() == [TaskAck(task_id="t1")]
    task = agent.fetch_task()
    assert task is not None and task.task_id == arrived.task_id == "t1"
    assert (task.task_name, task.task_id, task.meta, task.data) == (
        "train",
        "t1",
        {"round": 3},
        {"w": 7},
    )
    assert not agent.current_aborted
    agent.submit(TaskResult({}, {"w": 8}))
    assert agent.fetch_task() is None


def test_duplicate_task_assign_is_acked_but_handed_over_once() -> None:
    agent = ready_agent()
    assert len(agent.receive(assign("t1"))) == 1

    assert agent.receive(assign("t1")) == []

    assert agent.data_to_send() == [TaskAck(task_id="t1"), TaskAck(task_id="t1")]
    task = agent.fetch_task()
    assert task is not None
    assert task.task_id == "t1"
    # Resent after it was fetched, and again after it was submitted: still never handed over.
    assert agent.receive(assign("t1")) == []
    assert not agent.current_aborted
    agent.submit(TaskResult({}, {"x": 1}))
    assert agent.receive(assign("t1")) == []
    assert agent.fetch_task() is None
    assert [m for m in agent.data_to_send() if isinstance(m, TaskAck)] == [
        TaskAck(task_id="t1"),
        TaskAck(task_id="t1"),
    ]


def test_duplicate_task_assign_after_reconnect_is_not_handed_over() -> None:
    agent = ready_agent()
    agent.receive(assign("t1"))
    agent.data_to_send()  # the ack is lost with the connection
    agent.connection_lost()
    connect(agent)

    assert agent.receive(assign("t1")) == []

    assert agent.data_to_send() == [TaskAck(task_id="t1")]
    task = agent.fetch_task()
    assert task is not None
    assert task.task_id == "t1"
    agent.submit(TaskResult({}, {}))
    assert agent.fetch_task() is None


def test_connection_lost_keeps_pending_task() -> None:
    agent = ready_agent()
    agent.receive(assign("t1"))
    agent.connection_lost()
    assert agent.state is AgentState.IDLE
    assert agent.data_to_send() == []
    task = agent.fetch_task()
    assert task is not None
    assert task.task_id == "t1"


def test_fetch_while_current_task_unsubmitted_raises_call_state_error() -> None:
    agent = ready_agent()
    give_task(agent, "t1")

    with pytest.raises(CallStateError, match="submit"):
        agent.fetch_task()

    # The state is unchanged: the task can still be submitted.
    submission = agent.submit(TaskResult({}, {"x": 1}))
    assert submission is not None
    assert submission.task_id == "t1"
    assert agent.fetch_task() is None


def test_fetch_with_aborted_current_task_is_allowed() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    agent.receive(Abort(task_id="t1"))
    assert agent.current_aborted

    assert agent.fetch_task() is None

    agent.receive(assign("t2"))
    task2 = agent.fetch_task()
    assert task2 is not None
    assert task2.task_id == "t2"


def test_submit_non_task_result_raises_type_error_and_state_unchanged() -> None:
    agent = ready_agent()
    give_task(agent, "t1")

    with pytest.raises(TypeError, match="TaskResult"):
        agent.submit({"meta": {}, "data": 1})  # type: ignore[arg-type]

    assert agent.data_to_send() == []
    assert agent.unsettled == 0
    with pytest.raises(CallStateError):
        agent.fetch_task()  # the task is still current
    submission = agent.submit(TaskResult({"m": 1}, {"x": 1}))
    assert submission is not None
    assert agent.data_to_send() == [
        Result(task_id="t1", return_code=RC.OK, meta={"m": 1}, data={"x": 1})
    ]


def test_submit_type_error_checked_before_call_state() -> None:
    agent = ready_agent()
    with pytest.raises(TypeError):
        agent.submit(None)  # type: ignore[arg-type]


def test_submit_without_fetched_task_raises_call_state_error() -> None:
    agent = ready_agent()
    with pytest.raises(CallStateError, match="without a fetched task"):
        agent.submit(TaskResult({}, {}))
    # A pending but unfetched task does not count.
    agent.receive(assign("t1"))
    with pytest.raises(CallStateError):
        agent.submit(TaskResult({}, {}))
    pending = agent.fetch_task()
    assert pending is not None and pending.task_id == "t1"
    assert results(agent.data_to_send()) == []


def test_submit_twice_raises_call_state_error() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    first = agent.submit(TaskResult({}, {"x": 1}))
    assert first is not None

    with pytest.raises(CallStateError):
        agent.submit(TaskResult({}, {"x": 2}))

    assert results(agent.data_to_send()) == [
        Result(task_id="t1", return_code=RC.OK, meta={}, data={"x": 1})
    ]
    assert agent.unsettled == 1


def test_submit_queues_result_and_returns_unsettled_submission() -> None:
    agent = ready_agent()
    give_task(agent, "t1")

    submission = agent.submit(TaskResult({"m": 1}, {"x": 1}, RC.EXECUTION_EXCEPTION))

    assert isinstance(submission, Submission)
    assert submission.task_id == "t1"
    assert submission.accepted is None
    expected = Result(
        task_id="t1", return_code=RC.EXECUTION_EXCEPTION, meta={"m": 1}, data={"x": 1}
    )
    assert submission.message == expected
    assert agent.data_to_send() == [expected]
    assert agent.unsettled == 1


def test_abort_of_pending_task_drops_it_and_resend_is_ignored() -> None:
    agent = ready_agent()
    agent.receive(assign("t1"))
    agent.data_to_send()

    assert agent.receive(Abort(task_id="t1")) == [AbortReceived("t1", fetched=False)]

    assert agent.fetch_task() is None
    # A resend of the aborted task (say, after a reconnect) is acknowledged but not revived.
    assert agent.receive(assign("t1")) == []
    assert agent.data_to_send() == [TaskAck(task_id="t1")]
    assert agent.fetch_task() is None


def test_abort_before_task_arrives_keeps_it_out() -> None:
    agent = ready_agent()
    assert agent.receive(Abort(task_id="t1")) == []
    assert agent.receive(assign("t1")) == []
    assert agent.fetch_task() is None


def test_abort_of_fetched_task_marks_it_and_submit_returns_none() -> None:
    agent = ready_agent()
    give_task(agent, "t1")

    assert agent.receive(Abort(task_id="t1")) == [AbortReceived("t1", fetched=True)]

    assert agent.current_aborted
    assert agent.receive(Abort(task_id="t1")) == []  # signalled once
    assert agent.submit(TaskResult({}, {"x": 1})) is None
    assert agent.data_to_send() == []
    assert agent.unsettled == 0
    # The task is gone: a second submit is a call-state error.
    with pytest.raises(CallStateError):
        agent.submit(TaskResult({}, {"x": 1}))


def test_abort_of_unknown_or_submitted_task_is_ignored() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    submission = agent.submit(TaskResult({}, {}))
    assert agent.receive(Abort(task_id="t1")) == []
    assert agent.receive(Abort(task_id="zzz")) == []
    assert submission is not None
    assert submission.accepted is None
    assert agent.unsettled == 1


def test_new_task_while_current_unsubmitted_aborts_current_and_keeps_new_pending() -> None:
    agent = ready_agent()
    give_task(agent, "t1")

    events = agent.receive(assign("t2"))

    assert len(events) == 2
    assert events[0] == AbortReceived("t1", fetched=True)
    assert isinstance(events[1], TaskReceived)
    assert events[1] == TaskReceived("t2", "train")
    assert agent.current_aborted
    assert agent.data_to_send() == [TaskAck(task_id="t2")]
    # The trainer's late submit for t1 is not sent; then t2 is handed over.
    assert agent.submit(TaskResult({}, {"x": 1})) is None
    assert agent.data_to_send() == []
    task2 = agent.fetch_task()
    assert task2 is not None
    assert task2.task_id == "t2"
    assert not agent.current_aborted


def test_new_task_replaces_unfetched_pending_task() -> None:
    agent = ready_agent()
    agent.receive(assign("t1"))

    events = agent.receive(assign("t2"))

    assert events[0] == AbortReceived("t1", fetched=False)
    assert isinstance(events[1], TaskReceived)
    task = agent.fetch_task()
    assert task is not None
    assert task.task_id == "t2"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        pytest.param({"meta": "not a dict"}, "meta must be a dict", id="meta-not-dict"),
        pytest.param({"meta": {1: "x"}}, "meta keys must be str", id="meta-non-str-key"),
        pytest.param({"task_name": 42}, "task_name must be str", id="task-name-not-str"),
    ],
)
def test_bad_task_data_is_answered_with_bad_task_data(kwargs: dict[str, Any], problem: str) -> None:
    agent = ready_agent()

    events = agent.receive(assign("bad", **kwargs))

    assert len(events) == 1
    assert isinstance(events[0], BadTaskReceived)
    assert events[0].task_id == "bad"
    assert problem in events[0].reason
    assert agent.data_to_send() == [
        TaskAck(task_id="bad"),
        Result(task_id="bad", return_code=RC.BAD_TASK_DATA, meta={}, data={}),
    ]
    assert agent.fetch_task() is None
    assert agent.unsettled == 1
    # A resend of the bad task is only acknowledged.
    assert agent.receive(assign("bad", **kwargs)) == []
    assert agent.data_to_send() == [TaskAck(task_id="bad")]
    # The agent stays usable.
    task = give_task(agent, "good")
    assert task.meta == {"round": 1}
    submission = agent.submit(TaskResult({}, {"ok": True}))
    assert submission is not None
    assert results(agent.data_to_send()) == [
        Result(task_id="good", return_code=RC.OK, meta={}, data={"ok": True})
    ]


def test_bad_task_does_not_disturb_the_current_task() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    events = agent.receive(assign("bad", meta=[1]))
    assert [type(e) for e in events] == [BadTaskReceived]
    assert not agent.current_aborted
    assert agent.submit(TaskResult({}, {})) is not None


# -- results --------------------------------------------------------------------------------------


def test_result_ack_accepted_settles_submission_and_duplicate_is_ignored() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    submission = agent.submit(TaskResult({}, {"x": 1}))
    assert submission is not None
    agent.data_to_send()

    events = agent.receive(ResultAck(task_id="t1", accepted=True))

    assert events == [ResultSettled(submission)]
    assert events[0].submission is submission
    assert submission.accepted is True
    assert submission.reason == ""
    assert agent.unsettled == 0
    # The ack of a resend: ignored, the verdict stays.
    assert agent.receive(ResultAck(task_id="t1", accepted=False, reason="late")) == []
    assert submission.accepted is True
    assert submission.reason == ""


def test_result_ack_refused_settles_submission_false_with_reason() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    submission = agent.submit(TaskResult({}, {"x": 1}))
    assert submission is not None

    events = agent.receive(ResultAck(task_id="t1", accepted=False, reason="the task was aborted"))

    assert events == [ResultSettled(submission)]
    assert submission.accepted is False
    assert submission.reason == "the task was aborted"
    assert agent.unsettled == 0


def test_result_ack_for_unknown_task_is_ignored() -> None:
    agent = ready_agent()
    assert agent.receive(ResultAck(task_id="nope", accepted=True)) == []


def test_unsettled_results_are_resent_after_reconnect_and_settled_ones_are_not() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    first = agent.submit(TaskResult({}, {"x": 1}))
    give_task(agent, "t2")
    second = agent.submit(TaskResult({}, {"x": 2}))
    assert first is not None
    assert second is not None
    assert agent.data_to_send() == [second.message]
    agent.receive(ResultAck(task_id="t1", accepted=True))

    agent.connection_lost()
    assert agent.state is AgentState.IDLE
    assert agent.unsettled == 1
    agent.connection_made()
    [hello] = agent.data_to_send()
    assert isinstance(hello, Hello)
    agent.receive(welcome())

    assert agent.data_to_send() == [second.message]
    assert second.message == Result(task_id="t2", return_code=RC.OK, meta={}, data={"x": 2})
    assert first.accepted is True
    assert second.accepted is None
    assert agent.receive(ResultAck(task_id="t2", accepted=True)) == [ResultSettled(second)]
    assert second.accepted is True
    # And after another reconnect nothing is resent.
    agent.connection_lost()
    connect(agent)
    assert agent.data_to_send() == []


def test_result_is_resent_after_every_reconnect_until_acked() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    submission = agent.submit(TaskResult({}, {"x": 1}))
    assert submission is not None
    for _ in range(3):
        agent.connection_lost()
        connect(agent)
        assert agent.data_to_send() == [submission.message]
    agent.receive(ResultAck(task_id="t1", accepted=True))
    assert submission.accepted is True


def test_submit_while_disconnected_is_sent_after_welcome() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    agent.connection_lost()

    submission = agent.submit(TaskResult({}, {"x": 1}))

    assert submission is not None
    assert agent.data_to_send() == []
    agent.connection_made()
    assert [type(m) for m in agent.data_to_send()] == [Hello]
    agent.receive(welcome())
    assert agent.data_to_send() == [submission.message]


# -- logs -----------------------------------------------------------------------------------------


def test_logs_are_queued_while_disconnected_and_flushed_after_welcome() -> None:
    agent = make_agent(max_queued_logs=3)
    for i in range(5):
        agent.log(f"k{i}", i, step=i)
    assert agent.logs_dropped == 2
    assert agent.data_to_send() == []

    agent.connection_made()
    assert [type(m) for m in agent.data_to_send()] == [Hello]
    agent.log("k5", 5)  # during the handshake: queued too, but the queue is full
    assert agent.logs_dropped == 3
    agent.receive(welcome())

    assert agent.data_to_send() == [
        Log(key="k0", value=0, step=0),
        Log(key="k1", value=1, step=1),
        Log(key="k2", value=2, step=2),
    ]
    assert agent.logs_dropped == 3
    # While connected, logs go straight out, regardless of the cap.
    for i in range(5):
        agent.log("live", i)
    assert len(agent.data_to_send()) == 5
    assert agent.logs_dropped == 3


def test_logs_carry_the_current_task_id_and_follow_resent_results() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    agent.log("loss", 0.25, step=7)
    assert agent.data_to_send() == [Log(key="loss", value=0.25, step=7, task_id="t1")]
    agent.connection_lost()
    agent.log("loss", 0.125, step=8)
    submission = agent.submit(TaskResult({}, {}))
    assert submission is not None
    agent.log("after", 1)

    connect(agent)

    assert agent.data_to_send() == [
        submission.message,
        Log(key="loss", value=0.125, step=8, task_id="t1"),
        Log(key="after", value=1, step=None, task_id=None),
    ]


# -- closing --------------------------------------------------------------------------------------


def test_close_while_ready_queues_bye_and_settles_unsettled_submissions() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    acked = agent.submit(TaskResult({}, {"x": 1}))
    give_task(agent, "t2")
    unacked = agent.submit(TaskResult({}, {"x": 2}))
    give_task(agent, "t3")
    agent.receive(assign("t4"))  # aborts t3, leaves t4 pending
    agent.data_to_send()
    agent.receive(ResultAck(task_id="t1", accepted=True))
    assert acked is not None
    assert unacked is not None

    agent.close("training done")

    assert agent.data_to_send() == [Bye(reason="training done")]
    assert agent.state is AgentState.CLOSED
    assert agent.close_reason == "training done"
    assert acked.accepted is True
    assert unacked.accepted is False
    assert "training done" in unacked.reason
    assert agent.unsettled == 0
    assert agent.current_aborted
    with pytest.raises(AgentClosed, match="training done"):
        agent.fetch_task()
    # Closing twice does nothing more.
    agent.close("again")
    assert agent.data_to_send() == []
    assert agent.close_reason == "training done"


def test_close_while_disconnected_sends_no_bye() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    submission = agent.submit(TaskResult({}, {}))
    agent.connection_lost()

    agent.close("stopped")

    assert agent.state is AgentState.CLOSED
    assert agent.data_to_send() == []
    assert submission is not None
    assert submission.accepted is False
    with pytest.raises(LocalProtocolError):
        agent.connection_made()


def test_close_before_submit_makes_submit_return_none() -> None:
    agent = ready_agent()
    give_task(agent, "t1")
    agent.close("stopped")
    agent.data_to_send()
    assert agent.current_aborted
    assert agent.submit(TaskResult({}, {})) is None
    assert agent.data_to_send() == []


def test_bye_from_site_closes_agent() -> None:
    agent = ready_agent()
    give_task(agent, "t1")

    events = agent.receive(Bye(reason="job finished"))

    assert events == [ByeReceived("job finished")]
    assert agent.state is AgentState.CLOSED
    assert "job finished" in agent.close_reason
    assert agent.data_to_send() == []  # no goodbye back
    assert agent.current_aborted
    with pytest.raises(AgentClosed, match="job finished"):
        agent.fetch_task()
    assert agent.submit(TaskResult({}, {})) is None
    assert agent.receive(Heartbeat()) == []
    # connection_lost after the close keeps it closed.
    agent.connection_lost()
    assert agent.state is AgentState.CLOSED


# -- results that hold back their arrays ----------------------------------------------------------


def held_submission(agent: AgentProtocol, hold_arrays: bool = True) -> Submission:
    agent.receive(msgspec.structs.replace(assign("t1"), hold_arrays=hold_arrays))
    agent.data_to_send()
    assert agent.fetch_task() is not None
    submission = agent.submit(TaskResult({}, {"w": np.ones(2), "n": 1, "b": np.zeros(1)}))
    assert submission is not None
    return submission


def test_a_result_holds_back_its_arrays_only_for_a_task_that_asks() -> None:
    agent = ready_agent()
    held = held_submission(agent)
    (sent,) = results(agent.data_to_send())
    assert (sent.data, sent.held) == ({"w": None, "n": 1, "b": None}, ["w", "b"])
    assert sent.held_nbytes == [16, 8]  # float64: what the site will fetch, before it asks
    assert list(held.held) == ["w", "b"]

    agent = ready_agent()
    whole = held_submission(agent, hold_arrays=False)
    (sent,) = results(agent.data_to_send())
    assert sent.held == [] and sent.held_nbytes == [] and sent.data["w"] is whole.message.data["w"]
    assert whole.held == {}


def test_held_arrays_are_kept_until_the_result_settles_or_the_agent_closes() -> None:
    agent = ready_agent()
    settled = held_submission(agent)
    agent.receive(ResultAck(task_id="t1", accepted=True))
    assert settled.held == {}

    agent = ready_agent()
    closed = held_submission(agent)
    agent.connection_lost()  # a reconnect keeps them: the site may still ask
    assert list(closed.held) == ["w", "b"]
    agent.close("stopping")
    assert closed.held == {} and closed.accepted is False


# -- tasks whose entries come after them ----------------------------------------------------------


def announce(agent: AgentProtocol, task_id: str = "t1", **fields: Any) -> list[Any]:
    values: dict[str, Any] = {"data": {"w": None, "n": 1, "b": None}, "coming": ["w", "b"]}
    values.update(fields)
    message = TaskAssign(task_id=task_id, task_name="train", meta={}, **values)
    return agent.receive(message)


def test_a_task_with_coming_entries_is_pending_and_acknowledged_once_all_came() -> None:
    agent = ready_agent()
    assert announce(agent) == []
    assert agent.data_to_send() == [] and not agent.task_pending
    w, b = np.arange(3.0), np.ones(2)
    assert agent.receive(Part(task_id="t1", key="w", value=w)) == []
    assert agent.data_to_send() == [PartAck(task_id="t1", key="w")]  # the site may let go
    assert not agent.task_pending
    assert agent.receive(Part(task_id="t1", key="b", value=b)) == [TaskReceived("t1", "train")]
    assert agent.data_to_send() == [PartAck(task_id="t1", key="b"), TaskAck(task_id="t1")]
    task = agent.fetch_task()
    assert task is not None and task.coming == []
    assert list(task.data) == ["w", "n", "b"]  # the data's order stays
    assert task.data["w"] is w and task.data["b"] is b and task.data["n"] == 1


def test_an_arriving_task_is_dropped_by_an_abort_or_a_newer_task() -> None:
    agent = ready_agent()
    announce(agent)
    assert agent.receive(Abort(task_id="t1")) == []  # the trainer never heard of it
    assert agent.receive(Part(task_id="t1", key="w", value=1)) == []
    assert agent.receive(Part(task_id="t1", key="b", value=2)) == []
    assert not agent.task_pending and agent.data_to_send() == []

    announce(agent, "t2")
    agent.receive(Part(task_id="t2", key="w", value=1))
    give_task(agent, "t3")  # newer: t2 is gone, and its late entries too
    assert agent.receive(Part(task_id="t2", key="b", value=2)) == []
    assert agent.data_to_send() == []


def test_what_came_of_an_arriving_task_stays_across_a_reconnect() -> None:
    agent = ready_agent()
    announce(agent)
    agent.receive(Part(task_id="t1", key="w", value="w"))
    agent.connection_lost()  # the site let go of "w" once acknowledged, or sends it again
    connect(agent)
    agent.data_to_send()
    assert announce(agent) == []  # the site's resend, with the entries it still has
    assert agent.receive(Part(task_id="t1", key="b", value="b")) == [TaskReceived("t1", "train")]
    task = agent.fetch_task()
    assert task is not None and task.data == {"w": "w", "n": 1, "b": "b"}


def test_an_entry_that_cannot_be_decoded_makes_the_task_bad_task_data() -> None:
    agent = ready_agent()
    announce(agent)
    events = agent.receive(Part(task_id="t1", key="w", error="cannot decode the entry: x"))
    assert events == [BadTaskReceived("t1", "entry 'w': cannot decode the entry: x")]
    ack, result = agent.data_to_send()
    assert ack == TaskAck(task_id="t1")
    assert isinstance(result, Result) and result.return_code == RC.BAD_TASK_DATA
    assert not agent.task_pending


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"data": [1, 2]}, "must have dict data, got list"),
        ({"coming": ["w", "w"]}, "distinct str keys"),
        ({"coming": [1]}, "distinct str keys"),
    ],
)
def test_a_task_whose_coming_entries_cannot_be_filled_in_is_bad_task_data(
    fields: dict[str, Any], problem: str
) -> None:
    agent = ready_agent()
    (event,) = announce(agent, **fields)
    assert isinstance(event, BadTaskReceived) and problem in event.reason


def test_an_entry_the_task_did_not_announce_is_the_sites_protocol_error() -> None:
    agent = ready_agent()
    announce(agent)
    with pytest.raises(RemoteProtocolError, match="'x' of task 't1' was not said to be coming"):
        agent.receive(Part(task_id="t1", key="x", value=1))
