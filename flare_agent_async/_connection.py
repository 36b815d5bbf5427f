"""Drives one message stream for a sans-IO protocol: a reader, a writer and liveness.

Both the agent and the site run every connection through `Connection.run`, so reading, writing,
heartbeats and the liveness deadline are written once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import anyio.lowlevel

from ._wakeup import Wakeup
from .exceptions import ProtocolError, TransportError
from .protocol import Message
from .transports import MessageStream, MessageStreamAttribute, Progress

__all__ = ["CONNECTION_ERRORS", "Connection", "ConnectionHandler", "PeerSilent"]

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    TransportError,
    OSError,
    ProtocolError,
)
"""What ends one connection (the agent reconnects, the site waits for it) but nothing else."""


_BYE_SECONDS = 5.0


class PeerSilent(TransportError):
    """Nothing arrived from the peer within the liveness timeout."""


class ConnectionHandler(Protocol):
    """One side's session on one connection, as a `Connection` drives it: the agent's and the
    site's each wrap their sans-IO machine in one. Called from the connection's reader and
    writer, in the event loop, one call at a time."""

    def data_to_send(self) -> list[Message]:
        """The messages to send now, in order; messages that may wait are held back."""
        ...

    def deferred_delay(self) -> float | None:
        """Seconds the held-back messages may wait for others to ride along; None if none."""
        ...

    def flush_deferred(self) -> list[Message]:
        """The held-back messages, once their delay is over."""
        ...

    def handle(self, message: Message) -> None:
        """Take in a message from the peer."""
        ...

    def finished(self) -> bool:
        """Whether the connection ends once what is queued has been sent."""
        ...

    def read_timeout(self) -> float:
        """Seconds of silence from the peer after which it is declared silent."""
        ...

    def idle_interval(self) -> float | None:
        """Seconds without a send after which `idle` is called; None: never."""
        ...

    def idle(self) -> None:
        """Nothing was sent for `idle_interval`: queue a heartbeat, say."""
        ...

    def protocol_error(self, error: ProtocolError) -> None:
        """The peer broke the protocol: queue a goodbye that says why; the session is over."""
        ...


async def _let_others_queue() -> None:
    """One turn of the event loop before a woken writer collects its messages: what woke it
    usually woke others too, whose messages then leave in the same system call instead of the
    next, and the peer wakes once instead of twice."""
    await anyio.lowlevel.checkpoint()


class Connection:
    """Runs a reader and a writer over ``stream`` for ``handler`` until either ends; returns why
    it ended.

    * the writer sends whatever ``handler.data_to_send()`` returns, in order; when nothing was
      sent for ``handler.idle_interval()`` seconds it calls ``handler.idle()``; when
      ``handler.deferred_delay()`` gives a delay, it sends ``handler.flush_deferred()`` once the
      delay is over unless something else went first;
    * `wake` sends small messages itself while the writer is idle, when the stream can send
      without waiting (``send_batch_nowait``): a task or a result leaves in the turn that made it;
    * the reader hands every message to ``handler.handle`` and wakes the writer; if nothing
      arrives for ``handler.read_timeout()`` seconds (not a message, not a byte of one where the
      stream counts bytes, and no send the peer made room for) the peer is declared silent;
    * once ``handler.finished()`` is true, the writer flushes what is left and the connection ends;
    * with ``max_handled_while_sending``, the reader handles at most that many messages while one
      send waits for the peer, then waits for the send: a peer that sends without reading cannot
      make the replies it asks for pile up (back-pressure; the site uses it, each message it
      handles queues at most one reply).

    It uses what the stream declares of `MessageStreamAttribute`: batched sends, liveness by
    bytes and ``on_progress`` reports, draining after a protocol error.
    """

    def __init__(
        self,
        stream: MessageStream,
        handler: ConnectionHandler,
        *,
        on_progress: Callable[[Progress], object] | None = None,
        max_handled_while_sending: int | None = None,
    ) -> None:
        self.stream = stream
        self._handler = handler
        self._max_handled_while_sending = max_handled_while_sending
        self._sending = False  # whether the writer is in a send
        self._sent = Wakeup()  # a send has ended: a reader may wait for it
        self._handled_while_sending = 0
        self._wakeup = Wakeup()  # there may be something to send
        self._scope = anyio.CancelScope()
        self._read_scope: anyio.CancelScope | None = None  # the reader's liveness deadline
        self._last_alive = 0.0  # when the peer was last heard from (the event loop's clock)
        self._draining = False
        self._error: BaseException | None = None
        self._send_batch = stream.extra(MessageStreamAttribute.send_batch, None)
        self._send_nowait = stream.extra(MessageStreamAttribute.send_batch_nowait, None)
        # The writer, while idle: its timer, the idle interval it keeps and when it flushes the
        # held-back messages; whether the stream keeps messages only a send_batch flushes.
        self._timer: anyio.CancelScope | None = None
        self._idle_interval: float | None = None
        self._flush_at = math.inf
        self._last_sent = 0.0
        self._held = False
        self._discard_incoming = stream.extra(MessageStreamAttribute.discard_incoming, None)
        watch_bytes = stream.extra(MessageStreamAttribute.watch_bytes, None)
        self._counts_bytes = watch_bytes is not None
        if watch_bytes is not None:
            watch_bytes(self._alive, on_progress)

    def _alive(self) -> None:
        self._last_alive = anyio.current_time()

    def wake(self) -> None:
        """There may be something to send. While the writer is idle, small messages that can go
        at once are sent right here, in the caller's turn: the peer has them a turn of the event
        loop sooner and the writer is not woken for them; anything else wakes the writer."""
        timer = self._timer
        if timer is None or self._send_nowait is None:
            self._wake_writer()
            return
        handler = self._handler
        messages = handler.data_to_send()
        if messages:
            if not self._send_nowait(messages):  # the stream keeps them for the writer
                self._held = True
                self._wake_writer()
                return
            self._last_sent = anyio.current_time()
        if handler.finished() or handler.idle_interval() != self._idle_interval:
            self._wake_writer()
        elif self._flush_at == math.inf:
            delay = handler.deferred_delay()
            if delay is not None:  # the writer's timer now also flushes the held-back messages
                self._flush_at = anyio.current_time() + delay
                timer.deadline = min(timer.deadline, self._flush_at)

    def _wake_writer(self) -> None:
        self._timer = None  # the writer is on its way: nothing is sent past it any more
        self._wakeup.set()

    def read_timeout_changed(self) -> None:
        """Re-arm the liveness deadline with what ``read_timeout()`` says now (a welcome told the
        agent its site's heartbeat timeout: until then it waited as long as a connect may)."""
        scope = self._read_scope
        if scope is not None:
            scope.deadline = self._last_alive + self._handler.read_timeout()

    def close(self) -> None:
        """End the connection now, without flushing."""
        self._scope.cancel()

    async def run(self) -> BaseException | None:
        """Run until the connection ends; returns the error that ended it, None if it finished."""
        try:
            with self._scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._guard, self._write, group.cancel_scope)
                    # The reader runs in this task: one task fewer per connection to keep.
                    await self._guard(self._read, group.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()
        if self._error is None and self._scope.cancel_called and not self._handler.finished():
            self._error = TransportError("the connection was closed")
        return self._error

    async def _guard(self, run: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
        try:
            await run()
        except ProtocolError as exc:
            if self._error is None:
                self._error = exc
            if not self._draining:
                await self._say_why_and_close(exc)
        except CONNECTION_ERRORS as exc:
            if self._error is None:
                self._error = exc
        if not self._draining:
            scope.cancel()

    async def _say_why_and_close(self, error: ProtocolError) -> None:
        """Queue a goodbye saying why, let the writer send it, and keep reading (and dropping)
        until the peer closes, for a few seconds at most: closing with unread bytes would reset
        the connection and could destroy the goodbye on its way."""
        self._draining = True
        self._handler.protocol_error(error)  # the connection is finished from here on
        self._scope.deadline = min(self._scope.deadline, anyio.current_time() + _BYE_SECONDS)
        self.wake()
        try:
            if self._discard_incoming is not None:
                await self._discard_incoming()
            else:
                while True:
                    await self.stream.receive()
        except CONNECTION_ERRORS:
            pass
        self._draining = False

    async def _write(self) -> None:
        handler = self._handler
        self._last_sent = anyio.current_time()
        while True:
            messages = handler.data_to_send()
            if messages or self._held:
                self._held = False
                await self._send(messages)
                del messages  # sent messages may hold models: keep no reference while waiting
                self._last_sent = anyio.current_time()
                continue
            if handler.finished():
                return
            self._idle_interval = interval = handler.idle_interval()
            delay = handler.deferred_delay()
            self._flush_at = math.inf if delay is None else anyio.current_time() + delay
            # Idle means nothing sent for an interval, however much was received meanwhile.
            idle_at = math.inf if interval is None else self._last_sent + interval
            timer = anyio.CancelScope(deadline=min(idle_at, self._flush_at))
            try:
                with timer:
                    self._timer = timer  # idle: `wake` may send past the writer, and arm it
                    await self._wakeup.wait()
            finally:
                self._timer = None
            if not timer.cancelled_caught:
                await _let_others_queue()
                continue
            now = anyio.current_time()
            if now >= self._flush_at:
                messages = handler.flush_deferred()
                if messages:
                    await self._send(messages)
                    del messages
                    self._last_sent = anyio.current_time()
            elif interval is not None and now >= self._last_sent + interval:
                handler.idle()

    async def _send(self, messages: list[Message]) -> None:
        self._sending = True
        self._handled_while_sending = 0
        try:
            if self._send_batch is not None:
                await self._send_batch(messages)  # one system call for small messages
            else:
                for message in messages:
                    await self.stream.send(message)
        finally:
            self._sending = False
            self._sent.set()

    async def _wait_for_send(self) -> None:
        """Back-pressure: after enough messages handled during one send, wait for it to end."""
        limit = self._max_handled_while_sending
        if not self._sending or limit is None:
            return
        self._handled_while_sending += 1
        if self._handled_while_sending >= limit:
            await self._sent.wait()

    async def _read(self) -> None:
        stream, handle = self.stream, self._handler.handle
        counts_bytes = self._counts_bytes  # then the stream calls _alive itself
        self._alive()
        while True:
            # The deadline is not moved at every message (that costs more than the message):
            # when it passes, the reader looks at when the peer was last heard, and goes on.
            deadline = self._last_alive + self._handler.read_timeout()
            if anyio.current_time() >= deadline:
                raise PeerSilent(
                    f"nothing arrived from the peer for {self._handler.read_timeout():g} s"
                )
            with anyio.CancelScope(deadline=deadline) as self._read_scope:
                while True:
                    message = await stream.receive()  # a cancellation here loses nothing
                    if not counts_bytes:
                        self._alive()
                    handle(message)
                    del message  # a received model belongs to the trainer now, not to this loop
                    self.wake()
                    await self._wait_for_send()
