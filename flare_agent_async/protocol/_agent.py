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

A task assigned with ``hold_arrays`` has its result sent without the numpy arrays at the top of
its data: the agent answers the site's `PartRequest` for each, as often as asked, until the
result is acknowledged.

A task whose entries are ``coming`` arrives in pieces: the `TaskAssign`, then a `Part` for each
such entry, each acknowledged (`PartAck`) so that the site may let go of it. Until the last one,
the task is *arriving*: not pending, not acknowledged, and dropped by an abort or a newer task.
What came stays across reconnects: the site sends the task again, and the entries it still has.

The machine knows tasks by id: `fetch_task` hands over the site's `TaskAssign`, and the driver
makes the trainer's `Task` of it, signals its abort when an `AbortReceived` event says so, and
runs the trainer's abort callbacks. Nothing here runs user code.

`receive` looks up each message in a table keyed by connection state and message type
(`_TRANSITIONS`); a message the table does not name is the site's protocol error.

Guarantees the machine keeps, whatever the connection does:

* a task id is handed to the trainer at most once (resends are acknowledged and dropped);
* a submitted result is resent after every reconnect until the site acknowledges it, and its
  held-back arrays are kept as long;
* a task whose data does not validate is answered with ``RC.BAD_TASK_DATA`` and never reaches the
  trainer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from ..defs import RC, TaskResult
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
    Part,
    PartAck,
    PartRequest,
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
    "AbortReceived",
    "AgentEvent",
    "AgentProtocol",
    "AgentState",
    "BadTaskReceived",
    "ByeReceived",
    "RejectReceived",
    "ResultSettled",
    "Submission",
    "TaskReceived",
    "WelcomeReceived",
]


class AgentState(enum.Enum):
    """Where the agent's connection stands; see the module docstring for the transitions."""

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
    held: dict[str, Any] = field(default_factory=dict)
    """The entries the result holds back for the site to fetch, kept until it is settled."""


# Events returned by `AgentProtocol.receive`: what the site's message meant.
@dataclass(frozen=True)
class WelcomeReceived:
    """The site welcomed the agent: the connection is ready, with these liveness settings."""

    heartbeat_interval: float
    heartbeat_timeout: float


@dataclass(frozen=True)
class RejectReceived:
    """The site refused the agent; the machine is closed. The driver raises
    `ConnectionRejected` with ``reason`` from ``start``."""

    reason: str


@dataclass(frozen=True)
class TaskReceived:
    """A new task is pending; `AgentProtocol.fetch_task` hands it over."""

    task_id: str
    task_name: str


@dataclass(frozen=True)
class AbortReceived:
    """The site gave up on a task: by an abort, or by sending a newer task (NVFlare's rule).

    ``fetched`` tells whether the trainer has it: then the driver signals the abort on the
    trainer's `Task`, and the task's result will not be sent. An unfetched task is just dropped.
    """

    task_id: str
    fetched: bool


@dataclass(frozen=True)
class BadTaskReceived:
    """A task whose fields cannot reach a trainer; it was answered with ``RC.BAD_TASK_DATA``."""

    task_id: str
    reason: str


@dataclass(frozen=True)
class ResultSettled:
    """The site acknowledged a submitted result: ``submission.accepted`` says whether it kept it."""

    submission: Submission


@dataclass(frozen=True)
class ByeReceived:
    """The site said goodbye; the machine is closed, and the driver's waiting calls end."""

    reason: str


AgentEvent = (
    WelcomeReceived
    | RejectReceived
    | TaskReceived
    | AbortReceived
    | BadTaskReceived
    | ResultSettled
    | ByeReceived
)
"""Any event `AgentProtocol.receive` returns."""


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


@dataclass(eq=False)
class _Arriving:
    """A task whose ``coming`` entries are on their way: its data so far, and the keys missing."""

    message: TaskAssign
    data: dict[str, Any]
    missing: set[str]


