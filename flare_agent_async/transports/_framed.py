"""Messages over a byte stream: `FramedMessageStream` drives the codec's `FrameReader`.

A `ByteStream` is the little a framed transport needs from a connection: receive into a buffer,
send some of a list of buffers, close. Sockets implement it without copies (``recv_into`` and
``sendmsg`` on the raw socket, with the event loop's readiness waits); TLS wraps any byte stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import ObjectStream

from ..protocol import FrameError, FrameReader, Limits, Message, encode_frame
from ._base import MessageStreamAttribute, Progress

__all__ = ["ByteStream", "FramedMessageStream", "Progress"]

PROGRESS_MIN_BYTES = 1 << 20
"""Frames at least this large report their progress."""
_YIELD_EVERY_BYTES = 4 << 20
_YIELD_EVERY_MESSAGES = 16
_NOWAIT_MAX_BYTES = 64 * 1024


class ByteStream(ABC):
    """A connection's bytes, both ways.

    ``receive_into`` returns 0 at the end of the stream; errors are anyio's:
    `anyio.BrokenResourceError` (with the cause chained) and `anyio.ClosedResourceError`.
    """

    waited_to_send = False
    """Whether the last `send_some` had to wait for the peer to make room (then the peer is
    alive and reading); if not, it did not yield to other tasks either."""
    waited_to_receive = False
    """Whether the last `receive_into` waited for bytes; if not, it did not yield either."""

    @abstractmethod
    async def receive_into(self, buffer: memoryview) -> int:
        """Read at most ``len(buffer)`` bytes into ``buffer``; 0 means the peer closed.

        It need not be a schedule point when bytes are already there (see `waited_to_receive`),
        and must not lose bytes to a cancellation: once read, they are returned.
        """

    @abstractmethod
    async def send_some(self, buffers: Sequence[memoryview]) -> int:
        """Send from the start of ``buffers``; returns how many bytes went (at least one)."""

    sends_at_once = False
    """Whether `try_send` can send (sockets can; TLS, which must flush what it holds back,
    cannot)."""

    def try_send(self, buffers: Sequence[memoryview]) -> int:
        """Send from the start of ``buffers`` if that needs no waiting; how many bytes went (0
        when none could). Only for streams that declare `sends_at_once`."""
        raise NotImplementedError

    async def flush(self) -> None:  # noqa: B027 - most byte streams hold nothing back
        """Write out whatever `send_some` accepted but holds back (TLS does); by default none."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection."""

    async def abort(self) -> None:
        """Close at once, without writing what is held back: the stream is broken."""
        await self.aclose()


def advance(parts: list[memoryview], count: int) -> None:
    """Drop the first ``count`` bytes of ``parts`` (what a partial send took), in place."""
    while parts and count >= parts[0].nbytes:
        count -= parts.pop(0).nbytes
    if count:
        parts[0] = parts[0][count:]


def _describe(message: Message) -> tuple[str, str | None]:
    return type(message).__name__, getattr(message, "task_id", None)


