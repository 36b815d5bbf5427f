"""`FlareSite`: the site side. It accepts agents, runs tasks on them and collects their results.

Each agent id has a `flare_agent_async.protocol.SiteSession` that outlives its connections; this
module accepts connections, checks hellos, runs each connection in the site's task group and wakes
the `run_task` calls whose tasks finished.
"""

from __future__ import annotations

import logging
import os
import ssl
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ._connection import CONNECTION_ERRORS, Connection
from ._validate import as_secret
from ._wakeup import Wakeup
from .defs import TaskResult
from .exceptions import CallStateError, ProtocolError, UnknownAgent
from .protocol import (
    Challenge,
    FetchEnded,
    Hello,
    Limits,
    LogReceived,
    LogRecord,
    Message,
    PartFetch,
    Proof,
    Reject,
    ResultRefused,
    SessionState,
    SiteConfig,
    SiteSession,
    SiteTask,
    TaskFinished,
    agent_proof,
    check_hello,
    check_payload,
    site_proof,
    verify,
)
from .transports import MessageListener, MessageStream, Progress, create_listener

__all__ = ["Coming", "FlareSite", "HeldResult", "LogRecord"]

logger = logging.getLogger("flare_agent_async.site")

_MAX_HANDLED_WHILE_SENDING = 64
"""Messages the site handles from an agent while a send to it waits; each queues at most one
reply, so an agent that sends without reading holds at most this many replies at the site."""

_NO_TIMEOUT = nullcontext()
"""What `FlareSite.run_task` waits in without a timeout: reusable, and no cancel scope."""

_GONE_SESSIONS_KEPT = 1024
"""Sessions of agents that left which the site remembers (so `run_task` on one says why it is
gone); older ones are forgotten, so agents coming and going, or hellos under made-up ids, cannot
grow the site without end."""


@dataclass(frozen=True)
class Coming:
    """Entries of a task's data that are not here yet, for `FlareSite.run_task`.

    The task goes to the agent at once, with ``keys`` in its data as None; each entry follows
    as ``entries`` yields it, so the agent receives the first while the caller still gets the
    rest (a model downloaded one array at a time, say). The trainer has the task once all have
    come. With ``keep_task_data=False`` the site lets go of each entry once the agent has it, so
    it holds about one at a time. The site closes ``entries`` (if it has ``aclose``) when it is
    done with them.
    """

    keys: Sequence[str]
    """The keys of the entries to come, in the data's order."""
    entries: AsyncIterable[tuple[str, Any]]
    """Yields ``(key, value)`` once for each key, in any order."""


