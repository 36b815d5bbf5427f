"""`AsyncFlareAgent`: the agent a trainer awaits, on asyncio or trio.

It drives `flare_agent_async.protocol.AgentProtocol` over a transport: one connection at a time, a
reader and a writer in the agent's task group, heartbeats when idle, and reconnection with backoff
when the connection drops. Every rule about tasks and results lives in the protocol; this module
only moves messages and wakes the callers that wait.
"""

from __future__ import annotations

import logging
import math
import os
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from ._connection import Connection
from ._validate import as_secret, check_timeout
from ._wakeup import Wakeup
from .defs import Task, TaskResult
from .exceptions import (
    AgentClosed,
    CallStateError,
    ConnectionRejected,
    ProtocolError,
    TransportError,
)
from .protocol import (
    ACK_DELAY,
    AbortReceived,
    AgentProtocol,
    AgentState,
    BadTaskReceived,
    Limits,
    Message,
    RejectReceived,
    ResultSettled,
    Submission,
    TaskAssign,
    WelcomeReceived,
    check_payload,
)
from .transports import Connector, MessageStream, Progress, connector_for

__all__ = ["AsyncFlareAgent"]

logger = logging.getLogger("flare_agent_async.agent")


def _verdict(submission: Submission | None) -> bool:
    """What `submit_result` returns for a settled submission (None: not sent)."""
    if submission is None:
        return False
    if not submission.accepted:
        logger.warning("result of task %s was not kept: %s", submission.task_id, submission.reason)
    return bool(submission.accepted)


