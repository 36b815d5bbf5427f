"""Helpers for testing trainers, sites and transports without a network.

* `site_and_agent`: a `FlareSite` and an `AsyncFlareAgent` connected in memory;
* `run_trainer`: a scripted site that runs a list of tasks through your trainer and returns the
  results;
* `ScriptedPeer`: the far end of an agent's connection, driven message by message by the test;
* `FaultyConnector`: wraps a connector so a test can break connections at chosen moments.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import ObjectStream, TaskGroup

from .agent import AsyncFlareAgent
from .defs import TaskResult
from .exceptions import TransportError
from .protocol import PROTOCOL_VERSION, Hello, Message, Welcome
from .site import FlareSite
from .transports import Connector, MessageListener, MessageStream, create_listener

__all__ = [
    "FaultyConnector",
    "ScriptedPeer",
    "run_trainer",
    "site_and_agent",
]

T = TypeVar("T")


@asynccontextmanager
async def site_and_agent(
    *,
    agent_id: str = "agent-1",
    site_name: str = "site-1",
    job_id: str | None = None,
    site_options: dict[str, Any] | None = None,
    agent_options: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[FlareSite, AsyncFlareAgent]]:
    """A running site and a started agent, connected over the memory transport."""
    async with FlareSite(site_name, job_id, **(site_options or {})) as site:
        url = await site.listen("memory://")
        agent = AsyncFlareAgent(
            url, agent_id=agent_id, site_name=site_name, job_id=job_id, **(agent_options or {})
        )
        async with agent:
            yield site, agent


async def run_trainer(
    trainer: Callable[[AsyncFlareAgent], Awaitable[object]],
    tasks: Iterable[tuple[str, Any] | tuple[str, Any, dict[str, Any]]],
    *,
    agent_id: str = "agent-1",
    site_name: str = "site-1",
) -> list[TaskResult]:
    """Run ``tasks`` (``(task_name, data)`` or ``(task_name, data, meta)``) through a trainer.

    ``trainer(agent)`` is your training loop, typically ``async for task in agent.tasks(): ...``.
    The site runs the tasks one after another, then says goodbye, which ends ``agent.tasks()``.
    Returns the results in order; an exception in the trainer propagates.
    """
    results: list[TaskResult] = []
    async with anyio.create_task_group() as group, FlareSite(site_name) as site:
        url = await site.listen("memory://")

        async def serve_trainer() -> None:
            async with AsyncFlareAgent(url, agent_id=agent_id, site_name=site_name) as agent:
                await trainer(agent)

        group.start_soon(serve_trainer)
        await site.wait_for_agent(agent_id)
        for spec in tasks:
            task_name, data, *rest = spec
            meta = rest[0] if rest else None
            results.append(await site.run_task(agent_id, task_name, data, meta))
    return results


class ScriptedPeer:
    """The site end of agents' connections, driven by hand: for tests of the agent's rules.

    It listens at ``url`` (``memory://`` by default; any transport URL works, with ``options``
    such as ``ssl_context``)::

        async with ScriptedPeer("site-1") as peer, anyio.create_task_group() as group:
            stream = await peer.start_agent(agent, group)  # hello read and welcomed
            await stream.send(TaskAssign(...))
            ...
            await agent.stop()
    """

    def __init__(
        self,
        site_name: str = "site-1",
        *,
        url: str = "memory://",
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 30.0,
        **options: Any,
    ) -> None:
        self.site_name = site_name
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._listen_url = url
        self._options = options
        self._listener: MessageListener | None = None
        self._accepted_send, self._accepted = anyio.create_memory_object_stream[MessageStream](
            math.inf
        )
        self._group: TaskGroup | None = None
        self._streams: list[MessageStream] = []
        self.hellos: list[Hello] = []

    @property
    def url(self) -> str:
        """The URL agents connect to."""
        assert self._listener is not None, "use ScriptedPeer in an async with block"
        return self._listener.url

    async def __aenter__(self) -> ScriptedPeer:
        self._listener = await create_listener(self._listen_url, **self._options)
        group = self._group = anyio.create_task_group()
        await group.__aenter__()
        group.start_soon(self._listener.serve, self._accepted_send.send, group)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
        assert self._group is not None
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)
        self._accepted_send.close()
        async with self._accepted:
            async for stream in self._accepted:  # accepted, never taken by the test
                await stream.aclose()

    async def aclose(self) -> None:
        """Stop accepting connections (agents that reconnect are refused) and close all accepted."""
        if self._listener is not None:
            await self._listener.aclose()
        for stream in self._streams:
            await stream.aclose()

    async def accept(self) -> MessageStream:
        """The next raw connection, nothing read from it yet; closed with the peer."""
        stream = await self._accepted.receive()
        self._streams.append(stream)
        return stream

    async def accept_agent(self) -> MessageStream:
        """The next connection, with its hello read (kept in `hellos`) and welcomed."""
        stream = await self.accept()
        hello = await stream.receive()
        if not isinstance(hello, Hello):
            raise AssertionError(f"expected a hello, got {hello!r}")
        self.hellos.append(hello)
        await stream.send(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                site_name=self.site_name,
                heartbeat_interval=self.heartbeat_interval,
                heartbeat_timeout=self.heartbeat_timeout,
            )
        )
        return stream

    async def start_agent(self, agent: AsyncFlareAgent, task_group: TaskGroup) -> MessageStream:
        """Start ``agent`` against this peer; returns its welcomed connection.

        The agent is started in the calling task (stop it there too); ``task_group`` accepts.
        """
        accepted: list[MessageStream] = []
        done = anyio.Event()

        async def accept() -> None:
            accepted.append(await self.accept_agent())
            done.set()

        task_group.start_soon(accept)
        await agent.start()
        await done.wait()
        return accepted[0]

    @staticmethod
    async def receive_until(stream: MessageStream, kind: type[T]) -> T:
        """Receive messages until one of ``kind`` arrives (heartbeats and others are skipped)."""
        while True:
            message = await stream.receive()
            if isinstance(message, kind):
                return message


class _FaultyStream(ObjectStream[Message]):
    def __init__(self, inner: MessageStream, owner: FaultyConnector) -> None:
        self._inner = inner
        self._owner = owner
        self._handled: Callable[[], object] | None = None

    async def send(self, item: Message) -> None:
        self._owner.sent[type(item).__name__] += 1
        decision = self._owner._decide(item)
        if decision == "drop_before":
            await self._inner.aclose()
        await self._inner.send(item)
        if decision == "drop_after":
            await self._inner.aclose()

    async def receive(self) -> Message:
        # The reader asks for the next message right after handling the last one, before any
        # other task runs: the moment to call an after_receive callback.
        handled, self._handled = self._handled, None
        if handled is not None:
            handled()
        message = await self._inner.receive()
        self._owner.received[type(message).__name__] += 1
        self._handled = self._owner._callback_for(message)
        return message

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


class FaultyConnector(Connector):
    """Wraps an agent's connector to break its connections at moments the test picks.

    ``drop_before(predicate)`` closes the connection instead of sending the next message for
    which ``predicate(message)`` is true; ``drop_after`` sends it first; ``after_receive`` runs a
    callback right after a message was handled. Each rule fires once. `drop` closes the current
    connection at once; setting ``refuse_connections`` makes ``connect`` fail, and a
    ``connect_gate`` event holds new connections until it is set.
    """

    def __init__(self, inner: Connector) -> None:
        self._inner = inner
        self.url = inner.url
        self._rules: list[tuple[str, Callable[[Message], bool]]] = []
        self._callbacks: list[tuple[Callable[[Message], bool], Callable[[], object]]] = []
        self._current: _FaultyStream | None = None
        self.connections = 0
        """How many connections were made."""
        self.refuse_connections = False
        self.connect_gate: anyio.Event | None = None
        """When set, a connection is made but handed over only once this event is set."""
        self.sent: Counter[str] = Counter()
        """Messages sent by the agent, by kind (``"Result"``, ``"Heartbeat"``, ...)."""
        self.received: Counter[str] = Counter()
        """Messages received by the agent, by kind."""

    def after_receive(
        self, predicate: Callable[[Message], bool], callback: Callable[[], object]
    ) -> None:
        """Call ``callback()`` once, right after the agent handled a message matching ``predicate``

        (before any other task runs: the woken waiters have not resumed yet).
        """
        self._callbacks.append((predicate, callback))

    def _callback_for(self, message: Message) -> Callable[[], object] | None:
        for index, (predicate, callback) in enumerate(self._callbacks):
            if predicate(message):
                del self._callbacks[index]
                return callback
        return None

    def drop_before(self, predicate: Callable[[Message], bool]) -> None:
        self._rules.append(("drop_before", predicate))

    def drop_after(self, predicate: Callable[[Message], bool]) -> None:
        self._rules.append(("drop_after", predicate))

    async def drop(self) -> None:
        """Close the current connection now."""
        if self._current is not None:
            await self._current.aclose()

    def _decide(self, message: Message) -> str | None:
        for index, (decision, predicate) in enumerate(self._rules):
            if predicate(message):
                del self._rules[index]
                return decision
        return None

    async def connect(self) -> MessageStream:
        if self.refuse_connections:
            await anyio.lowlevel.checkpoint()
            raise TransportError(f"connection to {self.url} refused by the test")
        stream = _FaultyStream(await self._inner.connect(), self)
        self.connections += 1
        if self.connect_gate is not None:
            try:
                await self.connect_gate.wait()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        self._current = stream
        return stream
