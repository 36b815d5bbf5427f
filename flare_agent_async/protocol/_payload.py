"""Payloads: what task data, meta, results and log values may hold, and their wire form.

Supported: None, bool, int (64-bit), float, str, bytes, list, tuple, dict with str keys, and numpy
arrays and scalars of bool and numeric dtypes (any shape and byte order). Anything else is a
`TypeError` naming where it is (``data["layer1"]["w"]``), unless a `PayloadType` was registered for
it; torch tensors are registered on first sight when torch is importable. Nothing is pickled.

On the wire a payload is msgpack with extension types for what msgpack lacks. Arrays and large
bytes do not go into the msgpack header: they travel after it as raw buffers (out of band), so
sending writes the array's own memory and receiving reads straight into a new array's memory.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

__all__ = [
    "INLINE_BYTES_MAX",
    "InvalidPayload",
    "PayloadDecoder",
    "PayloadType",
    "check_payload",
    "encode_payload",
    "join_payload",
    "register_payload_type",
    "split_payload",
]

INLINE_BYTES_MAX = 64 * 1024
"""Bytes objects up to this size travel inside the header; larger ones out of band."""

EXT_ARRAY = 1  # [dtype.str, shape, buffer index, is numpy scalar]
EXT_BYTES = 2  # buffer index
EXT_TUPLE = 3  # msgpack of the items
EXT_CUSTOM = 4  # [registered name, wire form of the value]

_ARRAY_KINDS = frozenset("biufc")  # bool, int, uint, float, complex
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_msgpack = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class PayloadType:
    """How to send values of a type the wire does not know: as something it does.

    ``to_wire(value)`` returns a supported payload (arrays stay zero-copy); ``from_wire`` turns
    it back, once its arrays are filled.
    """

    name: str
    type: type
    to_wire: Callable[[Any], Any]
    from_wire: Callable[[Any], Any]


_types_by_name: dict[str, PayloadType] = {}
_types_by_class: dict[type, PayloadType] = {}


def register_payload_type(payload_type: PayloadType) -> None:
    """Let payloads hold values of ``payload_type.type`` (and its subclasses)."""
    _types_by_name[payload_type.name] = payload_type
    _types_by_class[payload_type.type] = payload_type


def _lookup_type(cls: type) -> PayloadType | None:
    for base in cls.__mro__:
        found = _types_by_class.get(base)
        if found is not None:
            return found
    if cls.__module__.split(".")[0] == "torch" and _register_torch():
        return _lookup_type(cls)
    return None


def _register_torch() -> bool:
    """Register torch tensors (CPU memory is shared with the arrays sent and received)."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return False
    if "torch.Tensor" in _types_by_name:
        return False
    register_payload_type(
        PayloadType(
            "torch.Tensor",
            torch.Tensor,
            to_wire=lambda tensor: tensor.detach().cpu().numpy(),
            from_wire=torch.from_numpy,
        )
    )
    return True