class AsyncFlareAgent:
    """An agent that receives tasks from a FLARE site and returns their results.

    Use it as an async context manager (or call `start` and `stop` from one task)::

        agent = AsyncFlareAgent("memory://site-1", agent_id="a1", site_name="site-1")
        async with agent:
            async for task in agent.tasks():
                await agent.submit_result(TaskResult({}, train(task.data)))

    :param site: the site's URL (``tcp://host:port``, ``unix:///path``, ``tls://host:port``,
        ``memory://name``) or a `Connector`.
    :param agent_id: this agent's id; a restarted agent uses the same id.
    :param site_name: the site's name, checked by the site.
    :param job_id: the job this agent serves, checked by the site when given.
    :param secret: a secret shared with the site: each side proves to the other that it knows it
        (an HMAC challenge; the secret never crosses the wire).
    :param ssl_context: for ``tls://``: what to trust, and the client certificate for mutual TLS
        (see `flare_agent_async.tls.client_context`).
    :param limits: the largest frames this agent accepts.
    :param connect_timeout: how long `start` tries to connect before it gives up, in seconds.
    :param reconnect_timeout: how long a dropped connection is retried, until a site welcomes
        the agent again, before the agent closes.
    :param close_timeout: how long `stop` waits for submitted results to be acknowledged.
    :param max_backoff: the longest wait between two connection attempts, in seconds.
    :param on_progress: called with a `Progress` as large tasks and results move.
    """

    def __init__(
        self,
        site: str | Connector,
        *,
        agent_id: str,
        site_name: str,
        job_id: str | None = None,
        secret: bytes | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        connect_timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
        close_timeout: float = 10.0,
        max_backoff: float = 2.0,
        on_progress: Callable[[Progress], object] | None = None,
    ) -> None:
        if not isinstance(agent_id, str) or not agent_id:
            raise ValueError(f"agent_id must be a non-empty str, got {agent_id!r}")
        if not isinstance(site_name, str) or not site_name:
            raise ValueError(f"site_name must be a non-empty str, got {site_name!r}")
        self._connector = connector_for(site, ssl_context=ssl_context, limits=limits)
        self._protocol = AgentProtocol(
            agent_id, site_name, job_id, instance_id=uuid.uuid4().hex, secret=as_secret(secret)
        )
        self._on_progress = on_progress
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._close_timeout = close_timeout
        self._max_backoff = max_backoff
        self._group: TaskGroup | None = None
        self._group_to_exit: TaskGroup | None = None
        self._changed = Wakeup()  # every change of state
        self._connection: Connection | None = None
        self._failure: BaseException | None = None
        self._rejection: str | None = None
        self._stopped = False
        self._run_scope: anyio.CancelScope
        self._run_done: anyio.Event
        self._exit_on_stop = False
        self._host_task = 0
        self._task: Task | None = None  # the task the trainer holds, to signal its abort
        self._welcome_scope: anyio.CancelScope | None = None  # bounds a reconnect until welcomed

    @property
    def agent_id(self) -> str:
        return self._protocol.agent_id

    @property
    def connected(self) -> bool:
        """Whether the agent is connected to its site right now."""
        return self._protocol.state is AgentState.READY

    @property
    def failure(self) -> BaseException | None:
        """Why the agent closed, when a failure closed it (the site gone, a protocol error);
        None while it runs, and after `stop` or the site's goodbye."""
        return self._failure

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the site; returns once the site welcomed the agent.

        Pair it with `stop` in the same task; ``async with agent`` does both.

        :raises ConnectionRejected: the site refused the agent (wrong site, job or version).
        :raises TransportError: no connection within ``connect_timeout``.
        :raises CallStateError: the agent was already started.
        """
        await self._enter(exit_on_stop=True)

    async def stop(self) -> None:
        """Stop the agent: wait (up to ``close_timeout``) for submitted results, then say goodbye.

        Blocked `get_task` calls raise `AgentClosed`; a `submit_result` still waiting returns
        False. It can be called more than once, and from any task of the agent's event loop: from
        another task it closes the agent, and the task that called `start` still calls `stop` to
        finish.
        """
        if self._group is None:
            self._stopped = True
            return
        if not self._stopped:
            self._stopped = True
            deadline = anyio.current_time() + self._close_timeout
            with anyio.CancelScope(deadline=deadline, shield=True):
                while self._protocol.unsettled and self._protocol.state is not AgentState.CLOSED:
                    await self._changed.wait()
            self._close("the agent stopped")
            if self._connection is not None:
                with anyio.CancelScope(deadline=deadline, shield=True):
                    await self._run_done.wait()  # the goodbye is sent
            self._run_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._run_done.wait()
        if self._exit_on_stop and anyio.get_current_task().id == self._host_task:
            await self._exit()

    async def __aenter__(self) -> Self:
        await self._enter(exit_on_stop=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        await self._exit()

    async def _enter(self, *, exit_on_stop: bool) -> None:
        if self._group is not None or self._stopped:
            raise CallStateError("the agent was already started; create a new one to start again")
        self._run_done = anyio.Event()
        self._run_scope = anyio.CancelScope()  # shielded once the site welcomed the agent
        self._exit_on_stop = exit_on_stop
        self._host_task = anyio.get_current_task().id
        group = self._group = anyio.create_task_group()
        await group.__aenter__()
        try:
            await group.start(self._run_scoped)
        except BaseException as exc:
            self._stopped = True
            self._protocol.close(f"the agent failed to start: {exc!r}")
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)  # nothing else runs in it yet
            raise
        self._group_to_exit = group

    async def _exit(self) -> None:
        group, self._group_to_exit = self._group_to_exit, None
        if group is not None:
            await group.__aexit__(None, None, None)

    # -- the trainer's calls ----------------------------------------------------------------------

    async def get_task(self, timeout: float | None = None) -> Task | None:
        """Wait for the next task, up to ``timeout`` seconds (None: until one arrives).

        Cancelling the call loses nothing: a task that arrives stays queued for the next call.
        One caller at a time: when a task arrives, concurrent callers other than the one that
        gets it raise `CallStateError`.

        :returns: the task, or None if none arrived in time.
        :raises AgentClosed: the agent is closed (stopped, the site said goodbye or is gone).
        :raises CallStateError: the agent is not started, or the current task has no result yet.
        :raises TypeError: ``timeout`` is not a number.
        :raises ValueError: ``timeout`` is not positive.
        """
        seconds = check_timeout(timeout)
        self._check_started()
        assigned = self._protocol.fetch_task()
        if assigned is not None:
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return self._hand_over(assigned)
        if seconds == math.inf:
            return await self._next_task()
        with anyio.move_on_after(seconds):
            return await self._next_task()
        return None

    async def _next_task(self) -> Task:
        while (assigned := self._protocol.fetch_task()) is None:
            await self._changed.wait()
        return self._hand_over(assigned)  # no checkpoint since the fetch: nothing is lost

    @property
    def task_ready(self) -> bool:
        """Whether a task is here, waiting for `get_task`. Any thread may read it, as a hint: a
        task may arrive just after it reads False, and only `get_task` takes one."""
        return self._protocol.task_pending

    def get_task_nowait(self) -> Task | None:
        """The next task if it is here already, else None; never waits.

        :raises AgentClosed: the agent is closed.
        :raises CallStateError: the agent is not started, or the current task has no result yet.
        """
        self._check_started()
        assigned = self._protocol.fetch_task()
        return None if assigned is None else self._hand_over(assigned)

    def _hand_over(self, assigned: TaskAssign) -> Task:
        """The trainer's `Task` for a fetched assignment; the agent keeps it to signal aborts."""
        task = self._task = Task(assigned.task_name, assigned.task_id, assigned.meta, assigned.data)
        return task

    def _abort_task(self, task_id: str | None = None) -> None:
        """Signal the abort on the trainer's task (``task_id``'s, or whichever it holds): its
        abort callbacks run here, in the agent's event loop."""
        task = self._task
        if task is not None and (task_id is None or task.task_id == task_id):
            task.set_aborted()

    async def submit_result(self, result: TaskResult) -> bool:
        """Submit the current task's result and wait until the site acknowledges it.

        Cancelling the call does not withdraw the result: it is still delivered, and `stop` waits
        for it.

        :returns: True once the site kept the result; False if the task was aborted, the site
            refused the result, or the agent closed first.
        :raises TypeError: ``result`` is not a `TaskResult` (nothing changes).
        :raises CallStateError: no task was fetched, or its result was already submitted.
        """
        submission = self._submit(result)
        while submission is not None and submission.accepted is None:
            await self._changed.wait()
        return _verdict(submission)

    def submit_result_nowait(
        self, result: TaskResult, on_settled: Callable[[bool], object]
    ) -> None:
        """`submit_result` without waiting, for callers outside the event loop (the sync facade):
        ``on_settled`` gets what `submit_result` returns, in the agent's event loop, once the site
        answered (at once when the result is not sent). Raises as `submit_result`."""
        submission = self._submit(result)

        def settle() -> bool:  # no reference to itself: no cycle to keep the result alive
            if submission is not None and submission.accepted is None:
                return False
            on_settled(_verdict(submission))
            return True

        if not settle():
            self._changed.call_until(settle)

    def _submit(self, result: TaskResult) -> Submission | None:
        """Queue the current task's result; None if it is not sent (aborted, or agent closed)."""
        self._check_started()
        if isinstance(result, TaskResult):
            check_payload(result.meta, "result.meta")  # TypeError before anything changes
            check_payload(result.data, "result.data")
        submission = self._protocol.submit(result)
        self._task = None  # the trainer's result is in; the site's abort would come too late
        if submission is not None:
            self._wake_writer()
        return submission

    async def log(
        self,
        key: str,
        value: Any,
        step: int | None = None,
        *,
        data_type: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Send a log record (a metric, usually) to the site, tagged with the current task.

        ``data_type`` says what the value is and ``options`` carry more for its receiver,
        for a tracking system (the Client API's writers set them as NVFlare's do).

        :raises AgentClosed: the agent is closed.
        :raises TypeError: the value or an option cannot be sent.
        """
        self._check_started()
        check_payload(value, f"log value {key!r}")
        check_payload(options, f"log options of {key!r}")
        if data_type is not None and not isinstance(data_type, str):
            raise TypeError(f"data_type must be a str, got {type(data_type).__name__}")
        self._protocol.log(key, value, step, data_type=data_type, options=options)
        self._wake_writer()
        await anyio.lowlevel.checkpoint()

    async def tasks(self) -> AsyncIterator[Task]:
        """Iterate over tasks until the site says goodbye or the agent is stopped.

        Submit each task's result (or let it be aborted) before asking for the next one.

        :raises AgentClosed: the agent closed because of a failure (the site is gone, say).
        """
        while True:
            try:
                task = await self.get_task()
            except AgentClosed:
                if self.failure is not None:
                    raise
                return
            assert task is not None
            yield task
            del task  # not kept alive while waiting for the next one: models are large

    # -- internals ------------------------------------------------------------------------------

    def _check_started(self) -> None:
        if self._group is None:
            raise CallStateError("the agent is not started: use 'async with agent' or start()")

    def _wake_writer(self) -> None:
        if self._connection is not None:
            self._connection.wake()

    def _close(self, reason: str, failure: BaseException | None = None) -> None:
        if self._protocol.state is AgentState.CLOSED:
            return
        if failure is not None:
            self._failure = failure
            logger.error("agent %s closed: %s", self.agent_id, reason)
        self._protocol.close(reason)
        self._abort_task()  # the task in hand can no longer be answered
        self._wake_writer()
        self._changed.set()

    async def _run_scoped(self, *, task_status: TaskStatus[None]) -> None:
        try:
            with self._run_scope:
                await self._run(task_status=task_status)
        finally:
            self._close("the agent stopped")  # nothing waits on a state that cannot change
            self._run_done.set()

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        """Connect, serve the connection, reconnect; until the agent closes.

        A lost connection is retried for ``reconnect_timeout`` seconds until a site welcomes the
        agent again: a connection that is accepted but never welcomed (a stopped site process's
        kernel still accepts) does not restart the clock.
        """
        protocol = self._protocol
        error = await self._serve(await self._connect(self._connect_timeout), task_status)
        if protocol.heartbeat_interval is None:  # never welcomed: tell start() why
            if self._failure is not None:
                raise self._failure
            if self._rejection is not None:
                raise ConnectionRejected(self._rejection)
            raise TransportError(f"the connection closed before the site's welcome: {error}")
        deadline: float | None = None  # when the current outage gives up
        while protocol.state is not AgentState.CLOSED:
            if deadline is None:
                deadline = anyio.current_time() + self._reconnect_timeout
            logger.warning("agent %s lost its connection (%s); reconnecting", self.agent_id, error)
            try:
                stream = await self._connect(self._reconnect_timeout, deadline)
            except TransportError as exc:
                self._close(f"the site is gone: {exc}", exc)
                return
            # Until the welcome, the reconnect deadline bounds this connection too; the welcome
            # lifts it (see _AgentSide), and the next loss starts the clock anew.
            with anyio.CancelScope(deadline=deadline) as scope:
                self._welcome_scope = scope
                error = await self._serve(stream, None)
            self._welcome_scope = None
            if scope.deadline == math.inf:
                deadline = None
            elif anyio.current_time() >= deadline:
                silent = TransportError(
                    f"no welcome from {self._connector.url} within "
                    f"{self._reconnect_timeout:g} s of losing the connection ({error})"
                )
                self._close(f"the site is gone: {silent}", silent)
                return

    async def _serve(
        self, stream: MessageStream, task_status: TaskStatus[None] | None
    ) -> BaseException | None:
        protocol = self._protocol
        if protocol.state is AgentState.CLOSED:  # stopped while the connection was being made
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return None

        side = _AgentSide(self, task_status)
        connection = side.connection = Connection(stream, side, on_progress=self._on_progress)
        protocol.connection_made(os.urandom(16))
        self._connection = connection
        try:
            return await connection.run()
        finally:
            self._connection = None
            protocol.connection_lost()
            self._changed.set()

    async def _connect(self, timeout: float, deadline: float | None = None) -> MessageStream:
        """Connect, retrying with exponential backoff and jitter for up to ``timeout`` seconds
        (or until ``deadline``, when the clock started earlier)."""
        if deadline is None:
            deadline = anyio.current_time() + timeout
        delay = 0.05
        error: BaseException | None = None
        while True:
            with anyio.move_on_after(max(deadline - anyio.current_time(), 0)):
                try:
                    return await self._connector.connect()
                except TransportError as exc:
                    if not exc.retryable:
                        raise
                    error = exc
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                why = f": {error}" if error is not None else " (no answer)"
                raise TransportError(
                    f"could not connect to {self._connector.url} within {timeout:g} s{why}"
                ) from error
            await anyio.sleep(min(delay * random.uniform(0.5, 1.5), remaining))
            delay = min(delay * 2, self._max_backoff)


class _AgentSide:
    """The agent's side of one connection, as its `Connection` drives it (`ConnectionHandler`):
    the protocol's messages out, the site's in, and what the site's messages mean here."""

    def __init__(self, agent: AsyncFlareAgent, task_status: TaskStatus[None] | None) -> None:
        self._agent = agent
        self._protocol = agent._protocol
        self._task_status = task_status  # start()'s, until the first welcome
        self.connection: Connection | None = None

    def data_to_send(self) -> list[Message]:
        return self._protocol.data_to_send(flush_acks=False)

    def deferred_delay(self) -> float | None:
        return ACK_DELAY if self._protocol.has_deferred else None

    def flush_deferred(self) -> list[Message]:
        return self._protocol.data_to_send()

    def finished(self) -> bool:
        return self._protocol.state is AgentState.CLOSED

    def read_timeout(self) -> float:
        timeout = self._protocol.heartbeat_timeout
        return self._agent._connect_timeout if timeout is None else timeout

    def idle_interval(self) -> float | None:
        return self._protocol.heartbeat_interval

    def idle(self) -> None:
        self._protocol.heartbeat()

    def protocol_error(self, error: ProtocolError) -> None:
        self._agent._close(f"protocol error: {error}", error)

    def handle(self, message: Message) -> None:
        agent, protocol = self._agent, self._protocol
        events = protocol.receive(message)
        for event in events:
            if isinstance(event, WelcomeReceived):
                self._welcomed()
            elif isinstance(event, RejectReceived):
                agent._rejection = event.reason
                logger.error("agent %s: %s", agent.agent_id, protocol.close_reason)
            elif isinstance(event, BadTaskReceived):
                logger.error(
                    "task %s has bad data (%s); answered BAD_TASK_DATA", event.task_id, event.reason
                )
            elif isinstance(event, AbortReceived):
                logger.info("task %s was aborted by the site", event.task_id)
                if event.fetched:
                    agent._abort_task(event.task_id)
            elif isinstance(event, ResultSettled) and not event.submission.accepted:
                logger.info(
                    "result of task %s refused: %s",
                    event.submission.task_id,
                    event.submission.reason,
                )
        if protocol.state is AgentState.CLOSED:  # the site said goodbye, or refused the agent
            agent._abort_task()
        if events:
            agent._changed.set()

    def _welcomed(self) -> None:
        agent = self._agent
        assert self.connection is not None
        self.connection.read_timeout_changed()  # the site's heartbeat timeout from now on
        if agent._welcome_scope is not None:
            agent._welcome_scope.deadline = math.inf
        if self._task_status is not None:
            # From now on the connection outlives a cancelled ``async with`` body until stop()
            # ends it, so results submitted in that body are still delivered; until now,
            # cancelling start() cancels the connect.
            agent._run_scope.shield = True
            self._task_status.started()
            self._task_status = None
