"""The agent side of the protocol, as a state machine that does no I/O.

Theory of operation
-------------------
`AgentProtocol` lives as long as the agent, across any number of connections. The driver (the
async agent) tells it when a connection is made or lost, hands it every message received, and sends
what `data_to_send` returns. The trainer's calls (`fetch_task`, `submit`) change the same state.

Connection states::

    IDLE --connection_made--> HANDSHAKE --Welcome--> READY --connection_lost--> IDLE
      any --Reject / Bye / close()--> CLOSED   (final)

Task states, one task at a time (NVFlare's rule)::

    pending --fetch_task--> current --submit--> submitted --ResultAck--> settled
    pending --Abort--> dropped          current --Abort or newer task--> aborted

Guarantees the machine keeps, whatever the connection does:

* a task id is handed to the trainer at most once (resends are acknowledged and dropped);
* a submitted result is resent after every reconnect until the site acknowledges it;
* a task whose data does not validate is answered with ``RC.BAD_TASK_DATA`` and never reaches the
  trainer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..defs import RC, Task, TaskResult
from ..exceptions import AgentClosed, CallStateError, LocalProtocolError, RemoteProtocolError
from ._auth import agent_proof, site_proof, verify
from ._messages import (
    PROTOCOL_VERSION,
    Abort,
    Bye,
    Challenge,
    Heartbeat,
    Hello,
    Log,
    Message,
    Proof,
    Reject,
    Result,
    ResultAck,
    TaskAck,
    TaskAssign,
    Welcome,
)
from ._payload import InvalidPayload
from ._util import RecentIds

ACK_DELAY = 0.01
"""Seconds a task acknowledgement may wait for a message to ride along with."""

__all__ = [
    "ACK_DELAY",
    "AgentProtocol",
    "AgentState",
    "BadTask",
    "Closed",
    "Rejected",
    "Submission",
    "TaskAborted",
    "TaskArrived",
    "Welcomed",
]


class AgentState(enum.Enum):
    IDLE = "idle"
    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


@dataclass(eq=False)
class Submission:
    """A submitted result awaiting the site's verdict: ``accepted`` is None until it arrives."""

    task_id: str
    message: Result
    accepted: bool | None = None
    reason: str = ""


# Events returned by `AgentProtocol.receive`.
@dataclass(frozen=True)
class Welcomed:
    heartbeat_interval: float
    heartbeat_timeout: float


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class TaskArrived:
    task: Task


@dataclass(frozen=True)
class TaskAborted:
    task_id: str
    fetched: bool


@dataclass(frozen=True)
class BadTask:
    task_id: str
    reason: str


@dataclass(frozen=True)
class Settled:
    submission: Submission


@dataclass(frozen=True)
class Closed:
    reason: str


Event = Welcomed | Rejected | TaskArrived | TaskAborted | BadTask | Settled | Closed


def _task_data_problem(message: TaskAssign) -> str | None:
    """Why a task's fields cannot be handed to a trainer, or None if they can."""
    if isinstance(message.data, InvalidPayload):
        return message.data.reason
    # A decoder checks these types; objects from the memory transport arrive unchecked.
    task_name: object = message.task_name
    meta: object = message.meta
    if not isinstance(task_name, str):
        return f"task_name must be str, got {type(task_name).__name__}"
    if not isinstance(meta, dict):
        return f"meta must be a dict, got {type(meta).__name__}"
    bad_keys = [key for key in meta if not isinstance(key, str)]
    if bad_keys:
        return f"meta keys must be str, got {bad_keys[0]!r}"
    return None