class FlareSite:
    """A FLARE site: agents connect to it, it runs tasks on them.

    ::

        async with FlareSite("site-1") as site:
            url = await site.listen("memory://site-1")
            await site.wait_for_agent("a1")
            result = await site.run_task("a1", "train", {"w": weights})

    :param site_name: the name agents must ask for.
    :param job_id: the job; agents that name another job are rejected.
    :param heartbeat_interval: how often an idle agent sends a heartbeat, in seconds.
    :param heartbeat_timeout: silence after which a connection is dropped, in seconds.
    :param reconnect_timeout: how long a disconnected agent's tasks wait for it to come back
        before they fail with `AgentGone`.
    :param hello_timeout: how long a new connection may take to say hello.
    :param close_timeout: how long leaving the ``async with`` waits to say goodbye to agents.
    :param keep_task_data: keep each task's data until its result, to send the task again to an
        agent that restarts (a new process under the same id). False releases the data as soon
        as the agent has it (each `Coming` entry too), so a large model is not held twice while
        the agent trains; the task of an agent that restarts then fails with `TaskLost`.
    :param secret: a secret every agent must prove it knows (and the site proves back), or a
        mapping from agent id to its own secret; an agent id missing from it is refused.
    :param limits: the largest frames the site accepts from an agent.
    :param on_log: called with every `LogRecord` agents send, in the site's event loop.
    :param on_progress: called with ``(agent_id, Progress)`` as large tasks and results move.
    """

    def __init__(
        self,
        site_name: str,
        job_id: str | None = None,
        *,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
        hello_timeout: float = 10.0,
        close_timeout: float = 5.0,
        keep_task_data: bool = True,
        secret: bytes | str | Mapping[str, bytes | str] | None = None,
        limits: Limits | None = None,
        on_log: Callable[[LogRecord], object] | None = None,
        on_progress: Callable[[str, Progress], object] | None = None,
    ) -> None:
        if not isinstance(site_name, str) or not site_name:
            raise ValueError(f"site_name must be a non-empty str, got {site_name!r}")
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        self._config = SiteConfig(
            site_name, job_id, heartbeat_interval, heartbeat_timeout, keep_task_data
        )
        self._secrets: bytes | dict[str, bytes] | None
        if secret is None or isinstance(secret, (bytes, str)):
            self._secrets = as_secret(secret)
        else:
            self._secrets = {}
            for agent_id, agent_secret in secret.items():
                checked = as_secret(agent_secret)
                assert checked is not None
                self._secrets[agent_id] = checked
        self._limits = limits
        self._on_progress = on_progress
        self._reconnect_timeout = reconnect_timeout
        self._hello_timeout = hello_timeout
        self._close_timeout = close_timeout
        self._on_log = on_log
        self._group: TaskGroup | None = None
        self._changed = Wakeup()  # every change of state
        self._agents: dict[str, _Agent] = {}
        self._gone: OrderedDict[str, _Agent] = OrderedDict()  # oldest first
        self._live_connections = 0  # agents' connections being served, replaced ones included
        self._waiters: dict[SiteTask | PartFetch, anyio.Event] = {}
        self._fetchers: dict[PartFetch, int] = {}  # how many fetch calls wait for each
        self._listeners: list[MessageListener] = []
        self._closing = False
        self.rejected_hellos = 0
        """How many connections were refused at the hello (failed authentications included)."""
        self.failed_authentications = 0
        """How many agents did not prove the shared secret."""

    @property
    def site_name(self) -> str:
        return self._config.site_name

    @property
    def agents(self) -> frozenset[str]:
        """The ids of the agents connected right now."""
        return frozenset(agent_id for agent_id, agent in self._agents.items() if agent.connected)

    def _is_connected(self, agent_id: str) -> bool:
        agent = self._agents.get(agent_id)
        return agent is not None and agent.connected

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._group is not None:
            raise CallStateError("the site is already running")
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        group = self._running()
        self._closing = True
        self._changed.set()
        with anyio.CancelScope(shield=True):
            for listener in self._listeners:
                await listener.aclose()
            for agent in self._agents.values():
                self._finished(agent.session.close("the site is shutting down"))
                if agent.connection is not None:
                    agent.connection.wake()
            with anyio.move_on_after(self._close_timeout):
                while self._live_connections:
                    await self._changed.wait()
        group.cancel_scope.cancel()
        return await group.__aexit__(exc_type, exc, tb)

    async def listen(
        self, target: str | MessageListener, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Accept agents at a URL (or with a listener); returns the bound URL.

        ``tcp://127.0.0.1:0`` picks a free port; ``tls://`` needs a server ``ssl_context`` (see
        `flare_agent_async.tls.server_context`; with ``client_ca``, agents need certificates).

        :raises ValueError: the URL's scheme is unknown, or an option it needs is missing.
        :raises TransportError: the address cannot be bound.
        """
        group = self._running()
        listener = await create_listener(target, ssl_context=ssl_context, limits=self._limits)
        self._listeners.append(listener)
        group.start_soon(listener.serve, self._serve_connection, group)
        logger.info("site %s listening at %s", self.site_name, listener.url)
        return listener.url

    # -- running tasks --------------------------------------------------------------------------

    async def wait_for_agent(self, agent_id: str, timeout: float | None = None) -> None:
        """Wait until the agent is connected.

        :raises TimeoutError: it did not connect within ``timeout`` seconds.
        """
        self._running()
        with anyio.fail_after(timeout):
            while not self._is_connected(agent_id):  # not `self.agents`: O(1), not O(agents)
                await self._changed.wait()
                if self._closing:
                    raise CallStateError(f"the site closed while waiting for agent {agent_id!r}")

    async def run_task(
        self,
        agent_id: str,
        task_name: str,
        data: Any,
        meta: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
        timeout: float | None = None,
        hold_arrays: bool = False,
        coming: Coming | None = None,
    ) -> TaskResult:
        """Run a task on an agent and return its result.

        An agent works on one task at a time: a new task aborts the one it has. If the agent
        disconnects, the task waits for it (up to the site's ``reconnect_timeout``) and is sent
        again. Cancelling the call, or its ``timeout``, aborts the task at the agent.

        With ``hold_arrays``, the result is a `HeldResult`: the agent holds back the numpy
        arrays at the top of its data, and sends each when the caller fetches it, so that a
        large model need not be in the site's memory all at once. The caller must `release
        <HeldResult.release>` it: until then the agent's ``submit_result`` waits.

        With ``coming``, entries of ``data`` (a dict) follow the task as they come (`Coming`).
        If ``coming.entries`` raises, or ends before every key came, the task is aborted and
        the call raises that error (`ValueError` for missing entries).

        :raises UnknownAgent: no agent with this id has connected.
        :raises AgentGone: the agent left before the result arrived.
        :raises TaskAborted: the task was aborted (`abort_task`, or a newer task).
        :raises TaskLost: the agent restarted after it had the task, whose data the site had
            released (``keep_task_data=False``).
        :raises TimeoutError: no result within ``timeout`` seconds (the task is aborted).
        :raises ValueError: ``task_id`` is already used for this agent, or ``coming`` names
            keys that are not distinct strings, or that ``data`` already has.
        :raises TypeError: ``data``, ``meta`` or a coming entry holds something that cannot be
            sent.
        """
        self._running()
        if not isinstance(task_name, str):
            raise TypeError(f"task_name must be str, got {type(task_name).__name__}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        check_payload(meta, "meta")
        check_payload(data, "data")
        session = self._session(agent_id)
        task, superseded = session.assign(
            task_id or uuid.uuid4().hex,
            task_name,
            meta or {},
            data,
            hold_arrays=hold_arrays,
            coming=() if coming is None else coming.keys,
        )
        del data  # the session holds it now, and may release it before the result arrives
        self._finished(superseded)
        self._wake(agent_id)
        done = self._waiters[task] = anyio.Event()
        try:
            # No cancel scope without a timeout: thousands of tasks wait here at once, and each
            # object they keep is one more for every collection of the cyclic garbage collector.
            with _NO_TIMEOUT if timeout is None else anyio.fail_after(timeout):
                if coming is None:
                    await done.wait()
                else:
                    await self._feed(session, task, coming.entries, done)
        except BaseException:
            if not task.done:
                session.abort(task.task_id)
                self._wake(agent_id)
            else:  # the result came as the call ended: nobody will fetch what it holds back
                self._release(session, task, False, "the site stopped waiting for the result")
            raise
        finally:
            del self._waiters[task]
        if task.error is not None:
            raise task.error
        result = task.result
        assert result is not None
        if hold_arrays:
            return HeldResult(self, session, task, result)
        return result

    async def _feed(
        self,
        session: SiteSession,
        task: SiteTask,
        entries: AsyncIterable[tuple[str, Any]],
        done: anyio.Event,
    ) -> None:
        """Send a task's coming entries as they come, until the task is done."""
        error: Exception | None = None
        async with anyio.create_task_group() as group:

            async def send() -> None:
                nonlocal error
                try:
                    await self._send_entries(session, task, entries)
                except Exception as exc:  # raised in the caller, which aborts the task
                    error = exc
                    group.cancel_scope.cancel()

            group.start_soon(send)
            await done.wait()
            group.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _send_entries(
        self, session: SiteSession, task: SiteTask, entries: AsyncIterable[tuple[str, Any]]
    ) -> None:
        try:
            async for key, value in entries:
                check_payload(value, f"data[{key!r}]")
                if not session.send_part(task.task_id, key, value):
                    return  # the task ended meanwhile
                del value  # the session holds it now
                self._wake(task.agent_id)
        finally:
            aclose = getattr(entries, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        # Not the entries the session keeps: it lets go of each once the agent has it.
        missing = [key for key in task.message.coming if key not in task.given]
        if missing and not task.done:
            raise ValueError(f"the entries {missing} of task {task.task_id!r} never came")

    async def _fetch(self, session: SiteSession, task: SiteTask, key: str) -> Any:
        fetch = session.request_part(task.task_id, key)  # the open one for the key, if any
        done = self._waiters.get(fetch)
        if done is None:
            self._wake(task.agent_id)
            done = self._waiters[fetch] = anyio.Event()
        self._fetchers[fetch] = self._fetchers.get(fetch, 0) + 1
        try:
            await done.wait()
        except BaseException:
            if not fetch.done and self._fetchers[fetch] == 1:  # nobody else waits for it
                session.cancel_part(fetch)
            raise
        finally:
            self._fetchers[fetch] -= 1
            if not self._fetchers[fetch]:
                del self._fetchers[fetch], self._waiters[fetch]
        if fetch.error is not None:
            raise fetch.error
        return fetch.value

    def _release(self, session: SiteSession, task: SiteTask, accepted: bool, reason: str) -> None:
        self._finished(session.release(task.task_id, accepted=accepted, reason=reason))
        self._wake(task.agent_id)

    async def abort_task(self, agent_id: str, task_id: str) -> bool:
        """Abort a task: its `run_task` raises `TaskAborted`, the agent is told to stop it.

        :returns: whether the task was unfinished (and so is aborted now).
        :raises UnknownAgent: no agent with this id has connected.
        """
        self._running()
        task = self._session(agent_id).abort(task_id)
        if task is not None:
            self._finished([task])
            self._wake(agent_id)
        await anyio.lowlevel.checkpoint()
        return task is not None

    # -- internals ------------------------------------------------------------------------------

    def _running(self) -> TaskGroup:
        if self._group is None or self._closing:
            raise CallStateError("the site is not running: use 'async with FlareSite(...)'")
        return self._group

    def _session(self, agent_id: str) -> SiteSession:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise UnknownAgent(
                f"no agent {agent_id!r} has connected to site {self.site_name!r}; "
                "wait for it with wait_for_agent"
            )
        return agent.session

    def _wake(self, agent_id: str) -> None:
        agent = self._agents.get(agent_id)
        if agent is not None and agent.connection is not None:
            agent.connection.wake()

    def _finished(self, ended: Sequence[SiteTask | PartFetch]) -> None:
        for item in ended:
            waiter = self._waiters.get(item)
            if waiter is not None:
                waiter.set()

    def _deliver_log(self, record: LogRecord) -> None:
        if self._on_log is None:
            return
        try:
            self._on_log(record)
        except Exception:
            logger.exception("on_log failed for a record from agent %s", record.agent_id)

    async def _serve_connection(self, stream: MessageStream) -> None:
        """Serve one connection from hello to end; errors end only this connection."""
        try:
            accepted = await self._receive_hello(stream)
            if accepted is not None:
                await self._serve_agent(stream, *accepted)
        except ProtocolError as exc:
            logger.warning("dropped a connection that broke the protocol: %s", exc)
        except CONNECTION_ERRORS as exc:
            logger.info("connection ended: %s", exc)
        except Exception:
            # A bug must cost one connection, never the site and its other agents.
            logger.exception("closed a connection after an unexpected error")
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def _secret_for(self, agent_id: str) -> bytes | bool | None:
        """The agent's secret; None if the site needs none; False if the agent has no entry."""
        secrets = self._secrets
        if isinstance(secrets, dict):
            return secrets.get(agent_id, False)
        return secrets

    async def _receive_hello(self, stream: MessageStream) -> tuple[Hello, bytes] | None:
        """The agent's accepted hello and the site's proof for its welcome, or None if refused."""
        with anyio.move_on_after(self._hello_timeout):
            message = await stream.receive()
            reason = (
                check_hello(message, self._config)
                if isinstance(message, Hello)
                else f"expected a hello, got {type(message).__name__}"
            )
            if self._closing:
                reason = "the site is shutting down"
            if reason is None:
                assert isinstance(message, Hello)
                proof = await self._authenticate(stream, message)
                if proof is not None:
                    return message, proof
                self.failed_authentications += 1
                # Which part was wrong is not said: that would help a guesser.
                reason = "authentication failed"
            self.rejected_hellos += 1
            logger.warning("rejected a connection: %s", reason)
            await stream.send(Reject(reason=reason))
            return None
        self.rejected_hellos += 1
        logger.warning("dropped a connection that sent no hello within %g s", self._hello_timeout)
        return None

    async def _authenticate(self, stream: MessageStream, hello: Hello) -> bytes | None:
        """Challenge the agent if a secret is shared; the site's proof, or None if it failed."""
        secret = self._secret_for(hello.agent_id)
        if secret is None:
            return b""
        nonce = os.urandom(16)
        await stream.send(Challenge(nonce=nonce))
        answer = await stream.receive()
        if secret is False or not isinstance(answer, Proof):
            return None
        assert isinstance(secret, bytes)
        if not verify(agent_proof(secret, hello, nonce), answer.mac):
            return None
        return site_proof(secret, hello, nonce)

    async def _serve_agent(self, stream: MessageStream, hello: Hello, proof: bytes) -> None:
        agent_id = hello.agent_id
        agent = self._agents.get(agent_id)
        previous = agent.connection if agent is not None else None
        if agent is None or agent.session.state is SessionState.GONE:
            agent = self._agents[agent_id] = _Agent(SiteSession(agent_id, self._config))
        if previous is not None:
            logger.warning("agent %s connected again; dropping its older connection", agent_id)
            previous.close()
        if agent.expiry is not None:
            agent.expiry.cancel()
            agent.expiry = None
        session = agent.session
        side = _SiteSide(self, agent)
        connection = side.connection = Connection(
            stream,
            side,
            on_progress=None if self._on_progress is None else partial(self._on_progress, agent_id),
            max_handled_while_sending=_MAX_HANDLED_WHILE_SENDING,
        )
        self._finished(session.connection_made(hello, proof))
        agent.connection = connection
        self._live_connections += 1
        self._changed.set()
        logger.info("agent %s connected", agent_id)
        try:
            error = await connection.run()
        finally:
            self._live_connections -= 1
            if agent.connection is connection:
                agent.connection = None
                session.connection_lost()
                if session.state is SessionState.GONE:
                    self._forget_later(agent)
                elif self._group is not None:
                    # The scope exists before the task runs, so a quick reconnect can cancel it.
                    expiry = agent.expiry = anyio.CancelScope()
                    self._group.start_soon(self._expire, agent, expiry)
            self._changed.set()
        logger.info("agent %s disconnected: %s", agent_id, error or "goodbye")

    async def _expire(self, agent: _Agent, scope: anyio.CancelScope) -> None:
        """Give up on a disconnected agent after ``reconnect_timeout``, unless it returns."""
        with scope:
            await anyio.sleep(self._reconnect_timeout)
        # A reconnect in the same instant may have cancelled the scope too late to stop the sleep.
        if scope.cancel_called or agent.expiry is not scope:
            return
        agent.expiry = None
        session = agent.session
        if session.state is SessionState.DISCONNECTED:
            reason = f"it did not reconnect within {self._reconnect_timeout:g} s"
            logger.warning("agent %s is gone: %s", session.agent_id, reason)
            self._finished(session.give_up(reason))
            self._forget_later(agent)
            self._changed.set()

    def _forget_later(self, agent: _Agent) -> None:
        """Remember a gone agent among the last few; forget the oldest beyond them."""
        gone = self._gone
        agent_id = agent.session.agent_id
        gone[agent_id] = agent
        gone.move_to_end(agent_id)
        while len(gone) > _GONE_SESSIONS_KEPT:
            agent_id, old = gone.popitem(last=False)
            if self._agents.get(agent_id) is old:  # not replaced by a newer session since
                del self._agents[agent_id]


class HeldResult(TaskResult):
    """A result whose agent holds back the numpy arrays at the top of its data (`held`), which
    are None in `data` until fetched; from `FlareSite.run_task` with ``hold_arrays=True``.

    ::

        result = await site.run_task("a1", "train", task_data, hold_arrays=True)
        async with result:  # released on the way out
            for key in result.held:
                save(key, await result.fetch(key))

    The agent keeps the arrays, and its ``submit_result`` waits, until the result is released;
    a fetch interrupted by a reconnect is asked again on the new connection.
    """

    def __init__(
        self, site: FlareSite, session: SiteSession, task: SiteTask, result: TaskResult
    ) -> None:
        super().__init__(result.meta, result.data, result.return_code)
        self.task_id = task.task_id
        self.held: tuple[str, ...] = task.held
        """The keys of the held-back entries, in the data's order."""
        self.held_nbytes: dict[str, int] = dict(zip(task.held, task.held_nbytes, strict=False))
        """The size in bytes of each held-back array, by key, as the agent said before any
        fetch (empty if it did not say)."""
        self.released = False
        """Whether `release` was called."""
        self._site = site
        self._session = session  # the agent's session then: a later one knows nothing of it
        self._task = task

    async def fetch(self, key: str) -> Any:
        """One held-back entry, from the agent; it is not kept here (fetch it again if need be).

        Cancelling the call loses nothing: the entry can be fetched again. Calls for the same
        key at the same time share one request to the agent.

        :raises ValueError: ``key`` is not held back.
        :raises CallStateError: the result was released.
        :raises TaskLost: the agent restarted, or cannot send the entry.
        :raises AgentGone: the agent left.
        """
        if self.released:
            raise CallStateError(f"the result of task {self.task_id!r} was released")
        return await self._site._fetch(self._session, self._task, key)

    async def release(self, accepted: bool = True, reason: str = "") -> None:
        """Tell the agent the site is done with the result: its ``submit_result`` returns
        ``accepted`` (with ``reason`` for a refusal). Open fetches fail; a second release does
        nothing."""
        if not self.released:
            self.released = True
            self._site._release(self._session, self._task, accepted, reason)
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            if exc is None:
                await self.release()
            else:
                await self.release(False, f"the site failed to take the result: {exc!r}")


@dataclass(eq=False)
class _Agent:
    """What the site keeps of one agent id: its session, which outlives connections; the
    connection serving it now; the timer that gives up on it while it is away."""

    session: SiteSession
    connection: Connection | None = None
    expiry: anyio.CancelScope | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.session.state is SessionState.CONNECTED


class _SiteSide:
    """The site's side of one agent's connection, as its `Connection` drives it
    (`ConnectionHandler`). Once a newer connection of the same agent replaces it, it sends and
    takes in nothing more: the session's messages belong to the newer one."""

    def __init__(self, site: FlareSite, agent: _Agent) -> None:
        self._site = site
        self._agent = agent
        self._session = agent.session
        self.connection: Connection | None = None

    def _replaced(self) -> bool:
        return self._agent.connection is not self.connection

    def data_to_send(self) -> list[Message]:
        return [] if self._replaced() else self._session.data_to_send()

    def deferred_delay(self) -> float | None:
        return None

    def flush_deferred(self) -> list[Message]:
        return []

    def finished(self) -> bool:
        return self._session.state is SessionState.GONE

    def read_timeout(self) -> float:
        return self._site._config.heartbeat_timeout

    def idle_interval(self) -> float | None:
        return None  # the agents send the heartbeats; the site answers them

    def idle(self) -> None:
        return None

    def handle(self, message: Message) -> None:
        if self._replaced():
            return
        site, session = self._site, self._session
        for event in session.receive(message):
            if isinstance(event, TaskFinished):
                site._finished([event.task])
            elif isinstance(event, FetchEnded):
                site._finished([event.fetch])
            elif isinstance(event, LogReceived):
                site._deliver_log(event.record)
            elif isinstance(event, ResultRefused):
                logger.warning("refused a result from agent %s: %s", session.agent_id, event.reason)
        if session.state is SessionState.GONE:
            site._changed.set()

    def protocol_error(self, error: ProtocolError) -> None:
        if self._replaced():
            return
        logger.warning("agent %s broke the protocol: %s", self._session.agent_id, error)
        self._site._finished(self._session.close(f"protocol error: {error}"))
        self._site._changed.set()
