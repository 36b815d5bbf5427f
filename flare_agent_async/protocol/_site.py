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
* an agent works on one task at a time: assigning a new one aborts the one it has (NVFlare's rule);
* a task assigned with ``coming`` entries goes out at once, and each entry after it as the site's
  caller gives it (`send_part`); the entries given so far go again with every resend of the task,
  except, without ``keep_task_data``, those the agent acknowledged (`PartAck`): they are let go
  of, and a restarted agent's task fails with `TaskLost`;
* a result that holds back arrays (a task assigned with ``hold_arrays``) is acknowledged only
  when the site's caller calls `release`: until then the agent keeps the arrays, and each
  `request_part` is asked again on every new connection. An agent that restarts or leaves
  meanwhile fails the requests still open (`TaskLost`, `AgentGone`).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
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
    Part,
    PartAck,
    PartRequest,
    Result,
    ResultAck,
    TaskAck,
    TaskAssign,
    Welcome,
)
from ._util import RecentIds

__all__ = [
    "FetchEnded",
    "LogReceived",
    "LogRecord",
    "PartFetch",
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
    held: tuple[str, ...] = ()
    """The keys of the result's entries its agent holds back until `SiteSession.release`."""
    held_nbytes: tuple[int, ...] = ()
    """The size in bytes of each held-back entry, in ``held``'s order, if the agent said."""
    parts: dict[str, Any] = field(default_factory=dict)
    """The ``coming`` entries given (`SiteSession.send_part`) and kept, to send them again."""
    given: set[str] = field(default_factory=set)
    """The keys of the ``coming`` entries given so far."""

    @property
    def task_id(self) -> str:
        return self.message.task_id

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(eq=False)
class PartFetch:
    """One held-back entry of a result, asked of the agent: it ends with a ``value`` or an
    ``error``, once."""

    agent_id: str
    task_id: str
    key: str
    value: Any = None
    error: BaseException | None = None
    done: bool = False

    def _end(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error, self.done = value, error, True


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


@dataclass(frozen=True)
class FetchEnded:
    """A part fetch ended: with its value, or failed."""

    fetch: PartFetch


SiteEvent = TaskFinished | LogReceived | ResultRefused | FetchEnded


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
    #: Results whose agent holds back entries, by task id: each held key, with its open fetch.
    _held: dict[str, dict[str, PartFetch | None]] = field(default_factory=dict, init=False)
    #: Held results lost with a restart, by task id: why, for a later `request_part`.
    _lost_held: RecentIds[str] = field(default_factory=RecentIds, init=False)

    # -- connections ------------------------------------------------------------------------------

    def connection_made(self, hello: Hello, proof: bytes = b"") -> list[SiteTask | PartFetch]:
        """The agent (re)connected with an accepted hello: welcome it and resend what it lacks.

        ``proof`` is the site's `site_proof` when the agent authenticated with a shared secret.
        Returns the tasks that fail because the agent restarted after the site released their
        data (``keep_task_data=False``), and the part fetches that fail because it restarted
        with their result.

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
        lost: list[SiteTask | PartFetch] = []
        if restarted:
            lost.extend(
                self._drop_held(
                    lambda task_id: TaskLost(
                        f"agent {self.agent_id!r} restarted before the site had fetched the arrays "
                        f"of task {task_id!r}'s result"
                    )
                )
            )
        for task_id, fetches in self._held.items():
            self._outbox.extend(
                PartRequest(task_id=task_id, key=key)
                for key, fetch in fetches.items()
                if fetch is not None
            )
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
                self._outbox.extend(
                    Part(task_id=task.task_id, key=key, value=value)
                    for key, value in task.parts.items()
                )
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
        self,
        task_id: str,
        task_name: str,
        meta: dict[str, Any],
        data: Any,
        *,
        hold_arrays: bool = False,
        coming: Sequence[str] = (),
    ) -> tuple[SiteTask, list[SiteTask]]:
        """Assign a task; returns it and the tasks it superseded (now finished as aborted).

        With ``hold_arrays``, the agent's result holds back the numpy arrays at the top of its
        data (`SiteTask.held`), for `request_part`, until `release`. ``coming`` names entries
        of the data (a dict) that are not here yet: each follows the task with `send_part`.

        :raises AgentGone: the agent has left.
        :raises ValueError: ``task_id`` is already in use for this agent; or ``coming`` names
            keys that are not distinct str, or entries the data has, or the data is no dict.
        """
        if self.state is SessionState.GONE:
            raise AgentGone(f"agent {self.agent_id!r} is gone: {self.gone_reason}")
        if task_id in self._tasks or task_id in self._finished:
            raise ValueError(f"task id {task_id!r} is already used for agent {self.agent_id!r}")
        coming = list(coming)
        if coming:
            if not isinstance(data, dict):
                raise ValueError("a task with coming entries needs dict data")
            if not all(isinstance(key, str) for key in coming) or len(set(coming)) != len(coming):
                raise ValueError(f"coming must name distinct str keys, got {coming!r}")
            if any(data.get(key) is not None for key in coming):
                raise ValueError("the data has entries that coming says are still to come")
            data = {**data, **dict.fromkeys(coming)}  # the keys, in place for the entries
        superseded = [
            self._abort(old, TaskAborted(f"task {old.task_id!r} was superseded by {task_id!r}"))
            for old in list(self._tasks.values())
        ]
        message = TaskAssign(
            task_id=task_id,
            task_name=task_name,
            meta=meta,
            data=data,
            hold_arrays=hold_arrays,
            coming=coming,
        )
        task = SiteTask(self.agent_id, message)
        self._tasks[task_id] = task
        if self.state is SessionState.CONNECTED:
            self._outbox.append(task.message)
        return task, superseded

    def send_part(self, task_id: str, key: str, value: Any) -> bool:
        """Give one of a task's ``coming`` entries; it goes to the agent now, or with the task's
        next resend. Returns False if the task has ended (aborted, say): nobody needs it.

        :raises ValueError: the task's entry ``key`` was not coming, or was already given.
        """
        task = self._tasks.get(task_id)
        if task is None:
            return False
        if key not in task.message.coming or key in task.given:
            raise ValueError(f"entry {key!r} of task {task_id!r} is not one still to come")
        task.given.add(key)
        task.parts[key] = value
        if self.state is SessionState.CONNECTED:
            self._outbox.append(Part(task_id=task_id, key=key, value=value))
        return True

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

    def give_up(self, reason: str) -> list[SiteTask | PartFetch]:
        """The agent stayed away too long: it is gone and its unfinished tasks fail."""
        return self._gone(reason)

    def close(self, reason: str) -> list[SiteTask | PartFetch]:
        """The site is closing: say goodbye and fail the unfinished tasks."""
        if self.state is SessionState.CONNECTED:
            self._outbox.append(Bye(reason=reason))
        return self._gone(f"the site closed: {reason}")

    def _gone(self, reason: str) -> list[SiteTask | PartFetch]:
        if self.state is SessionState.GONE:
            return []
        self.state = SessionState.GONE
        self.gone_reason = reason
        tasks = list(self._tasks.values())
        for task in tasks:
            self._finish(task, error=AgentGone(f"agent {self.agent_id!r} is gone: {reason}"))
        fetches = self._drop_held(lambda _: AgentGone(f"agent {self.agent_id!r} is gone: {reason}"))
        return [*tasks, *fetches]

    def _drop_held(self, error: Callable[[str], SiteError]) -> list[PartFetch]:
        """Forget the held-back results; their open fetches end with ``error(task_id)``."""
        failed = []
        for task_id, fetches in self._held.items():
            self._lost_held.add(task_id, str(error(task_id)))
            for fetch in fetches.values():
                if fetch is not None:
                    fetch._end(error=error(task_id))
                    failed.append(fetch)
        self._held.clear()
        return failed

    # -- held-back results ------------------------------------------------------------------------

    def request_part(self, task_id: str, key: str) -> PartFetch:
        """Ask the agent for an entry its result holds back; the fetch ends with a `FetchEnded`
        event (or fails if the agent restarts or leaves first). While one is open for the key,
        that one is returned: the agent is asked once.

        :raises AgentGone: the agent has left.
        :raises TaskLost: the agent restarted, and its result with it.
        :raises ValueError: no result of this task holds back ``key`` (it was released, or the
            key was never held).
        """
        if self.state is SessionState.GONE:
            raise AgentGone(f"agent {self.agent_id!r} is gone: {self.gone_reason}")
        lost = self._lost_held.get(task_id)
        if lost is not None:
            raise TaskLost(lost)
        fetches = self._held.get(task_id)
        if fetches is None or key not in fetches:
            raise ValueError(
                f"no result of task {task_id!r} from agent {self.agent_id!r} holds back {key!r}"
            )
        fetch = fetches[key]
        if fetch is not None:
            return fetch
        fetch = fetches[key] = PartFetch(self.agent_id, task_id, key)
        if self.state is SessionState.CONNECTED:
            self._outbox.append(PartRequest(task_id=task_id, key=key))
        return fetch

    def cancel_part(self, fetch: PartFetch) -> None:
        """The caller no longer waits for ``fetch``: its entry may be asked for again, and what
        arrives for it is dropped."""
        fetches = self._held.get(fetch.task_id)
        if fetches is not None and fetches.get(fetch.key) is fetch:
            fetches[fetch.key] = None

    def release(self, task_id: str, *, accepted: bool = True, reason: str = "") -> list[PartFetch]:
        """Acknowledge a result whose entries the site fetched (or no longer wants): the agent lets
        go of them. Returns the fetches still open, now failed. Unknown task ids are ignored.
        """
        fetches = self._held.pop(task_id, None)
        if fetches is None:
            return []
        if not accepted:  # what a resend of the result will be told
            self._finished.add(task_id, reason or "the site refused the result")
        if self.state is SessionState.CONNECTED:
            self._outbox.append(ResultAck(task_id=task_id, accepted=accepted, reason=reason))
        failed = [fetch for fetch in fetches.values() if fetch is not None]
        for fetch in failed:
            fetch._end(error=TaskLost(f"the result of task {task_id!r} was released"))
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
        if isinstance(message, Part):
            return self._part(message)
        if isinstance(message, TaskAck):
            task = self._tasks.get(message.task_id)
            if task is not None:
                if len(task.given) < len(task.message.coming):
                    raise RemoteProtocolError(
                        f"agent {self.agent_id!r} acknowledged task {task.task_id!r} "
                        "before all its entries came"
                    )
                task.acked = True
                if not self.config.keep_task_data:
                    # The agent has the data: what stays here is all a resend would need.
                    task.message = msgspec.structs.replace(task.message, data=None)
                    task.parts = {}
                    task.released = True
            return []
        if isinstance(message, PartAck):
            task = self._tasks.get(message.task_id)
            if task is not None and message.key in task.given and not self.config.keep_task_data:
                task.parts.pop(message.key, None)  # gone already if the ack came twice
                task.released = True  # a restarted agent cannot be sent this task again
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
            ended = self._gone(f"it said goodbye: {message.reason}")
            return [
                TaskFinished(item) if isinstance(item, SiteTask) else FetchEnded(item)
                for item in ended
            ]
        raise RemoteProtocolError(
            f"unexpected {type(message).__name__} message from agent {self.agent_id!r}"
        )

    def _part(self, message: Part) -> list[SiteEvent]:
        fetches = self._held.get(message.task_id)
        fetch = None if fetches is None else fetches.get(message.key)
        if fetch is None:  # cancelled or released meanwhile, or a repeat after a reconnect
            return []
        assert fetches is not None
        fetches[message.key] = None
        if message.error:
            fetch._end(
                error=TaskLost(
                    f"agent {self.agent_id!r} cannot send entry {message.key!r} of task "
                    f"{message.task_id!r}'s result: {message.error}"
                )
            )
        else:
            fetch._end(value=message.value)
        return [FetchEnded(fetch)]

    def _result(self, message: Result) -> list[SiteEvent]:
        task_id = message.task_id
        if task_id in self._held:  # resent after a reconnect; it is being fetched
            return []
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
        held = message.held
        if held:
            if not task.message.hold_arrays:
                raise RemoteProtocolError(
                    f"agent {self.agent_id!r} held back arrays of task {task_id!r}, "
                    "which did not ask it to"
                )
            data = message.data
            if not isinstance(data, dict) or not all(
                isinstance(key, str) and key in data for key in held
            ):
                raise RemoteProtocolError(
                    f"agent {self.agent_id!r} holds back entries its result's data does not have"
                )
            nbytes = message.held_nbytes
            if nbytes and (len(nbytes) != len(held) or min(nbytes) < 0):
                raise RemoteProtocolError(
                    f"agent {self.agent_id!r} gave {len(nbytes)} sizes for {len(held)} held-back "
                    "entries, or a negative one"
                )
            self._held[task_id] = dict.fromkeys(held)
            task.held, task.held_nbytes = tuple(held), tuple(nbytes)
        else:
            self._outbox.append(ResultAck(task_id=task_id, accepted=True))
        self._finish(task, result=result)
        return [TaskFinished(task)]

    @property
    def unfinished(self) -> int:
        """How many tasks the session holds (finished ones are forgotten: a long run does not
        grow it)."""
        return len(self._tasks)
