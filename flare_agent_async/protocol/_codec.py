"""Frames: how messages become bytes and back, without I/O.

A frame is::

    prefix   12 bytes: b"FA", version 1, reserved 0, header length (u32 LE), buffer count (u32 LE)
    header   msgpack [buffer lengths, message]; payload arrays and large bytes are extensions
             that point at buffers
    buffers  the raw bytes of each array and large bytes object, one after another

`encode_frame` returns the pieces to write, the header first and then the arrays' own memory: no
copy. `FrameReader` is fed by a transport: `buffer_for_read` says where the next bytes go (its
staging buffer for headers and small frames, or straight into a received array's memory for large
ones) and `next_message` returns each message once its frame is complete. Limits are checked
before anything is allocated; a broken limit or a malformed frame raises `FrameError`, after which
the connection must be closed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgspec

from ..exceptions import RemoteProtocolError
from ._messages import Log, Message, Part, Result, TaskAssign
from ._payload import InvalidPayload, PayloadDecoder, encode_payload

__all__ = ["FrameError", "FrameReader", "Limits", "encode_frame"]

MAGIC = b"FA"
FRAME_VERSION = 1
_PREFIX = struct.Struct("<2sBBII")
PREFIX_BYTES = _PREFIX.size
_STAGING_BYTES = 64 * 1024  # the most one read takes into staging; larger reads go direct
_STAGING_START = 8 * 1024  # an idle connection's staging: thousands of agents, small messages

# The payload fields of each message kind: encoded and decoded as payloads.
_PAYLOAD_FIELDS: dict[type, tuple[str, ...]] = {
    TaskAssign: ("meta", "data"),
    Result: ("meta", "data"),
    Log: ("value", "options"),
    Part: ("value",),
}

_encoder = msgspec.msgpack.Encoder()
_envelope = msgspec.msgpack.Decoder(tuple[list[int], msgspec.Raw])
_lenient = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=lambda code, data: None)


class FrameError(RemoteProtocolError):
    """A frame broke the limits or the format; the connection cannot go on."""


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; checked before anything is allocated."""

    max_header_bytes: int = 16 * 2**20
    """The msgpack header: ids, meta, and payload values that are not arrays or large bytes."""
    max_frame_bytes: int = 8 * 2**30
    """Header and buffers together."""
    max_buffers: int = 65_536
    """Arrays and large bytes objects in one message."""


def encode_frame(message: Message) -> list[memoryview]:
    """The pieces of ``message``'s frame, to be written in order.

    The first piece holds the prefix and header; the others are the payload's arrays and large
    bytes, not copied.

    :raises TypeError: a payload holds something that cannot be sent (the message names where).
    """
    buffers: list[memoryview] = []
    fields = _PAYLOAD_FIELDS.get(type(message))
    if fields:
        wire = {name: encode_payload(getattr(message, name), name, buffers) for name in fields}
        message = msgspec.structs.replace(message, **wire)
    header = _encoder.encode(([buffer.nbytes for buffer in buffers], message))
    prefix = _PREFIX.pack(MAGIC, FRAME_VERSION, 0, len(header), len(buffers))
    return [memoryview(prefix + header), *buffers]