def _coming_problem(message: TaskAssign) -> str | None:
    """Why a task's ``coming`` entries cannot be filled in, or None if they can."""
    if not isinstance(message.data, dict):
        return f"a task with coming entries must have dict data, got {type(message.data).__name__}"
    keys: list[object] = list(message.coming)
    if not all(isinstance(key, str) for key in keys) or len(set(keys)) != len(keys):
        return f"the coming entries must be distinct str keys, got {keys!r}"
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
    _pending: TaskAssign | None = field(default=None, init=False)
    _arriving: _Arriving | None = field(default=None, init=False)  # waits for coming entries
    _current_id: str | None = field(default=None, init=False)  # fetched, not yet submitted
    _current_aborted: bool = field(default=False, init=False)
    _current_holds: bool = field(default=False, init=False)  # its result holds back arrays
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
        self._arriving = None
        for submission in self._unsettled.values():
            submission.accepted = False
            submission.reason = f"the agent closed before the site acknowledged: {reason}"
            submission.held = {}
        self._unsettled.clear()
        if self._current_id is not None:
            self._current_aborted = True

    # -- messages from the site -----------------------------------------------------------------

    def receive(self, message: Message) -> list[AgentEvent]:
        """Take in one message from the site; returns what happened.

        :raises RemoteProtocolError: the site broke the protocol; close this connection.
        """
        state = self.state
        if state is AgentState.CLOSED:
            return []
        transition = _TRANSITIONS.get((state, type(message)))
        if transition is None:
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__} message from the site in state {state.value}"
            )
        return transition(self, message)

    def _challenged(self, message: Challenge) -> list[AgentEvent]:
        if self._site_nonce is not None:
            raise RemoteProtocolError(
                "unexpected Challenge message from the site in state handshake (a second one)"
            )
        self._site_nonce = message.nonce
        assert self._hello is not None
        mac = b"" if self.secret is None else agent_proof(self.secret, self._hello, message.nonce)
        self._outbox.append(Proof(mac=mac))
        return []

    def _rejected(self, message: Reject) -> list[AgentEvent]:
        reason = message.reason
        if self._site_nonce is not None and self.secret is None:
            reason += " (the site requires a shared secret, and this agent has none)"
        self._close(f"the site rejected the agent: {reason}")
        return [RejectReceived(reason)]

    def _said_bye(self, message: Bye) -> list[AgentEvent]:
        self._close(f"the site said goodbye: {message.reason}")
        return [ByeReceived(message.reason)]

    def _heartbeat_answered(self, message: Heartbeat) -> list[AgentEvent]:
        return []

    def _welcomed(self, message: Welcome) -> list[AgentEvent]:
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
        return [WelcomeReceived(message.heartbeat_interval, message.heartbeat_timeout)]

    def _task_assigned(self, message: TaskAssign) -> list[AgentEvent]:
        task_id = message.task_id
        if task_id in self._seen:
            self._outbox.append(TaskAck(task_id=task_id))
            return []
        arriving = self._arriving
        if arriving is not None and arriving.message.task_id == task_id:
            return []  # sent again after a reconnect: what came stays, the rest follows
        self._arriving = None  # superseded by a newer task
        problem = _task_data_problem(message)
        if problem is None and message.coming:
            problem = _coming_problem(message)
            if problem is None:
                assert isinstance(message.data, dict)
                self._arriving = _Arriving(message, dict(message.data), set(message.coming))
                return []
        return self._task_arrived(message, problem)

    def _part_arrived(self, message: Part) -> list[AgentEvent]:
        arriving = self._arriving
        if arriving is None or arriving.message.task_id != message.task_id:
            return []  # an entry of a task aborted or superseded meanwhile
        key = message.key
        if key not in arriving.message.coming:
            raise RemoteProtocolError(
                f"entry {key!r} of task {message.task_id!r} was not said to be coming"
            )
        if message.error:
            self._arriving = None
            return self._task_arrived(arriving.message, f"entry {key!r}: {message.error}")
        arriving.data[key] = message.value
        arriving.missing.discard(key)
        self._outbox.append(PartAck(task_id=message.task_id, key=key))
        if arriving.missing:
            return []
        self._arriving = None
        whole = msgspec.structs.replace(arriving.message, data=arriving.data, coming=[])
        return self._task_arrived(whole, None)

    def _task_arrived(self, message: TaskAssign, problem: str | None) -> list[AgentEvent]:
        """A task is here whole (or ``problem`` says why it cannot reach a trainer)."""
        task_id = message.task_id
        self._outbox.append(TaskAck(task_id=task_id))
        self._seen.add(task_id, None)
        if problem is not None:
            result = TaskResult({}, None, RC.BAD_TASK_DATA)
            self._queue_result(task_id, result)
            return [BadTaskReceived(task_id, problem)]
        events: list[AgentEvent] = []
        if self._current_id is not None and not self._current_aborted:
            # NVFlare's rule: a newer task means the site gave up on the one being worked on.
            self._current_aborted = True
            events.append(AbortReceived(self._current_id, fetched=True))
        if self._pending is not None:
            events.append(AbortReceived(self._pending.task_id, fetched=False))
        self._pending = message
        events.append(TaskReceived(task_id, message.task_name))
        return events

    def _aborted(self, message: Abort) -> list[AgentEvent]:
        task_id = message.task_id
        self._seen.add(task_id, None)  # a resend of an aborted task must not revive it
        if self._arriving is not None and self._arriving.message.task_id == task_id:
            self._arriving = None  # the trainer never heard of it
            return []
        if self._pending is not None and self._pending.task_id == task_id:
            self._pending = None
            return [AbortReceived(task_id, fetched=False)]
        if self._current_id == task_id and not self._current_aborted:
            self._current_aborted = True
            return [AbortReceived(task_id, fetched=True)]
        return []

    def _part_requested(self, message: PartRequest) -> list[AgentEvent]:
        task_id, key = message.task_id, message.key
        submission = self._unsettled.get(task_id)
        if submission is None:
            error = f"no result of task {task_id!r} awaits the site's acknowledgement"
        elif key not in submission.held:
            error = f"the result of task {task_id!r} holds back no entry {key!r}"
        else:
            self._outbox.append(Part(task_id=task_id, key=key, value=submission.held[key]))
            return []
        self._outbox.append(Part(task_id=task_id, key=key, error=error))
        return []

    def _result_acked(self, message: ResultAck) -> list[AgentEvent]:
        submission = self._unsettled.pop(message.task_id, None)
        if submission is None:
            return []  # the ack of a resend that was already acknowledged
        submission.accepted = message.accepted
        submission.reason = message.reason
        submission.held = {}  # the arrays are the trainer's again
        return [ResultSettled(submission)]

    # -- the trainer's calls --------------------------------------------------------------------

    def fetch_task(self) -> TaskAssign | None:
        """Hand the pending task to the trainer, or None if there is none yet.

        :raises AgentClosed: the agent is closed.
        :raises CallStateError: the current task is neither submitted nor aborted.
        """
        if self.state is AgentState.CLOSED:
            raise AgentClosed(f"the agent is closed: {self.close_reason}")
        if self._current_id is not None and not self._current_aborted:
            raise CallStateError(
                f"get_task called while task '{self._current_id}' has no submitted result; "
                "call submit_result first"
            )
        task = self._pending
        if task is None:
            return None
        self._pending = None
        self._current_id = task.task_id
        self._current_aborted = False
        self._current_holds = task.hold_arrays
        return task

    @property
    def task_pending(self) -> bool:
        """Whether a task waits for `fetch_task`."""
        return self._pending is not None

    @property
    def current_aborted(self) -> bool:
        """Whether the site gave up on the task the trainer holds."""
        return self._current_aborted

    def submit(self, result: TaskResult) -> Submission | None:
        """Submit the current task's result; None if it is not sent (aborted, or agent closed).

        :raises TypeError: ``result`` is not a `TaskResult`; the state is unchanged.
        :raises CallStateError: there is no current task (none fetched, or already submitted).
        """
        if not isinstance(result, TaskResult):
            raise TypeError(f"result must be a TaskResult, got {type(result).__name__}")
        task_id = self._current_id
        if task_id is None:
            raise CallStateError("submit_result called without a fetched task; call get_task first")
        self._current_id = None
        if self._current_aborted or self.state is AgentState.CLOSED:
            return None
        return self._queue_result(task_id, result, hold_arrays=self._current_holds)

    def _queue_result(
        self, task_id: str, result: TaskResult, *, hold_arrays: bool = False
    ) -> Submission:
        data, held = result.data, {}
        if hold_arrays and isinstance(data, dict):
            held = {key: value for key, value in data.items() if isinstance(value, np.ndarray)}
            if held:  # the keys' order stays; the arrays wait here for the site's requests
                data = {key: None if key in held else value for key, value in data.items()}
        message = Result(
            task_id=task_id,
            return_code=result.return_code,
            meta=result.meta,
            data=data,
            held=list(held),
            held_nbytes=[value.nbytes for value in held.values()],
        )
        submission = Submission(task_id, message, held=held)
        self._unsettled[task_id] = submission
        if self.state is AgentState.READY:
            self._outbox.append(message)
        return submission

    def log(
        self,
        key: str,
        value: Any,
        step: int | None = None,
        *,
        data_type: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Queue a log record; kept while disconnected, up to ``max_queued_logs``."""
        if self.state is AgentState.CLOSED:
            raise AgentClosed(f"the agent is closed: {self.close_reason}")
        record = Log(
            key=key,
            value=value,
            step=step,
            task_id=self._current_id,
            data_type=data_type,
            options=options or None,
        )
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
    def unsettled(self) -> int:
        """How many submitted results await the site's acknowledgement."""
        return len(self._unsettled)


_Transition = Callable[[AgentProtocol, Any], list[AgentEvent]]

_TRANSITIONS: dict[tuple[AgentState, type[Message]], _Transition] = {
    (AgentState.HANDSHAKE, Challenge): AgentProtocol._challenged,
    (AgentState.HANDSHAKE, Welcome): AgentProtocol._welcomed,
    (AgentState.HANDSHAKE, Reject): AgentProtocol._rejected,
    (AgentState.READY, TaskAssign): AgentProtocol._task_assigned,
    (AgentState.READY, Abort): AgentProtocol._aborted,
    (AgentState.READY, ResultAck): AgentProtocol._result_acked,
    (AgentState.READY, PartRequest): AgentProtocol._part_requested,
    (AgentState.READY, Part): AgentProtocol._part_arrived,
    (AgentState.READY, Heartbeat): AgentProtocol._heartbeat_answered,
    (AgentState.READY, Bye): AgentProtocol._said_bye,
}
"""What each message from the site does, by connection state (IDLE and CLOSED take none)."""