@dataclass
class AgentProtocol:
    """The agent's half of the protocol: what to send, and what the site's messages mean."""

    agent_id: str
    site_name: str
    job_id: str | None = None
    instance_id: str = ""
    secret: bytes | None = field(default=None, repr=False)
    """Shared with the site: the agent proves it knows it, and requires the site to."""
    max_queued_logs: int = 10_000

    state: AgentState = field(default=AgentState.IDLE, init=False)
    close_reason: str = field(default="", init=False)
    #: Set by the site's welcome; until then, None.
    heartbeat_interval: float | None = field(default=None, init=False)
    heartbeat_timeout: float | None = field(default=None, init=False)
    logs_dropped: int = field(default=0, init=False)

    _outbox: list[Message] = field(default_factory=list, init=False)
    _pending: Task | None = field(default=None, init=False)
    _current: Task | None = field(default=None, init=False)
    _unsettled: dict[str, Submission] = field(default_factory=dict, init=False)
    _seen: RecentIds[None] = field(default_factory=RecentIds, init=False)
    _queued_logs: list[Log] = field(default_factory=list, init=False)
    _hello: Hello | None = field(default=None, init=False)
    _site_nonce: bytes | None = field(default=None, init=False)

    # -- connection lifecycle (called by the driver) ------------------------------------------

    def connection_made(self, nonce: bytes = b"") -> None:
        """A new connection is up: the hello goes first, with fresh random ``nonce`` bytes."""
        if self.state is AgentState.CLOSED:
            raise LocalProtocolError(f"the agent is closed ({self.close_reason})")
        self.state = AgentState.HANDSHAKE
        self._site_nonce = None
        self._hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            agent_id=self.agent_id,
            site_name=self.site_name,
            job_id=self.job_id,
            instance_id=self.instance_id,
            nonce=nonce,
        )
        self._outbox = [self._hello]

    def connection_lost(self) -> None:
        """The connection is gone; unsent messages are dropped (acks too: the site resends).

        The next connection resends what matters: the hello, unacknowledged results and the logs
        queued while disconnected. Log records and heartbeats that were in flight are lost.
        """
        if self.state is not AgentState.CLOSED:
            self.state = AgentState.IDLE
        self._outbox.clear()

    def data_to_send(self, *, flush_acks: bool = True) -> list[Message]:
        """The messages to send now, in order; the outbox is empty afterwards.

        Task acknowledgements may wait: with ``flush_acks=False`` an outbox of nothing but acks
        stays for later, so that a quick trainer's result and the ack of its task leave
        together. The driver flushes them after `ACK_DELAY` at the latest.
        """
        if not flush_acks and self.has_deferred:
            return []
        out, self._outbox = self._outbox, []
        return out

    @property
    def has_deferred(self) -> bool:
        """Whether the outbox holds task acknowledgements and nothing else."""
        return bool(self._outbox) and all(type(message) is TaskAck for message in self._outbox)

    def close(self, reason: str) -> None:
        """Close for good: say goodbye if connected; unsettled results count as not submitted."""
        if self.state is AgentState.CLOSED:
            return
        if self.state is AgentState.READY:
            self._outbox.append(Bye(reason=reason))
        self._close(reason)

    def _close(self, reason: str) -> None:
        self.state = AgentState.CLOSED
        self.close_reason = reason
        self._pending = None
        for submission in self._unsettled.values():
            submission.accepted = False
            submission.reason = f"the agent closed before the site acknowledged: {reason}"
        self._unsettled.clear()
        if self._current is not None:
            self._current._set_aborted()

    # -- messages from the site -----------------------------------------------------------------

    def receive(self, message: Message) -> list[Event]:
        """Take in one message from the site; returns what happened.

        :raises RemoteProtocolError: the site broke the protocol; close this connection.
        """
        state = self.state
        if state is AgentState.CLOSED:
            return []
        if state is AgentState.HANDSHAKE:
            if isinstance(message, Welcome):
                return self._welcomed(message)
            if isinstance(message, Challenge) and self._site_nonce is None:
                self._site_nonce = message.nonce
                assert self._hello is not None
                mac = (
                    b""
                    if self.secret is None
                    else agent_proof(self.secret, self._hello, message.nonce)
                )
                self._outbox.append(Proof(mac=mac))
                return []
            if isinstance(message, Reject):
                reason = message.reason
                if self._site_nonce is not None and self.secret is None:
                    reason += " (the site requires a shared secret, and this agent has none)"
                self._close(f"the site rejected the agent: {reason}")
                return [Rejected(reason)]
        elif state is AgentState.READY:
            if isinstance(message, TaskAssign):
                return self._task_assigned(message)
            if isinstance(message, Abort):
                return self._abort(message.task_id)
            if isinstance(message, ResultAck):
                return self._result_acked(message)
            if isinstance(message, Heartbeat):
                return []
            if isinstance(message, Bye):
                self._close(f"the site said goodbye: {message.reason}")
                return [Closed(message.reason)]
        raise RemoteProtocolError(
            f"unexpected {type(message).__name__} message from the site in state {state.value}"
        )

    def _welcomed(self, message: Welcome) -> list[Event]:
        if message.protocol_version != PROTOCOL_VERSION or message.site_name != self.site_name:
            raise RemoteProtocolError(
                f"welcome from site {message.site_name!r} with protocol version "
                f"{message.protocol_version}; expected site {self.site_name!r}, "
                f"version {PROTOCOL_VERSION}"
            )
        if self.secret is not None:
            assert self._hello is not None
            expected = site_proof(self.secret, self._hello, self._site_nonce or b"")
            if self._site_nonce is None or not verify(expected, message.proof):
                raise RemoteProtocolError(
                    "the site did not prove it knows the shared secret: refusing to work for it"
                )
        self.state = AgentState.READY
        self.heartbeat_interval = message.heartbeat_interval
        self.heartbeat_timeout = message.heartbeat_timeout
        self._outbox.extend(s.message for s in self._unsettled.values())
        self._outbox.extend(self._queued_logs)
        self._queued_logs.clear()
        return [Welcomed(message.heartbeat_interval, message.heartbeat_timeout)]

    def _task_assigned(self, message: TaskAssign) -> list[Event]:
        task_id = message.task_id
        self._outbox.append(TaskAck(task_id=task_id))
        if task_id in self._seen:
            return []
        self._seen.add(task_id, None)
        problem = _task_data_problem(message)
        if problem is not None:
            result = TaskResult({}, None, RC.BAD_TASK_DATA)
            self._queue_result(task_id, result)
            return [BadTask(task_id, problem)]
        events: list[Event] = []
        current = self._current
        if current is not None and not current.aborted:
            # NVFlare's rule: a newer task means the site gave up on the one being worked on.
            current._set_aborted()
            events.append(TaskAborted(current.task_id, fetched=True))
        if self._pending is not None:
            events.append(TaskAborted(self._pending.task_id, fetched=False))
        self._pending = Task(message.task_name, task_id, message.meta, message.data)
        events.append(TaskArrived(self._pending))
        return events

    def _abort(self, task_id: str) -> list[Event]:
        self._seen.add(task_id, None)  # a resend of an aborted task must not revive it
        if self._pending is not None and self._pending.task_id == task_id:
            self._pending = None
            return [TaskAborted(task_id, fetched=False)]
        if self._current is not None and self._current.task_id == task_id:
            self._current._set_aborted()
            return [TaskAborted(task_id, fetched=True)]
        return []

    def _result_acked(self, message: ResultAck) -> list[Event]:
        submission = self._unsettled.pop(message.task_id, None)
        if submission is None:
            return []  # the ack of a resend that was already acknowledged
        submission.accepted = message.accepted
        submission.reason = message.reason
        return [Settled(submission)]

    # -- the trainer's calls --------------------------------------------------------------------

    def fetch_task(self) -> Task | None:
        """Hand the pending task to the trainer, or None if there is none yet.

        :raises AgentClosed: the agent is closed.
        :raises CallStateError: the current task is neither submitted nor aborted.
        """
        if self.state is AgentState.CLOSED:
            raise AgentClosed(f"the agent is closed: {self.close_reason}")
        current = self._current
        if current is not None and not current.aborted:
            raise CallStateError(
                f"get_task called while task {current} has no submitted result; "
                "call submit_result first"
            )
        task = self._pending
        if task is None:
            return None
        self._pending = None
        self._current = task
        return task

    def submit(self, result: TaskResult) -> Submission | None:
        """Submit the current task's result; None if it is not sent (aborted, or agent closed).

        :raises TypeError: ``result`` is not a `TaskResult`; the state is unchanged.
        :raises CallStateError: there is no current task (none fetched, or already submitted).
        """
        if not isinstance(result, TaskResult):
            raise TypeError(f"result must be a TaskResult, got {type(result).__name__}")
        task = self._current
        if task is None:
            raise CallStateError("submit_result called without a fetched task; call get_task first")
        self._current = None
        if task.aborted or self.state is AgentState.CLOSED:
            return None
        return self._queue_result(task.task_id, result)

    def _queue_result(self, task_id: str, result: TaskResult) -> Submission:
        message = Result(
            task_id=task_id, return_code=result.return_code, meta=result.meta, data=result.data
        )
        submission = Submission(task_id, message)
        self._unsettled[task_id] = submission
        if self.state is AgentState.READY:
            self._outbox.append(message)
        return submission

    def log(self, key: str, value: Any, step: int | None = None) -> None:
        """Queue a log record; kept while disconnected, up to ``max_queued_logs``."""
        if self.state is AgentState.CLOSED:
            raise AgentClosed(f"the agent is closed: {self.close_reason}")
        task_id = self._current.task_id if self._current is not None else None
        record = Log(key=key, value=value, step=step, task_id=task_id)
        if self.state is AgentState.READY:
            self._outbox.append(record)
        elif len(self._queued_logs) < self.max_queued_logs:
            self._queued_logs.append(record)
        else:
            self.logs_dropped += 1

    def heartbeat(self) -> None:
        """Queue a heartbeat (the driver calls this when the connection has been idle)."""
        if self.state is AgentState.READY:
            self._outbox.append(Heartbeat())

    # -- state for the driver -----------------------------------------------------------------

    @property
    def has_pending_task(self) -> bool:
        return self._pending is not None

    @property
    def unsettled(self) -> int:
        """How many submitted results await the site's acknowledgement."""
        return len(self._unsettled)