class FrameReader:
    """Reassembles messages from the bytes of a connection (see the module docstring)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._staging = bytearray(_STAGING_START)  # doubles while reads fill it, to _STAGING_BYTES
        self._start = 0  # staged bytes not used yet: self._staging[self._start:self._end]
        self._end = 0
        self._direct = False  # whether the last buffer_for_read was a destination buffer
        self._grow = False  # whether the last read into staging filled it
        self._header_bytes: int | None = None  # set once the prefix is read
        self._buffer_count = 0
        self._message: Message | None = None  # set once the header is read
        self._payloads: PayloadDecoder | None = None
        # One long-lived decoder; its extension hook serves the frame being decoded.
        self._decoder = msgspec.msgpack.Decoder(Message, ext_hook=self._ext_hook)
        self._buffers: list[memoryview] = []  # destinations still to fill, the first one partly
        self._filled = 0  # bytes of self._buffers[0] filled
        self.frame_bytes = 0
        """The size of the frame being read; 0 between frames (for progress reports)."""
        self.frame_bytes_read = 0
        """How much of it has arrived."""

    @property
    def frame_message(self) -> tuple[str, str | None]:
        """The kind and task id of the frame being read (known once its header is)."""
        message = self._message
        return type(message).__name__, getattr(message, "task_id", None)

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has been read: the peer must not stop here."""
        return self._start != self._end or self._header_bytes is not None

    def buffer_for_read(self) -> memoryview:
        """Where the transport should read the next bytes into (then call `bytes_read`)."""
        if self._buffers and self._start == self._end:
            destination = self._buffers[0]
            if destination.nbytes - self._filled >= _STAGING_BYTES:
                self._direct = True  # large: straight into the array's memory
                return destination[self._filled :]
        self._direct = False
        staging = self._staging
        if self._grow:  # a new buffer: views of the old one may still be about
            self._grow = False
            used = self._end - self._start
            grown = self._staging = bytearray(min(2 * len(staging), _STAGING_BYTES))
            grown[:used] = staging[self._start : self._end]
            staging, self._start, self._end = grown, 0, used
        if self._start == self._end:
            self._start = self._end = 0
            if len(staging) > _STAGING_BYTES and self._header_bytes is None:
                staging = self._staging = bytearray(_STAGING_BYTES)  # after a large header
        want = self._header_bytes if self._header_bytes is not None else PREFIX_BYTES
        if len(staging) - self._start < want or len(staging) - self._end < 4096:
            used = self._end - self._start
            staging[:used] = staging[self._start : self._end]
            self._start, self._end = 0, used
        if len(staging) < want:
            staging.extend(bytes(want - len(staging)))
        return memoryview(staging)[self._end :]

    def bytes_read(self, count: int) -> None:
        """``count`` bytes were written into the view `buffer_for_read` returned last."""
        if not self._direct:
            self._end += count
            # A read that filled all the room it had says more may be waiting: read more next.
            self._grow = self._end == len(self._staging) < _STAGING_BYTES
            return
        self._filled += count
        self.frame_bytes_read += count
        if self._filled == self._buffers[0].nbytes:
            self._buffers.pop(0)
            self._filled = 0

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive.

        :raises FrameError: the frame broke a limit or is malformed.
        """
        while True:
            if self._header_bytes is None:
                if self._end - self._start < PREFIX_BYTES:
                    return None
                self._read_prefix()
            elif self._message is None:
                if self._end - self._start < self._header_bytes:
                    return None
                self._read_header()
            elif self._buffers:
                if self._start == self._end:
                    return None
                self._copy_staged()
            else:
                return self._complete()

    def _read_prefix(self) -> None:
        magic, version, _, header_bytes, buffer_count = _PREFIX.unpack_from(
            self._staging, self._start
        )
        if magic != MAGIC:
            raise FrameError(
                f"not a flare_agent_async peer: frames start with {MAGIC!r}, got {bytes(magic)!r}"
            )
        if version != FRAME_VERSION:
            raise FrameError(
                f"frame version {version} is not supported (this side: {FRAME_VERSION})"
            )
        limits = self.limits
        if header_bytes > limits.max_header_bytes:
            raise FrameError(
                f"a frame header of {header_bytes} bytes exceeds the limit of "
                f"{limits.max_header_bytes} bytes"
            )
        if buffer_count > limits.max_buffers:
            raise FrameError(
                f"a frame of {buffer_count} buffers exceeds the limit of {limits.max_buffers}"
            )
        self._start += PREFIX_BYTES
        self._header_bytes = header_bytes
        self._buffer_count = buffer_count

    def _read_header(self) -> None:
        assert self._header_bytes is not None
        header = memoryview(self._staging)[self._start : self._start + self._header_bytes]
        try:
            lengths, raw = _envelope.decode(header)
        except Exception as exc:  # DecodeError, or RecursionError for absurd nesting
            raise FrameError(f"malformed frame header: {exc!r}") from exc
        if len(lengths) != self._buffer_count or any(n < 0 for n in lengths):
            raise FrameError("the frame's buffer lengths do not match its prefix")
        total = PREFIX_BYTES + self._header_bytes + sum(lengths)
        if total > self.limits.max_frame_bytes:
            raise FrameError(
                f"a frame of {total} bytes exceeds the limit of {self.limits.max_frame_bytes} bytes"
            )
        # Decoding allocates the arrays the buffers are read into, so it comes after the checks.
        self._message, self._payloads = self._decode_message(raw, lengths)
        self._buffers = [b for b in self._payloads.destinations if b is not None and b.nbytes]
        self._filled = 0
        self._start += self._header_bytes
        self.frame_bytes = total
        self.frame_bytes_read = PREFIX_BYTES + self._header_bytes

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        assert self._payloads is not None
        return self._payloads.ext_hook(code, data)

    def _decode_message(
        self, raw: msgspec.Raw, lengths: list[int]
    ) -> tuple[Message, PayloadDecoder]:
        payloads = self._payloads = PayloadDecoder(lengths)
        try:
            message = self._decoder.decode(raw)
            payloads.check_complete()
            return message, payloads
        except Exception as exc:  # whatever breaks inside a peer's payload
            problem = exc
        # A task whose payload is unusable: keep the connection, answer it with BAD_TASK_DATA.
        try:
            fields = _lenient.decode(raw)
        except Exception:
            fields = {}
        task_id, task_name = fields.get("task_id"), fields.get("task_name")
        if fields.get("kind") == "task" and isinstance(task_id, str):
            name = task_name if isinstance(task_name, str) else ""
            reason = f"cannot decode the task's payload: {problem}"
            invalid = TaskAssign(
                task_id=task_id, task_name=name, meta={}, data=InvalidPayload(reason)
            )
            return invalid, _discard(lengths)
        key = fields.get("key")
        if fields.get("kind") == "part" and isinstance(task_id, str) and isinstance(key, str):
            # An entry that cannot be decoded: the receiver learns which, and why.
            failed = Part(task_id=task_id, key=key, error=f"cannot decode the entry: {problem}")
            return failed, _discard(lengths)
        raise FrameError(f"malformed {fields.get('kind', 'message')!s}: {problem}") from problem

    def _copy_staged(self) -> None:
        destination = self._buffers[0]
        count = min(destination.nbytes - self._filled, self._end - self._start)
        end = self._filled + count
        destination[self._filled : end] = self._staging[self._start : self._start + count]
        self._start += count
        self._filled = end
        self.frame_bytes_read += count
        if end == destination.nbytes:
            self._buffers.pop(0)
            self._filled = 0

    def _complete(self) -> Message:
        message, payloads = self._message, self._payloads
        assert message is not None and payloads is not None
        self._header_bytes = None
        self._message = self._payloads = None
        self.frame_bytes = self.frame_bytes_read = 0
        fields = _PAYLOAD_FIELDS.get(type(message))
        if fields and payloads.pending:
            try:
                finished = {name: payloads.finish(getattr(message, name)) for name in fields}
            except Exception as exc:  # a registered type's from_wire refused the peer's value
                if isinstance(message, TaskAssign):
                    reason = f"cannot decode the task's payload: {exc!r}"
                    return msgspec.structs.replace(message, meta={}, data=InvalidPayload(reason))
                if isinstance(message, Part):
                    reason = f"cannot decode the entry: {exc!r}"
                    return msgspec.structs.replace(message, value=None, error=reason)
                raise FrameError(f"malformed {type(message).__name__}: {exc!r}") from exc
            message = msgspec.structs.replace(message, **finished)
        return message


_DISCARD = bytearray(2**20)


def _discard(lengths: list[int]) -> PayloadDecoder:
    """Destinations that throw away the buffers of a frame whose payload is unusable."""
    payloads = PayloadDecoder(lengths)
    payloads.destinations = [
        memoryview(_DISCARD)[: min(len(_DISCARD), n - offset)]
        for n in lengths
        for offset in range(0, n, len(_DISCARD))
    ]
    return payloads
