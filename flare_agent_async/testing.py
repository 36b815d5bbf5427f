"""Helpers for testing trainers, sites and transports without a network.

* `site_and_agent`: a `FlareSite` and an `AsyncFlareAgent` connected in memory;
* `run_trainer`: a scripted site that runs a list of tasks through your trainer and returns the
  results;
* `ScriptedPeer`: the far end of an agent's connection, driven message by message by the test;
* `FaultyConnector`: wraps a connector so a test can break connections at chosen moments, or at
  random from a seed: drops, duplicates, truncated frames, delays and slow readers;
* `check_transport`: the conformance suite every transport passes, for a plugin's own tests;
  `transport_pairs`: connections to a listener of a transport, both ends in hand.
"""

from __future__ import annotations

import contextlib
import math
import random
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import ObjectStream, TaskGroup

from ._conformance import (
    CHECKS,
    TransportCheckFailed,
    TransportPairs,
    check_nobody_listening,
    check_transport,
    transport_pairs,
)
from .agent import AsyncFlareAgent
from .defs import TaskResult
from .exceptions import TransportError
from .protocol import (
    PROTOCOL_VERSION,
    Bye,
    Challenge,
    Hello,
    Limits,
    Message,
    Proof,
    Reject,
    Welcome,
    encode_frame,
)
from .site import FlareSite
from .transports import (
    ByteStream,
    Connector,
    FramedMessageStream,
    MessageListener,
    MessageStream,
    TransportOptions,
    connector_for,
    create_listener,
)
from .transports._framed import advance

