"""The site side of the protocol: one `SiteSession` per agent id, doing no I/O.

Theory of operation
-------------------
A session outlives the connections of its agent. The driver (the site) checks each hello with
`check_hello`, finds or makes the agent's session, calls `connection_made`, feeds it every message
and sends what `data_to_send` returns. Tasks are assigned with `assign` and end in exactly one way:
a result, an abort, or the agent going away.

Session states::

    CONNECTED --connection_lost--> DISCONNECTED --connection_made--> CONNECTED
    any --Bye / give_up() / close()--> GONE   (final; a new hello makes a new session)

Guarantees:

* one result per task id is ever kept; a resent result is acknowledged again and dropped;
* an agent may only answer tasks assigned to it: any other result is refused;
* after a reconnect, tasks the agent has not acknowledged are sent again; after a restart (a new
  ``instance_id``) every unfinished task is, since the old process took its tasks with it;
* an agent works on one task at a time: assigning a new one aborts the one it has (NVFlare's rule).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..defs import TaskResult
from ..exceptions import (
    AgentGone,
    LocalProtocolError,
    RemoteProtocolError,
    SiteError,
    TaskAborted,
    TaskLost,
)
from ._messages import (
    PROTOCOL_VERSION,
    Abort,
    Bye,
    Heartbeat,
    Hello,
    Log,
    Message,
    Result,
    ResultAck,
    TaskAck,
    TaskAssign,
    Welcome,
)
from ._util import RecentIds

__all__ = [
    "LogReceived",
    "LogRecord",
    "ResultRefused",
    "SessionState",
    "SiteConfig",
    "SiteSession",
    "SiteTask",
    "TaskFinished",
    "check_hello",
]


@dataclass(frozen=True)
class SiteConfig:
    """What a site tells its agents, and checks their hellos against."""

    site_name: str
    job_id: str | None = None
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    #: Keep each task's data until its result, to send it again to an agent that restarts; if
    #: False, it is released once the agent acknowledged the task, and the task of an agent that
    #: restarts fails with `TaskLost`.
    keep_task_data: bool = True


def check_hello(hello: Hello, config: SiteConfig) -> str | None:
    """Why this hello must be rejected, or None to accept it."""
    if hello.protocol_version != PROTOCOL_VERSION:
        return (
            f"the agent speaks protocol version {hello.protocol_version}, "
            f"this site speaks version {PROTOCOL_VERSION}"
        )
    if hello.site_name != config.site_name:
        return f"this is site {config.site_name!r}, not {hello.site_name!r}"
    if hello.job_id is not None and hello.job_id != config.job_id:
        return f"this site runs job {config.job_id!r}, not {hello.job_id!r}"
    if not hello.agent_id:
        return "the agent id must not be empty"
    return None


class SessionState(enum.Enum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    GONE = "gone"


@dataclass(eq=False)
class SiteTask:
    """The site's record of one task: it ends with a ``result`` or an ``error``, once."""

    agent_id: str
    message: TaskAssign
    acked: bool = False
    released: bool = False  # the data was dropped once the agent had it (keep_task_data=False)
    result: TaskResult | None = None
    error: BaseException | None = None

    @property
    def task_id(self) -> str:
        return self.message.task_id

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(frozen=True)
class LogRecord:
    """A log record (a metric, usually) an agent sent with `AsyncFlareAgent.log`."""

    agent_id: str
    key: str
    value: Any
    step: int | None
    task_id: str | None
    data_type: str | None = None
    """What the value is, for a tracking system (see `AsyncFlareAgent.log`)."""
    options: dict[str, Any] = field(default_factory=dict)
    """More for the record's receiver, as the agent sent it."""


# Events returned by `SiteSession.receive` and friends.
@dataclass(frozen=True)
class TaskFinished:
    task: SiteTask


@dataclass(frozen=True)
class LogReceived:
    record: LogRecord


@dataclass(frozen=True)
class ResultRefused:
    task_id: str
    reason: str


SiteEvent = TaskFinished | LogReceived | ResultRefused