class FramedMessageStream(ObjectStream[Message]):
    """Protocol messages over a `ByteStream`, framed by the codec.

    Sends are serialized (concurrent senders take turns); a send cancelled in the middle of a
    frame breaks the connection, since the peer cannot resynchronize. A cancelled receive loses
    nothing: what was read stays with the reader for the next call.

    ``on_activity`` is called whenever bytes arrive, or a send that waited for the peer goes
    through: the peer is alive. ``on_progress`` gets a `Progress` for frames of 1 MiB and more.
    It declares all of `MessageStreamAttribute`.
    """

    def __init__(self, stream: ByteStream, *, limits: Limits | None = None) -> None:
        self._stream = stream
        self._reader = FrameReader(limits)
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._closed = False
        # Each direction breaks on its own: after a bad frame in, a goodbye can still go out.
        self._receive_broken: BaseException | None = None
        self._send_broken: BaseException | None = None
        self._unyielded_messages = 0
        self._unyielded_sends = 0
        # What send_batch_nowait could not send, sent first by send_batch: messages (with their
        # frames, when encoded already), and the rest of a frame the socket took only part of.
        self._unsent: list[tuple[Message, list[memoryview] | None]] = []
        self._unsent_parts: list[memoryview] = []
        self.on_activity: Callable[[], object] | None = None
        self.on_progress: Callable[[Progress], object] | None = None

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            MessageStreamAttribute.send_batch: lambda: self.send_batch,
            MessageStreamAttribute.send_batch_nowait: lambda: self.send_batch_nowait,
            MessageStreamAttribute.watch_bytes: lambda: self.watch_bytes,
            MessageStreamAttribute.discard_incoming: lambda: self.discard_incoming,
        }

    @property
    def byte_stream(self) -> ByteStream:
        """The bytes under the frames; a test double may wrap them before the first message."""
        return self._stream

    @byte_stream.setter
    def byte_stream(self, stream: ByteStream) -> None:
        self._stream = stream

    def watch_bytes(
        self,
        on_activity: Callable[[], object],
        on_progress: Callable[[Progress], object] | None = None,
    ) -> None:
        """Report the peer alive at every byte, and large frames' progress (see the class)."""
        self.on_activity = on_activity
        self.on_progress = on_progress

    def _check_open(self, broken: BaseException | None) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if broken is not None:
            raise anyio.BrokenResourceError from broken

    async def receive(self) -> Message:
        self._check_open(self._receive_broken)
        reader, stream = self._reader, self._stream
        if self._unyielded_messages >= _YIELD_EVERY_MESSAGES:
            # Messages already buffered are handed out without waiting; now and then let the
            # rest of the program run (before taking one, so a cancellation loses nothing).
            await anyio.lowlevel.checkpoint()
            self._unyielded_messages = 0
        waited = False
        unyielded = 0  # bytes read since the last time this task let others run
        try:
            message = reader.next_message()
            while message is None:
                count = await stream.receive_into(reader.buffer_for_read())
                if not count:
                    if reader.mid_frame:
                        raise anyio.BrokenResourceError(
                            "the peer closed the connection in the middle of a frame"
                        )
                    raise anyio.EndOfStream
                reader.bytes_read(count)  # from here on, a cancellation loses nothing
                if self.on_activity is not None:
                    self.on_activity()
                if self.on_progress is not None and reader.frame_bytes >= PROGRESS_MIN_BYTES:
                    kind, task_id = reader.frame_message
                    done, total = reader.frame_bytes_read, reader.frame_bytes
                    message = reader.next_message()
                    if message is not None:  # complete: staged bytes were counted on the way
                        done = total
                    self.on_progress(Progress("receive", kind, task_id, done, total))
                    if message is not None:
                        break
                if stream.waited_to_receive:
                    waited, unyielded = True, 0
                else:
                    unyielded += count
                    if unyielded >= _YIELD_EVERY_BYTES:  # a fast peer must not starve the rest
                        await anyio.lowlevel.checkpoint()
                        waited, unyielded = True, 0
                message = reader.next_message()
        except (FrameError, anyio.BrokenResourceError) as exc:
            self._receive_broken = exc
            raise
        if waited:
            self._unyielded_messages = 0
        else:
            self._unyielded_messages += 1
        return message

    async def send(self, item: Message) -> None:
        await self.send_batch([item])

    def send_batch_nowait(self, items: Sequence[Message]) -> bool:
        """Send small messages now, without waiting, if nothing else is on its way.

        Returns True if every byte went. Otherwise what did not go (all of it, or the rest of a
        frame the socket took only part of) is kept, and the next `send_batch` sends it first;
        a send that fails here fails there.
        """
        kept = self._unsent
        if (
            kept
            or self._unsent_parts
            or not self._stream.sends_at_once
            or self._send_lock.locked()
            or self._closed
            or self._send_broken is not None
        ):
            kept.extend((item, None) for item in items)
            return False
        try:
            frames = [encode_frame(item) for item in items]
        except Exception:  # send_batch raises it again, where the writer handles it
            kept.extend((item, None) for item in items)
            return False
        parts = [part for frame in frames for part in frame]
        total = sum(part.nbytes for part in parts)
        sent = 0
        if total <= _NOWAIT_MAX_BYTES:  # large frames go with the writer, which reports progress
            try:
                sent = self._stream.try_send(parts)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                self._send_broken = exc
        if sent == total:
            self._unyielded_sends += 1
            return True
        if sent:
            advance(parts, sent)
            self._unsent_parts = parts
        else:
            kept.extend(zip(items, frames, strict=True))  # encoded once: sent as they are
        return False

    async def send_batch(self, items: Sequence[Message]) -> None:
        """Send messages in order, small ones together in one system call."""
        if self._unyielded_sends >= _YIELD_EVERY_MESSAGES:
            await anyio.lowlevel.checkpoint()  # nothing is sent or taken yet: nothing is lost
            self._unyielded_sends = 0
        frames = [encode_frame(item) for item in items]  # what cannot be sent fails here
        if self._unsent:  # what send_batch_nowait could not send goes first
            kept, self._unsent = self._unsent, []
            frames[:0] = [encode_frame(item) if frame is None else frame for item, frame in kept]
            items = [*(item for item, _ in kept), *items]
        sizes = [sum(part.nbytes for part in frame) for frame in frames]
        parts = [part for frame in frames for part in frame]
        total = sum(sizes)
        report = total >= PROGRESS_MIN_BYTES and self.on_progress is not None
        item = items[sizes.index(max(sizes))] if items else None  # progress is told of the largest
        async with self._send_lock:
            self._check_open(self._send_broken)
            begun = bool(self._unsent_parts)  # the rest of a frame send_batch_nowait began
            parts[:0], self._unsent_parts = self._unsent_parts, []
            sent = unyielded = 0
            waited = False
            try:
                while parts:
                    count = await self._stream.send_some(parts)
                    sent += count
                    if self._stream.waited_to_send:
                        waited, unyielded = True, 0
                        if self.on_activity is not None:
                            self.on_activity()  # the peer made room: it is alive
                    else:
                        unyielded += count
                    advance(parts, count)
                    if report:
                        assert item is not None
                        kind, task_id = _describe(item)
                        assert self.on_progress is not None
                        self.on_progress(Progress("send", kind, task_id, sent, total))
                    if parts and unyielded >= _YIELD_EVERY_BYTES:
                        await anyio.lowlevel.checkpoint()
                        waited, unyielded = True, 0
                await self._stream.flush()
            except BaseException as exc:
                # Part of a frame went out, or all of it without its last bytes flushed (TLS):
                # the peer cannot tell where the next frame starts, so nothing can follow it.
                if sent or begun:
                    self._send_broken = exc
                    with anyio.CancelScope(shield=True):
                        await self._stream.abort()
                raise
        self._unyielded_sends = 0 if waited else self._unyielded_sends + 1

    async def discard_incoming(self) -> None:
        """Read and drop whatever the peer still sends, until it closes the connection.

        After a protocol error: closing a socket with unread bytes resets the connection, which
        could destroy the goodbye that tells the peer why.
        """
        scratch = memoryview(bytearray(64 * 1024))
        while True:
            try:
                if not await self._stream.receive_into(scratch):
                    return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    async def send_eof(self) -> None:
        raise NotImplementedError("framed streams close both ways at once")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stream.aclose()