class InvalidPayload:
    """Stands in for a received payload that could not be decoded; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"InvalidPayload({self.reason!r})"


# -- sending ------------------------------------------------------------------------------------


def _unsupported(value: Any, path: str) -> TypeError:
    return TypeError(
        f"{path} is of type {type(value).__qualname__}, which cannot be sent: payloads hold None, "
        "bool, int, float, str, bytes, list, tuple, dict with str keys and numpy arrays "
        "(register other types with register_payload_type)"
    )


def _array_to_wire(
    value: np.ndarray[Any, Any] | np.generic, path: str, buffers: list[memoryview]
) -> msgspec.msgpack.Ext:
    array = np.asarray(value)
    if array.dtype.kind not in _ARRAY_KINDS:
        raise TypeError(
            f"{path} is an array of dtype {array.dtype}, which cannot be sent: "
            "bool and numeric dtypes only"
        )
    if not array.flags.c_contiguous:
        # The one copy on the send side: a non-contiguous array is made contiguous.
        array = np.ascontiguousarray(array)
    buffers.append(array.reshape(-1).view(np.uint8).data)
    header = [array.dtype.str, list(array.shape), len(buffers) - 1, isinstance(value, np.generic)]
    return msgspec.msgpack.Ext(EXT_ARRAY, _msgpack.encode(header))


def _to_wire(value: Any, path: str, buffers: list[memoryview]) -> Any:
    kind = type(value)
    if value is None or kind is str or kind is float or kind is bool:
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise TypeError(f"{path} is an int beyond 64 bits, which cannot be sent")
        return value
    if isinstance(value, dict):
        wire = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"{path} has a key {key!r} of type {type(key).__name__}: keys must be str"
                )
            wire[key] = _to_wire(item, f"{path}[{key!r}]", buffers)
        return wire
    if isinstance(value, list):
        return [_to_wire(item, f"{path}[{index}]", buffers) for index, item in enumerate(value)]
    if isinstance(value, tuple):
        items = [_to_wire(item, f"{path}[{index}]", buffers) for index, item in enumerate(value)]
        return msgspec.msgpack.Ext(EXT_TUPLE, _msgpack.encode(items))
    if isinstance(value, (np.ndarray, np.generic)):
        return _array_to_wire(value, path, buffers)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if isinstance(value, memoryview):
            value = value.cast("B") if value.contiguous else value.tobytes()
        if len(value) <= INLINE_BYTES_MAX:
            return bytes(value)
        buffers.append(memoryview(value))
        return msgspec.msgpack.Ext(EXT_BYTES, _msgpack.encode(len(buffers) - 1))
    # Subclasses of the plain types (enums, ...) travel as their plain value.
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return _to_wire(int(value), path, buffers)
    if isinstance(value, float):
        return float(value)
    custom = _lookup_type(kind)
    if custom is not None:
        inner = _to_wire(custom.to_wire(value), path, buffers)
        return msgspec.msgpack.Ext(EXT_CUSTOM, _msgpack.encode([custom.name, inner]))
    raise _unsupported(value, path)


def encode_payload(value: Any, path: str, buffers: list[memoryview]) -> Any:
    """The wire form of ``value`` for msgspec; appends its out-of-band buffers to ``buffers``.

    :raises TypeError: something in ``value`` cannot be sent; the message names where.
    """
    return _to_wire(value, path, buffers)


def check_payload(value: Any, path: str) -> int:
    """Check that ``value`` can be sent; returns the bytes it moves out of band.

    :raises TypeError: something in ``value`` cannot be sent; the message names where.
    """
    buffers: list[memoryview] = []
    _to_wire(value, path, buffers)
    return sum(buffer.nbytes for buffer in buffers)


# -- receiving ----------------------------------------------------------------------------------


class _Pending:
    """A value that can only be made once its buffers are filled."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