@dataclass
class SiteSession:
    """The site's half of the protocol for one agent id."""

    agent_id: str
    config: SiteConfig
    instance_id: str = ""

    state: SessionState = field(default=SessionState.DISCONNECTED, init=False)
    gone_reason: str = field(default="", init=False)
    _tasks: dict[str, SiteTask] = field(default_factory=dict, init=False)
    #: Finished task ids, each with why a resent result is refused ("" if it was kept).
    _finished: RecentIds[str] = field(default_factory=RecentIds, init=False)
    #: Recently aborted task ids: their aborts are sent again on every new connection, since one
    #: lost with a connection would let the agent start on a task the site no longer wants.
    _recent_aborts: deque[str] = field(default_factory=lambda: deque(maxlen=16), init=False)
    _outbox: list[Message] = field(default_factory=list, init=False)

    # -- connections ------------------------------------------------------------------------------

    def connection_made(self, hello: Hello, proof: bytes = b"") -> list[SiteTask]:
        """The agent (re)connected with an accepted hello: welcome it and resend what it lacks.

        ``proof`` is the site's `site_proof` when the agent authenticated with a shared secret.
        Returns the tasks that fail because the agent restarted after the site released their
        data (``keep_task_data=False``).

        :raises LocalProtocolError: the session is gone; make a new one for the agent.
        """
        if self.state is SessionState.GONE:
            raise LocalProtocolError(f"the session of agent {self.agent_id!r} is gone")
        restarted = hello.instance_id != self.instance_id
        self.instance_id = hello.instance_id
        self.state = SessionState.CONNECTED
        config = self.config
        self._outbox = [
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                site_name=config.site_name,
                heartbeat_interval=config.heartbeat_interval,
                heartbeat_timeout=config.heartbeat_timeout,
                proof=proof,
            )
        ]
        self._outbox.extend(Abort(task_id=task_id) for task_id in self._recent_aborts)
        lost = []
        for task in list(self._tasks.values()):
            if task.released and restarted:
                self._finish(
                    task,
                    error=TaskLost(
                        f"agent {self.agent_id!r} restarted after it "
                        f"received task {task.task_id!r}, whose data the site no longer keeps"
                    ),
                )
                lost.append(task)
            elif restarted or not task.acked:
                task.acked = False
                self._outbox.append(task.message)
        return lost

    def connection_lost(self) -> None:
        if self.state is SessionState.CONNECTED:
            self.state = SessionState.DISCONNECTED
        self._outbox.clear()

    def data_to_send(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    # -- the site's calls -------------------------------------------------------------------------

    def assign(
        self, task_id: str, task_name: str, meta: dict[str, Any], data: Any
    ) -> tuple[SiteTask, list[SiteTask]]:
        """Assign a task; returns it and the tasks it superseded (now finished as aborted).

        :raises AgentGone: the agent has left.
        :raises ValueError: ``task_id`` is already in use for this agent.
        """
        if self.state is SessionState.GONE:
            raise AgentGone(f"agent {self.agent_id!r} is gone: {self.gone_reason}")
        if task_id in self._tasks or task_id in self._finished:
            raise ValueError(f"task id {task_id!r} is already used for agent {self.agent_id!r}")
        superseded = [
            self._abort(old, TaskAborted(f"task {old.task_id!r} was superseded by {task_id!r}"))
            for old in list(self._tasks.values())
        ]
        task = SiteTask(
            self.agent_id, TaskAssign(task_id=task_id, task_name=task_name, meta=meta, data=data)
        )
        self._tasks[task_id] = task
        if self.state is SessionState.CONNECTED:
            self._outbox.append(task.message)
        return task, superseded

    def abort(self, task_id: str) -> SiteTask | None:
        """Abort an unfinished task; returns it (ended by `TaskAborted`), or None if unknown."""
        task = self._tasks.get(task_id)
        if task is None:
            return None
        return self._abort(task, TaskAborted(f"task {task_id!r} was aborted by the site"))

    def _abort(self, task: SiteTask, error: SiteError) -> SiteTask:
        self._finish(task, error=error)
        self._recent_aborts.append(task.task_id)
        if self.state is SessionState.CONNECTED:
            self._outbox.append(Abort(task_id=task.task_id))
        return task

    def _finish(
        self,
        task: SiteTask,
        *,
        result: TaskResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        del self._tasks[task.task_id]
        if result is not None:
            refusal = ""
        elif isinstance(error, TaskAborted):
            refusal = "the task was aborted"
        else:
            refusal = f"the task already ended: {error}"
        self._finished.add(task.task_id, refusal)
        task.result = result
        task.error = error

    def give_up(self, reason: str) -> list[SiteTask]:
        """The agent stayed away too long: it is gone and its unfinished tasks fail."""
        return self._gone(reason)

    def close(self, reason: str) -> list[SiteTask]:
        """The site is closing: say goodbye and fail the unfinished tasks."""
        if self.state is SessionState.CONNECTED:
            self._outbox.append(Bye(reason=reason))
        return self._gone(f"the site closed: {reason}")

    def _gone(self, reason: str) -> list[SiteTask]:
        if self.state is SessionState.GONE:
            return []
        self.state = SessionState.GONE
        self.gone_reason = reason
        failed = list(self._tasks.values())
        for task in failed:
            self._finish(task, error=AgentGone(f"agent {self.agent_id!r} is gone: {reason}"))
        return failed

    # -- messages from the agent ------------------------------------------------------------------

    def receive(self, message: Message) -> list[SiteEvent]:
        """Take in one message from the agent; returns what happened.

        :raises RemoteProtocolError: the agent broke the protocol; close its connection.
        """
        if self.state is not SessionState.CONNECTED:
            return []
        if isinstance(message, Result):
            return self._result(message)
        if isinstance(message, TaskAck):
            task = self._tasks.get(message.task_id)
            if task is not None:
                task.acked = True
                if not self.config.keep_task_data and not task.released:
                    # The agent has the data: what stays here is all a resend would need.
                    task.message = msgspec.structs.replace(task.message, data=None)
                    task.released = True
            return []
        if isinstance(message, Heartbeat):
            self._outbox.append(Heartbeat())
            return []
        if isinstance(message, Log):
            options = message.options
            record = LogRecord(
                self.agent_id,
                message.key,
                message.value,
                message.step,
                message.task_id,
                message.data_type,
                options if isinstance(options, dict) else {},
            )
            return [LogReceived(record)]
        if isinstance(message, Bye):
            return [TaskFinished(task) for task in self._gone(f"it said goodbye: {message.reason}")]
        raise RemoteProtocolError(
            f"unexpected {type(message).__name__} message from agent {self.agent_id!r}"
        )

    def _result(self, message: Result) -> list[SiteEvent]:
        task_id = message.task_id
        task = self._tasks.get(task_id)
        if task is None:
            refusal = self._finished.get(task_id)
            if refusal is None:
                refusal = f"task {task_id!r} was not assigned to agent {self.agent_id!r}"
            accepted = refusal == ""
            reason = "duplicate: the result was already received" if accepted else refusal
            self._outbox.append(ResultAck(task_id=task_id, accepted=accepted, reason=reason))
            return [] if accepted else [ResultRefused(task_id, reason)]
        try:
            result = TaskResult(message.meta, message.data, message.return_code)
        except TypeError as exc:
            reason = f"malformed result: {exc}"
            self._outbox.append(ResultAck(task_id=task_id, accepted=False, reason=reason))
            self._finish(
                task, error=RemoteProtocolError(f"agent {self.agent_id!r} sent a {reason}")
            )
            return [ResultRefused(task_id, reason), TaskFinished(task)]
        self._finish(task, result=result)
        self._outbox.append(ResultAck(task_id=task_id, accepted=True))
        return [TaskFinished(task)]

    @property
    def unfinished(self) -> int:
        """How many tasks the session holds (finished ones are forgotten: a long run does not
        grow it)."""
        return len(self._tasks)
