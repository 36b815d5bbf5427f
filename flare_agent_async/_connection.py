"""Drives one message stream for a sans-IO protocol: a reader, a writer and liveness.

Both the agent and the site run every connection through `Connection.run`, so reading, writing,
heartbeats and the liveness deadline are written once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

from .exceptions import ProtocolError, TransportError
from .protocol import Message
from .transports import FramedMessageStream, MessageStream, Progress

__all__ = ["CONNECTION_ERRORS", "Connection", "PeerSilent"]

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


def _never() -> None:
    return None


async def _let_others_queue() -> None:
    """One turn of the event loop before a woken writer collects its messages: what woke it
    (a result handled, say) usually woke others too, whose replies (the next task) then leave in
    the same system call instead of the next, and the peer wakes once instead of twice."""
    await anyio.lowlevel.checkpoint()


class Connection:
    """Runs a reader and a writer over ``stream`` until either ends; returns why it ended.

    * the writer sends whatever ``data_to_send()`` returns, in order; when nothing was sent for
      ``idle_interval()`` seconds it calls ``on_idle()`` (which queues a heartbeat, say); when
      ``deferred()`` gives a delay, it sends ``flush_deferred()`` once the delay is over unless
      something else went first;
    * the reader hands every message to ``handle`` and wakes the writer; if nothing arrives for
      ``read_timeout()`` seconds (not a message, not a byte of one, and no send the peer made
      room for) the peer is declared silent;
    * once ``finished()`` is true, the writer flushes what is left and the connection ends;
    * with ``max_handled_while_sending``, the reader handles at most that many messages while one
      send waits for the peer, then waits for the send: a peer that sends without reading cannot
      make the replies it asks for pile up (back-pressure; the site uses it, each message it
      handles queues at most one reply).
    """

    def __init__(
        self,
        stream: MessageStream,
        *,
        data_to_send: Callable[[], list[Message]],
        handle: Callable[[Message], None],
        finished: Callable[[], bool],
        read_timeout: Callable[[], float],
        idle_interval: Callable[[], float | None] = lambda: None,
        on_idle: Callable[[], None] = _never,
        deferred: Callable[[], float | None] = lambda: None,
        flush_deferred: Callable[[], list[Message]] = list,
        on_progress: Callable[[Progress], object] | None = None,
        on_protocol_error: Callable[[ProtocolError], None] | None = None,
        max_handled_while_sending: int | None = None,
    ) -> None:
        self.stream = stream
        self._data_to_send = data_to_send
        self._handle = handle
        self._finished = finished
        self._read_timeout = read_timeout
        self._idle_interval = idle_interval
        self._on_idle = on_idle
        self._deferred = deferred
        self._flush_deferred = flush_deferred
        self._on_protocol_error = on_protocol_error
        self._max_handled_while_sending = max_handled_while_sending
        self._sending = False  # whether the writer is in a send
        self._sent: anyio.Event | None = None  # made by a reader that waits for the send
        self._handled_while_sending = 0
        self._wakeup: anyio.Event | None = None  # set while the writer waits
        self._scope = anyio.CancelScope()
        self._read_scope: anyio.CancelScope | None = None  # the reader's liveness deadline
        self._last_alive = 0.0  # when the peer was last heard from (the event loop's clock)
        self._draining = False
        self._error: BaseException | None = None
        if isinstance(stream, FramedMessageStream):
            # Liveness counts bytes: a large frame still moving keeps the peer alive.
            stream.on_activity = self._alive
            stream.on_progress = on_progress

    def _alive(self) -> None:
        self._last_alive = anyio.current_time()

    def wake(self) -> None:
        """Tell the writer there may be something to send."""
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    def read_timeout_changed(self) -> None:
        """Re-arm the liveness deadline with what ``read_timeout()`` says now (a welcome told the
        agent its site's heartbeat timeout: until then it waited as long as a connect may)."""
        scope = self._read_scope
        if scope is not None:
            scope.deadline = self._last_alive + self._read_timeout()

    def close(self) -> None:
        """End the connection now, without flushing."""
        self._scope.cancel()

    async def run(self) -> BaseException | None:
        """Run until the connection ends; returns the error that ended it, None if it finished."""
        try:
            with self._scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._guard, self._write, group.cancel_scope)
                    group.start_soon(self._guard, self._read, group.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()
        if self._error is None and self._scope.cancel_called and not self._finished():
            self._error = TransportError("the connection was closed")
        return self._error

    async def _guard(self, run: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
        try:
            await run()
        except ProtocolError as exc:
            if self._error is None:
                self._error = exc
            if self._on_protocol_error is not None and not self._draining:
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
        assert self._on_protocol_error is not None
        self._draining = True
        self._on_protocol_error(error)  # the connection is finished from here on
        self._scope.deadline = min(self._scope.deadline, anyio.current_time() + _BYE_SECONDS)
        self.wake()
        stream = self.stream
        try:
            if isinstance(stream, FramedMessageStream):
                await stream.discard_incoming()
            else:
                while True:
                    await stream.receive()
        except CONNECTION_ERRORS:
            pass
        self._draining = False

    async def _write(self) -> None:
        last_sent = anyio.current_time()
        while True:
            messages = self._data_to_send()
            if messages:
                await self._send(messages)
                del messages  # sent messages may hold models: keep no reference while waiting
                last_sent = anyio.current_time()
                continue
            if self._finished():
                return
            wakeup = self._wakeup = anyio.Event()
            interval = self._idle_interval()
            delay = self._deferred()
            if interval is None and delay is None:
                await wakeup.wait()
                await _let_others_queue()
                continue
            # Idle means nothing sent for an interval, however much was received meanwhile.
            idle_at = math.inf if interval is None else last_sent + interval
            flush_at = math.inf if delay is None else anyio.current_time() + delay
            with anyio.CancelScope(deadline=min(idle_at, flush_at)) as timer:
                await wakeup.wait()
            if not timer.cancelled_caught:
                await _let_others_queue()
            elif anyio.current_time() >= flush_at:
                messages = self._flush_deferred()
                if messages:
                    await self._send(messages)
                    del messages
                    last_sent = anyio.current_time()
            elif anyio.current_time() >= idle_at:
                self._on_idle()

    async def _send(self, messages: list[Message]) -> None:
        stream = self.stream
        self._sending = True
        self._handled_while_sending = 0
        try:
            if isinstance(stream, FramedMessageStream):
                await stream.send_batch(messages)  # one system call for small messages
            else:
                for message in messages:
                    await stream.send(message)
        finally:
            self._sending = False
            sent, self._sent = self._sent, None
            if sent is not None:
                sent.set()

    async def _wait_for_send(self) -> None:
        """Back-pressure: after enough messages handled during one send, wait for it to end."""
        limit = self._max_handled_while_sending
        if not self._sending or limit is None:
            return
        self._handled_while_sending += 1
        if self._handled_while_sending >= limit:
            if self._sent is None:
                self._sent = anyio.Event()
            await self._sent.wait()

    async def _read(self) -> None:
        stream = self.stream
        counts_bytes = isinstance(stream, FramedMessageStream)  # then it calls _alive itself
        self._alive()
        while True:
            # The deadline is not moved at every message (that costs more than the message):
            # when it passes, the reader looks at when the peer was last heard, and goes on.
            deadline = self._last_alive + self._read_timeout()
            if anyio.current_time() >= deadline:
                raise PeerSilent(f"nothing arrived from the peer for {self._read_timeout():g} s")
            with anyio.CancelScope(deadline=deadline) as self._read_scope:
                while True:
                    message = await stream.receive()  # a cancellation here loses nothing
                    if not counts_bytes:
                        self._alive()
                    self._handle(message)
                    del message  # a received model belongs to the trainer now, not to this loop
                    self.wake()
                    await self._wait_for_send()