class PayloadDecoder:
    """Decodes the payloads of one frame, allocating a destination for each of its buffers.

    ``ext_hook`` is msgspec's hook; afterwards `destinations` holds one writable buffer per frame
    buffer, in order, to be filled with the frame's bytes, and `finish` resolves what needed them.
    Every problem raises `ValueError` with a reason.
    """

    def __init__(self, buffer_lengths: list[int]) -> None:
        self._lengths = buffer_lengths
        self.destinations: list[memoryview | None] = [None] * len(buffer_lengths)
        self.pending = False

    def _claim(self, index: object, nbytes: int) -> int:
        if type(index) is not int or not 0 <= index < len(self._lengths):
            raise ValueError(f"buffer index {index!r} out of range")
        if self.destinations[index] is not None:
            raise ValueError(f"buffer {index} used twice")
        if self._lengths[index] != nbytes:
            raise ValueError(f"buffer {index} has {self._lengths[index]} bytes, expected {nbytes}")
        return index

    def ext_hook(self, code: int, data: memoryview) -> Any:
        if code == EXT_ARRAY:
            dtype_str, shape, index, scalar = msgspec.msgpack.decode(data)
            dtype = np.dtype(dtype_str)
            if dtype.kind not in _ARRAY_KINDS or not isinstance(dtype_str, str):
                raise ValueError(f"dtype {dtype_str!r} is not bool or numeric")
            if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
                raise ValueError(f"bad array shape {shape!r}")
            index = self._claim(index, math.prod(shape) * dtype.itemsize)
            array = np.empty(shape, dtype)
            self.destinations[index] = array.reshape(-1).view(np.uint8).data
            if scalar:
                self.pending = True
                return _Pending(lambda: array[()])
            return array
        if code == EXT_BYTES:
            index = msgspec.msgpack.decode(data)
            if type(index) is not int or not 0 <= index < len(self._lengths):
                raise ValueError(f"buffer index {index!r} out of range")
            buffer = bytearray(self._lengths[index])
            self._claim(index, len(buffer))
            self.destinations[index] = memoryview(buffer)
            self.pending = True
            # The one copy on the receive side: bytes are immutable, so they are made once filled.
            return _Pending(lambda: bytes(buffer))
        if code == EXT_TUPLE:
            # Anything waiting for its buffer inside is made when `finish` walks the tuple.
            return tuple(msgspec.msgpack.decode(data, ext_hook=self.ext_hook))
        if code == EXT_CUSTOM:
            name, inner = msgspec.msgpack.decode(data, ext_hook=self.ext_hook)
            custom = _types_by_name.get(name)
            if custom is None and name == "torch.Tensor" and _register_torch():
                custom = _types_by_name.get(name)
            if custom is None:
                raise ValueError(f"payload type {name!r} is not registered here")
            self.pending = True
            return _Pending(lambda: custom.from_wire(_resolve(inner)))
        raise ValueError(f"unknown payload extension {code}")

    def check_complete(self) -> None:
        """Every buffer of the frame must belong to a payload value."""
        for index, destination in enumerate(self.destinations):
            if destination is None:
                raise ValueError(f"buffer {index} belongs to no payload value")

    def finish(self, value: Any) -> Any:
        """``value`` with everything that waited for its buffers made."""
        return _resolve(value) if self.pending else value


def _resolve(value: Any) -> Any:
    if isinstance(value, _Pending):
        return value.make()
    if isinstance(value, tuple):
        return tuple(_resolve(item) for item in value)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (_Pending, dict, list, tuple)):
                value[key] = _resolve(item)
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (_Pending, dict, list, tuple)):
                value[index] = _resolve(item)
        return value
    return value


# -- outside a connection -------------------------------------------------------------------------


def split_payload(value: Any, path: str) -> tuple[bytes, list[memoryview]]:
    """``value`` as a header (msgpack, with the buffers' lengths) and its out-of-band buffers
    (not copied), for a channel other than a connection: a process group's broadcast, say.

    :raises TypeError: something in ``value`` cannot be sent; the message names where.
    """
    buffers: list[memoryview] = []
    wire = _to_wire(value, path, buffers)
    return _msgpack.encode([[buffer.nbytes for buffer in buffers], _msgpack.encode(wire)]), buffers


def join_payload(header: bytes) -> tuple[list[memoryview], Callable[[], Any]]:
    """The reverse of `split_payload`: writable destinations, one per buffer, to fill with the
    buffers' bytes, and the function that makes the value once they are filled.

    :raises ValueError: the header is not one `split_payload` made.
    """
    try:
        lengths, inner = msgspec.msgpack.decode(header)
        decoder = PayloadDecoder(lengths)
        value = msgspec.msgpack.decode(inner, ext_hook=decoder.ext_hook)
        decoder.check_complete()
    except (msgspec.DecodeError, TypeError) as exc:
        raise ValueError(f"not a payload header: {exc}") from exc
    destinations = [destination for destination in decoder.destinations if destination is not None]
    return destinations, lambda: decoder.finish(value)