__all__ = [
    "CHECKS",
    "RECEIVE_FAULTS",
    "SEND_FAULTS",
    "FaultyConnector",
    "ScriptedPeer",
    "TransportCheckFailed",
    "TransportPairs",
    "check_nobody_listening",
    "check_transport",
    "run_trainer",
    "site_and_agent",
    "transport_pairs",
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

    It listens at ``url`` (``memory://`` by default; any transport URL works, with its
    ``ssl_context`` and ``limits``)::

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
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.site_name = site_name
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._listen_url = url
        self._options = TransportOptions(ssl_context=ssl_context, limits=limits)
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
        options = self._options
        self._listener = await create_listener(
            self._listen_url, ssl_context=options.ssl_context, limits=options.limits
        )
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


_HANDSHAKE: tuple[type[Message], ...] = (Hello, Challenge, Proof, Welcome, Reject, Bye)
"""Messages random faults leave alone: a start that fails is not a fault the agent recovers from."""

SEND_FAULTS = ("drop_before", "drop_after", "duplicate", "truncate")
"""The faults `FaultyConnector.inject_randomly` may pick for a message the agent sends."""
RECEIVE_FAULTS = ("drop_on_receive", "duplicate_on_receive")
"""The faults it may pick for a message the agent receives."""


class _FaultyBytes(ByteStream):
    """The bytes under a framed connection: byte budgets, a slow or stalled reader."""

    def __init__(self, inner: ByteStream, owner: FaultyConnector) -> None:
        self._inner = inner
        self._owner = owner

    async def _break(self, direction: str) -> NoReturn:
        self._owner._byte_rules[direction].pop(0)
        self._owner.faults[f"drop_after_bytes_{direction}"] += 1
        await self._inner.abort()
        raise anyio.BrokenResourceError(f"the test dropped the connection ({direction} budget)")

    async def receive_into(self, buffer: memoryview) -> int:
        owner = self._owner
        slowed = await owner._read_delay()
        limit = len(buffer)
        if owner.read_chunk_bytes:
            limit = min(limit, owner.read_chunk_bytes)
        budget = owner._byte_budget("receive")
        if budget == 0:
            await self._break("receive")
        if budget is not None:
            limit = min(limit, budget)
        count = await self._inner.receive_into(buffer[:limit])
        owner._spend("receive", count)
        # What was read waits with the reader; a cancellation here loses it, but only the end of
        # the connection cancels a reader.
        stalled = await owner._read_stall()
        self.waited_to_receive = slowed or stalled or self._inner.waited_to_receive
        return count

    async def send_some(self, buffers: Sequence[memoryview]) -> int:
        owner = self._owner
        budget = owner._byte_budget("send")
        if budget == 0:
            await self._break("send")
        if budget is not None:
            trimmed: list[memoryview] = []
            for part in buffers:
                if budget <= 0:
                    break
                trimmed.append(part[:budget])
                budget -= trimmed[-1].nbytes
            buffers = trimmed
        count = await self._inner.send_some(buffers)
        self.waited_to_send = self._inner.waited_to_send
        owner._spend("send", count)
        return count

    async def flush(self) -> None:
        await self._inner.flush()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def abort(self) -> None:
        await self._inner.abort()


class _FaultyStream(ObjectStream[Message]):
    def __init__(self, inner: MessageStream, owner: FaultyConnector) -> None:
        self._inner = inner
        self._owner = owner
        self._handled: Callable[[], object] | None = None
        self._again: Message | None = None
        self._bytes: _FaultyBytes | None = None
        if isinstance(inner, FramedMessageStream):
            self._bytes = inner.byte_stream = _FaultyBytes(inner.byte_stream, owner)

    async def _lose(self, fault: str, message: Message) -> NoReturn:
        self._owner.faults[fault] += 1
        await self._inner.aclose()
        raise anyio.BrokenResourceError(
            f"the test dropped the connection at a {type(message).__name__} ({fault})"
        )

    async def send(self, item: Message) -> None:
        owner = self._owner
        owner.sent[type(item).__name__] += 1
        if owner.send_delay:
            await anyio.sleep(owner.send_delay)
        decision = owner._decide(item, "send")
        if decision is not None and decision != "drop_after":
            owner.faults[decision] += 1
        if decision == "drop_before":
            await self._inner.aclose()
        elif decision == "truncate":
            await self._truncate(item)
        await self._inner.send(item)
        if decision == "duplicate":
            await self._inner.send(item)
        elif decision == "drop_after":
            await self._lose("drop_after", item)

    async def _truncate(self, item: Message) -> None:
        """Send the first half of the message's frame, then break the connection."""
        if self._bytes is not None:
            parts = encode_frame(item)
            remaining = sum(part.nbytes for part in parts) // 2
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                while remaining > 0:
                    chunk: list[memoryview] = []
                    budget = remaining
                    for part in parts:
                        if budget <= 0:
                            break
                        chunk.append(part[:budget])
                        budget -= chunk[-1].nbytes
                    count = await self._bytes._inner.send_some(chunk)
                    remaining -= count
                    advance(parts, count)
            await self._bytes.abort()
        await self._inner.aclose()

    async def receive(self) -> Message:
        # The reader asks for the next message right after handling the last one, before any
        # other task runs: the moment to call an after_receive callback.
        handled, self._handled = self._handled, None
        if handled is not None:
            handled()
        owner = self._owner
        again, self._again = self._again, None
        if again is not None:
            message = again
        else:
            if self._bytes is None:  # a framed stream is slowed byte by byte instead
                await owner._read_delay()
            message = await self._inner.receive()
            if self._bytes is None:
                await owner._read_stall()
            decision = owner._decide(message, "receive")
            if decision == "drop_on_receive":
                await self._lose(decision, message)
            if decision == "duplicate_on_receive":
                owner.faults[decision] += 1
                self._again = message
        owner.received[type(message).__name__] += 1
        self._handled = owner._callback_for(message)
        return message

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


class FaultyConnector(Connector):
    """Wraps an agent's connector (or a URL) to break its connections in chosen ways.

    Every fault is seen by both ends: a dropped connection is closed under the agent and the site.
    Rules fire once, for the first message they match:

    * ``drop_before(predicate)`` closes the connection instead of sending the message;
      ``drop_after`` sends it first; ``drop_on_receive`` loses a message on its way in;
    * ``duplicate`` sends a message twice; ``duplicate_on_receive`` hands a received one over twice;
    * ``truncate`` sends the first half of a message's frame, then breaks the connection (on
      ``memory://``, which has no frames, the message is just lost);
    * ``drop_after_bytes(n, "send" | "receive")`` breaks the connection once ``n`` more bytes went
      that way: in the middle of a large task or result (byte transports only: tcp, unix, tls);
    * ``after_receive(predicate, callback)`` calls back right after a message was handled.

    Standing settings: ``send_delay`` (seconds before each message is sent), ``read_delay``,
    ``read_chunk_bytes`` and ``read_gate`` make a slow or stalled reader (a slow consumer: the
    site's sends to it wait); ``refuse_connections`` makes ``connect`` fail; ``connect_gate``
    holds new connections until it is set. `inject_randomly` picks faults at random from a seed.
    `faults` counts what was injected; `drop` closes the current connection at once.
    """

    def __init__(
        self,
        inner: Connector | str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._inner = connector_for(inner, ssl_context=ssl_context, limits=limits)
        self.url = self._inner.url
        self._rules: list[tuple[str, str, Callable[[Message], bool]]] = []
        self._byte_rules: dict[str, list[int]] = {"send": [], "receive": []}
        self._callbacks: list[tuple[Callable[[Message], bool], Callable[[], object]]] = []
        self._current: _FaultyStream | None = None
        self._random: random.Random | None = None
        self._probability = 0.0
        self._random_kinds: tuple[str, ...] = ()
        self.connections = 0
        """How many connections were made."""
        self.refuse_connections = False
        self.connect_gate: anyio.Event | None = None
        """When set, a connection is made but handed over only once this event is set."""
        self.send_delay = 0.0
        """Seconds to wait before sending each message."""
        self.read_delay = 0.0
        """Seconds to wait before each read (of bytes on byte transports, else of a message)."""
        self.read_chunk_bytes = 0
        """At most this many bytes per read on byte transports (0: no cap)."""
        self.read_gate: anyio.Event | None = None
        """When set to an event, the agent stops reading until it is set: what arrives meanwhile
        (a read already under way included) waits, and the site's sends fill the connection."""
        self.sent: Counter[str] = Counter()
        """Messages sent by the agent, by kind (``"Result"``, ``"Heartbeat"``, ...)."""
        self.received: Counter[str] = Counter()
        """Messages received by the agent, by kind."""
        self.faults: Counter[str] = Counter()
        """Faults injected, by kind (``"drop_before"``, ``"drop_after_bytes_receive"``, ...)."""

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
        """Close the connection instead of sending the next message matching ``predicate``."""
        self._rules.append(("send", "drop_before", predicate))

    def drop_after(self, predicate: Callable[[Message], bool]) -> None:
        """Close the connection right after sending the next message matching ``predicate``."""
        self._rules.append(("send", "drop_after", predicate))

    def duplicate(self, predicate: Callable[[Message], bool]) -> None:
        """Send the next message matching ``predicate`` twice."""
        self._rules.append(("send", "duplicate", predicate))

    def truncate(self, predicate: Callable[[Message], bool]) -> None:
        """Send half of the next matching message's frame, then break the connection."""
        self._rules.append(("send", "truncate", predicate))

    def drop_on_receive(self, predicate: Callable[[Message], bool]) -> None:
        """Lose the next received message matching ``predicate`` and break the connection."""
        self._rules.append(("receive", "drop_on_receive", predicate))

    def duplicate_on_receive(self, predicate: Callable[[Message], bool]) -> None:
        """Hand the next received message matching ``predicate`` to the agent twice."""
        self._rules.append(("receive", "duplicate_on_receive", predicate))

    def drop_after_bytes(self, count: int, direction: str = "receive") -> None:
        """Break the connection once ``count`` more bytes were sent or received.

        Rules for one direction run one after another. Byte transports only (tcp, unix, tls).

        :raises ValueError: ``direction`` is neither ``"send"`` nor ``"receive"``, or
            ``count`` is negative.
        """
        if direction not in self._byte_rules:
            raise ValueError(f"direction must be 'send' or 'receive', got {direction!r}")
        if count < 0:
            raise ValueError(f"count must be at least 0, got {count}")
        self._byte_rules[direction].append(count)

    def inject_randomly(
        self,
        probability: float,
        *,
        seed: int | None = None,
        kinds: Iterable[str] = SEND_FAULTS + RECEIVE_FAULTS,
    ) -> None:
        """Inject a fault into each message with ``probability``, picked from ``kinds``.

        Handshake and goodbye messages are spared. ``seed`` makes the sequence of faults the
        same on every run (for one order of messages).

        :raises ValueError: ``probability`` is not within [0, 1] or a kind is unknown.
        """
        chosen = tuple(kinds)
        unknown = set(chosen) - set(SEND_FAULTS + RECEIVE_FAULTS)
        if unknown or not 0 <= probability <= 1:
            raise ValueError(
                f"need 0 <= probability <= 1 and kinds among {SEND_FAULTS + RECEIVE_FAULTS}"
            )
        self._random = random.Random(seed)
        self._probability = probability
        self._random_kinds = chosen

    async def drop(self) -> None:
        """Close the current connection now."""
        if self._current is not None:
            await self._current.aclose()

    def _decide(self, message: Message, direction: str) -> str | None:
        for index, (rule_direction, decision, predicate) in enumerate(self._rules):
            if rule_direction == direction and predicate(message):
                del self._rules[index]
                return decision
        chance = self._random
        if chance is None or isinstance(message, _HANDSHAKE):
            return None
        if chance.random() >= self._probability:
            return None
        kinds = SEND_FAULTS if direction == "send" else RECEIVE_FAULTS
        candidates = [kind for kind in self._random_kinds if kind in kinds]
        return chance.choice(candidates) if candidates else None

    def _byte_budget(self, direction: str) -> int | None:
        rules = self._byte_rules[direction]
        return rules[0] if rules else None

    def _spend(self, direction: str, count: int) -> None:
        rules = self._byte_rules[direction]
        if rules:
            rules[0] = max(rules[0] - count, 0)

    async def _read_delay(self) -> bool:
        """Before a read: wait ``read_delay``; whether it waited."""
        if self.read_delay:
            await anyio.sleep(self.read_delay)
            return True
        return False

    async def _read_stall(self) -> bool:
        """After a read: hold what was read while the read gate is closed; whether it waited."""
        gate = self.read_gate
        if gate is not None and not gate.is_set():
            await gate.wait()
            return True
        return False

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
