"""Frames and payloads, sans I/O: `encode_frame` on one side, a `FrameReader` fed by hand on the
other, the way a transport feeds it (``buffer_for_read`` / ``bytes_read`` / ``next_message``)."""

from __future__ import annotations

import enum
import itertools
import math
import struct
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flare_agent_async.exceptions import RemoteProtocolError
from flare_agent_async.protocol import (
    Abort,
    Bye,
    FrameError,
    FrameReader,
    Heartbeat,
    Hello,
    InvalidPayload,
    Limits,
    Log,
    Message,
    Part,
    PayloadType,
    Result,
    ResultAck,
    TaskAck,
    TaskAssign,
    Welcome,
    _payload,
    check_payload,
    encode_frame,
    register_payload_type,
)
from flare_agent_async.protocol._payload import (
    EXT_ARRAY,
    EXT_BYTES,
    EXT_CUSTOM,
    EXT_TUPLE,
    INLINE_BYTES_MAX,
)

PREFIX = struct.Struct("<2sBBII")
KiB, MiB = 2**10, 2**20
Chunk = int | None | Sequence[int | None]
CHUNKS: list[Chunk] = [1, 7, 4096, 65536, None, (1, 7, 65536), (4096, 1, 100_003)]

# -- helpers --------------------------------------------------------------------------------------


def blob_of(*messages: Message) -> bytes:
    return b"".join(bytes(part) for message in messages for part in encode_frame(message))


def feed(
    reader: FrameReader, blob: bytes, chunk: Chunk = None, out: list[Message] | None = None
) -> list[Message]:
    """Feed ``blob`` like a transport, ``chunk`` bytes per read (None: as many as fit; a sequence:
    cycled), collecting every complete message into ``out``. Fails if the reader stops taking
    bytes; every read moves at least one byte, so the loop is bounded."""
    out = [] if out is None else out
    sizes = itertools.cycle(chunk if isinstance(chunk, Sequence) else [chunk])
    done = 0
    for _ in range(len(blob) + 1):
        while (message := reader.next_message()) is not None:
            out.append(message)
        if done == len(blob):
            return out
        view = reader.buffer_for_read()
        assert len(view) > 0, "buffer_for_read returned an empty buffer: the reader would hang"
        count = min(len(view), next(sizes) or len(view), len(blob) - done)
        view[:count] = blob[done : done + count]
        del view
        reader.bytes_read(count)
        done += count
    pytest.fail("the reader did not consume the blob")


def roundtrip(*messages: Message, chunk: Chunk = None, limits: Limits | None = None) -> list[Any]:
    reader = FrameReader(limits)
    received = feed(reader, blob_of(*messages), chunk)
    assert not reader.mid_frame
    return received


def frame(
    message: Any,
    lengths: Sequence[int] = (),
    buffers: bytes = b"",
    *,
    magic: bytes = b"FA",
    version: int = 1,
    buffer_count: int | None = None,
) -> bytes:
    """A frame built by hand, the way `encode_frame` builds it: prefix + msgpack [lengths, msg]."""
    header = msgspec.msgpack.encode((list(lengths), message))
    count = len(lengths) if buffer_count is None else buffer_count
    return PREFIX.pack(magic, version, 0, len(header), count) + header + buffers


def ext(code: int, value: Any) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(code, msgspec.msgpack.encode(value))


def task_dict(data: Any, task_id: str = "t-bad", meta: Any = None) -> dict[str, Any]:
    return {
        "kind": "task",
        "task_id": task_id,
        "task_name": "train",
        "meta": {} if meta is None else meta,
        "data": data,
    }


def result_dict(data: Any) -> dict[str, Any]:
    return {"kind": "result", "task_id": "t-bad", "return_code": "OK", "meta": {}, "data": data}


def assert_same(got: Any, want: Any, path: str = "payload") -> None:
    """Exactly the same payload: same types all the way down, arrays byte for byte."""
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, np.ndarray):
        assert got.dtype.str == want.dtype.str, f"{path}: dtype {got.dtype.str} != {want.dtype.str}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        assert got.flags.c_contiguous, f"{path}: not C-contiguous"
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), f"{path}: values differ"
    elif isinstance(want, np.generic):
        assert got.dtype.str == want.dtype.str, f"{path}: dtype {got.dtype.str} != {want.dtype.str}"
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), f"{path}: {got} != {want}"
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), f"{path}: {got} is not nan"
        else:
            assert got == want and math.copysign(1, got) == math.copysign(1, want), path
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{index}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def assert_same_message(got: Message, want: Message) -> None:
    assert type(got) is type(want)
    for field in want.__struct_fields__:
        assert_same(getattr(got, field), getattr(want, field), field)


def walk(value: Any) -> Any:
    """Every leaf of a payload."""
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from walk(item)
    else:
        yield value


def task(data: Any = None, meta: dict[str, Any] | None = None, task_id: str = "t-1") -> TaskAssign:
    return TaskAssign(task_id=task_id, task_name="train", meta=meta or {}, data=data)


def result(data: Any = None, meta: dict[str, Any] | None = None, task_id: str = "t-1") -> Result:
    return Result(task_id=task_id, return_code="OK", meta=meta or {}, data=data)


def random_bytes(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


# -- strategies -----------------------------------------------------------------------------------

BASE_DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


@st.composite
def small_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    base = np.dtype(draw(st.sampled_from(BASE_DTYPES)))
    dtype = base.newbyteorder(draw(st.sampled_from("<>")))  # 1-byte dtypes stay "|"
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    return draw(hnp.arrays(base, shape)).astype(dtype)


@st.composite
def large_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    """Above the staging size, so they are read straight into the array's memory; every bit
    pattern (nan payloads included) must arrive as sent."""
    base = np.dtype(draw(st.sampled_from(BASE_DTYPES[1:])))
    dtype = base.newbyteorder(draw(st.sampled_from("<>")))
    count = draw(st.integers(64 * KiB // base.itemsize - 2, 160 * KiB // base.itemsize))
    data = random_bytes(draw(st.integers(0, 2**32)), count * base.itemsize)
    array = np.frombuffer(data, dtype).copy()
    return array.reshape(2, -1) if count % 2 == 0 else array


@st.composite
def numpy_scalars(draw: st.DrawFn) -> np.generic:
    return draw(hnp.arrays(np.dtype(draw(st.sampled_from(BASE_DTYPES))), ()))[()]


large_bytes = st.builds(
    random_bytes, st.integers(0, 2**32), st.integers(INLINE_BYTES_MAX - 2, INLINE_BYTES_MAX + 5000)
)

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=40),
    large_bytes,
    small_arrays(),
    large_arrays(),
    numpy_scalars(),
)

payloads = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=10,
)

metas = st.dictionaries(st.text(max_size=8), payloads, max_size=3)

payload_messages = st.one_of(
    st.builds(task, payloads, metas, st.text(max_size=10)),
    st.builds(result, payloads, metas, st.text(max_size=10)),
    st.builds(
        Log,
        key=st.text(max_size=10),
        value=payloads,
        step=st.none() | st.integers(0, 10**6),
        task_id=st.none() | st.text(max_size=10),
    ),
)

chunk_sizes = st.sampled_from(CHUNKS) | st.lists(st.integers(1, 70_000), min_size=1, max_size=5)

# -- 1. round trips -------------------------------------------------------------------------------

SLOW_OR_FILTERED = [HealthCheck.too_slow, HealthCheck.filter_too_much]


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OR_FILTERED)
@given(message=payload_messages, chunk=chunk_sizes)
def test_payloads_round_trip_exactly(message: Message, chunk: Chunk) -> None:
    (received,) = roundtrip(message, chunk=chunk)
    assert_same_message(received, message)


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW_OR_FILTERED)
@given(messages=st.lists(payload_messages, min_size=2, max_size=4), chunk=chunk_sizes)
def test_several_payload_messages_in_one_blob(messages: list[Message], chunk: Chunk) -> None:
    received = roundtrip(*messages, chunk=chunk)
    assert len(received) == len(messages)
    for got, want in zip(received, messages, strict=True):
        assert_same_message(got, want)


@pytest.mark.parametrize(
    "value",
    [
        0,
        -(2**63),
        2**64 - 1,
        2**63,
        True,
        False,
        None,
        0.0,
        -0.0,
        math.inf,
        -math.inf,
        math.nan,
        5e-324,
        "",
        "héllo ✓",
        b"",
        b"x" * INLINE_BYTES_MAX,
        b"y" * (INLINE_BYTES_MAX + 1),
        (),
        (1, (2, (3,))),
        [(), [], {}],
        {"": {"nested": [1, (2.5, "s", None)]}},
        np.float32(1.5),
        np.float16(-0.0),
        np.int8(-128),
        np.uint64(2**64 - 1),
        np.int64(-(2**63)),
        np.bool_(True),
        np.complex128(1 - 2j),
        np.complex64(np.nan),
        np.float64(np.inf),
        np.zeros((0,)),
        np.zeros((3, 0, 2), ">i4"),
        np.array(7, ">u2"),
        np.array(np.nan, "<f8"),
        np.arange(24, dtype=">f8").reshape(2, 3, 4),
        np.ones((2, 2), bool),
        [np.float32(1.5), np.float32(2.5)],
        {"w": np.arange(40_000, dtype="<f4"), "b": np.zeros(10, ">c16")},
    ],
    ids=lambda value: repr(value)[:40],
)
@pytest.mark.parametrize("chunk", [7, 4096, None])
def test_edge_values_round_trip(value: Any, chunk: Chunk) -> None:
    for message in [
        task(value, {"m": value}),
        result(value, {"m": value}),
        Log(key="k", value=value, step=3, task_id="t"),
    ]:
        (received,) = roundtrip(message, chunk=chunk)
        assert_same_message(received, message)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (bytearray(b"abc"), b"abc"),
        (bytearray(INLINE_BYTES_MAX + 3), bytes(INLINE_BYTES_MAX + 3)),
        (memoryview(b"abcdef")[::2], b"ace"),
        (memoryview(bytes(range(256)) * 300), bytes(range(256)) * 300),
        (memoryview(np.arange(4, dtype="<u2")), b"\x00\x00\x01\x00\x02\x00\x03\x00"),
    ],
    ids=["bytearray", "large-bytearray", "strided-memoryview", "large-memoryview", "u2-memoryview"],
)
def test_bytes_like_arrive_as_bytes(value: Any, expected: bytes) -> None:
    (received,) = roundtrip(task({"b": value}))
    assert_same(received.data, {"b": expected})


class Colour(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 3


class Text(str):
    pass


def test_subclasses_of_plain_types_travel_as_plain_values() -> None:
    (received,) = roundtrip(task({"s": Text("x"), "i": Size.BIG, "c": Colour.RED.value}))
    assert_same(received.data, {"s": "x", "i": 3, "c": "red"})


def test_moderately_nested_payloads_round_trip() -> None:
    data: Any = [np.float32(1.0), b"x" * (INLINE_BYTES_MAX + 1)]
    for depth in range(100):
        data = {f"k{depth}": [data]} if depth % 2 else [data, None]
    (received,) = roundtrip(task(data))
    assert_same(received.data, data)


def test_encode_frame_sends_contiguous_arrays_without_copying() -> None:
    array = np.arange(100_000, dtype=">f8")
    big = b"z" * (INLINE_BYTES_MAX + 1)
    head, first, second = encode_frame(task({"a": array, "b": big}))
    assert bytes(head[:4]) == b"FA\x01\x00"
    assert np.shares_memory(np.frombuffer(first, np.uint8), array)
    assert second.obj is big
    assert first.nbytes == array.nbytes and second.nbytes == len(big)
    magic, version, _, header_bytes, count = PREFIX.unpack_from(head)
    assert (magic, version, count) == (b"FA", 1, 2)
    assert header_bytes == head.nbytes - PREFIX.size


def test_hand_built_frames_match_encode_frame() -> None:
    """The `frame` helper below builds what `encode_frame` does (so the hand-made bad frames
    differ from good ones only where intended)."""
    array = np.arange(6, dtype="<i2").reshape(2, 3)
    data = (array, np.float32(2.0), b"q" * (INLINE_BYTES_MAX + 1))
    built = frame(
        task_dict(
            ext(
                EXT_TUPLE,
                [
                    ext(EXT_ARRAY, ["<i2", [2, 3], 0, False]),
                    ext(EXT_ARRAY, ["<f4", [], 1, True]),
                    ext(EXT_BYTES, 2),
                ],
            ),
            task_id="t-1",
        ),
        [12, 4, INLINE_BYTES_MAX + 1],
        array.tobytes() + np.float32(2.0).tobytes() + data[2],
    )
    assert built == blob_of(task(data))
    (received,) = feed(FrameReader(), built)
    assert_same(received.data, data)


# -- 2. non-contiguous arrays ---------------------------------------------------------------------

BASE = np.arange(6 * 8 * 10, dtype="<f8").reshape(6, 8, 10)
LARGE = np.arange(300 * 200, dtype=">i4").reshape(300, 200)


@pytest.mark.parametrize(
    "array",
    [
        BASE[::2],
        BASE[:, ::3, 1::2],
        BASE[..., ::-1],
        BASE.T,
        BASE.transpose(1, 0, 2),
        np.asfortranarray(BASE),
        np.asfortranarray(BASE.astype(">c8")),
        BASE[:, 3],
        BASE[2:3, 0:0],
        BASE.astype(">u2")[::-2, ::2, ::5],
        np.broadcast_to(np.arange(5, dtype="<i8"), (4, 5)),
        LARGE.T,
        LARGE[::-1, ::2],
        np.asfortranarray(LARGE),
    ],
    ids=lambda a: f"{a.dtype.str}{a.shape}{a.strides}",
)
@pytest.mark.parametrize("chunk", [7, 65536, None])
def test_non_contiguous_arrays_arrive_equal_and_c_contiguous(
    array: np.ndarray[Any, Any], chunk: Chunk
) -> None:
    assert not array.flags.c_contiguous or array.size == 0
    (received,) = roundtrip(task({"a": array, "t": (array,)}), chunk=chunk)
    for got in (received.data["a"], received.data["t"][0]):
        assert got.flags.c_contiguous
        assert got.dtype.str == array.dtype.str and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert got.flags.writeable


# -- 3. back-to-back frames -----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", CHUNKS)
def test_frames_back_to_back_arrive_in_order(chunk: Chunk) -> None:
    weights = {"w": np.arange(50_000, dtype="<f4").reshape(250, 200), "b": np.ones(3, ">f8")}
    messages: list[Message] = [
        Hello(protocol_version=1, agent_id="a", site_name="s", instance_id="i", nonce=b"n"),
        Welcome(protocol_version=1, site_name="s", heartbeat_interval=2.0, heartbeat_timeout=9.0),
        task(weights, {"round": 1}, task_id="t-1"),
        Heartbeat(),
        TaskAck(task_id="t-1"),
        Log(key="loss", value=np.float32(0.25), step=1, task_id="t-1"),
        Heartbeat(),
        result({"w": weights["w"] * 2, "blob": b"r" * 100_000}, {"n": 10}, task_id="t-1"),
        ResultAck(task_id="t-1", accepted=True),
        task(None, task_id="t-2"),
        Abort(task_id="t-2"),
        Heartbeat(),
        Bye(reason="done"),
    ]
    received = roundtrip(*messages, chunk=chunk)
    assert [type(m) for m in received] == [type(m) for m in messages]
    for got, want in zip(received, messages, strict=True):
        assert_same_message(got, want)


def test_a_reader_takes_any_number_of_frames() -> None:
    reader = FrameReader()
    for round_ in range(3):
        messages = [Heartbeat(), task(np.full(20_000, round_, "<i8"), task_id=str(round_))]
        received = feed(reader, blob_of(*messages), chunk=(5, 70_000))
        assert_same_message(received[1], messages[1])
        assert received[0] == Heartbeat()


# -- 4. what cannot be sent -----------------------------------------------------------------------


def path_in(path: str, text: str) -> bool:
    """Whether the message starts by naming the path (either quote style around dict keys)."""
    single_quoted = path.replace('"', "'")
    return text.startswith((path + " ", single_quoted + " "))


UNSENDABLE = [
    pytest.param(object(), "object", id="object"),
    pytest.param({1, 2}, "set", id="set"),
    pytest.param(frozenset(), "frozenset", id="frozenset"),
    pytest.param(1 + 2j, "complex", id="complex"),
    pytest.param(2**64, "64 bits", id="int-too-big"),
    pytest.param(-(2**63) - 1, "64 bits", id="int-too-small"),
    pytest.param(np.array([object()], dtype=object), "object", id="object-array"),
    pytest.param(np.array(["a", "b"]), "<U1", id="str-array"),
    pytest.param(np.array([b"a"]), "S1", id="bytes-array"),
    pytest.param(np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64", id="dt-array"),
    pytest.param(np.timedelta64(3, "s"), "timedelta64", id="timedelta-scalar"),
    pytest.param(np.zeros(2, dtype=[("a", "<i4")]), "dtype", id="structured-array"),
    pytest.param(np.void(b"ab"), "dtype", id="void-scalar"),
    pytest.param(type, "type", id="class"),
    pytest.param(print, "builtin_function_or_method", id="function"),
    pytest.param(Colour.RED, "Colour", id="enum"),
]


@pytest.mark.parametrize(("bad", "mentions"), UNSENDABLE)
@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda bad: task({"layer1": {"w": bad}}), 'data["layer1"]["w"]'),
        (lambda bad: task([1, [2, bad]]), "data[1][1]"),
        (lambda bad: task((0, {"k": (bad,)})), 'data[1]["k"][0]'),
        (lambda bad: task(None, {"opt": [bad]}), 'meta["opt"][0]'),
        (lambda bad: result({"a": 1, "b": bad}), 'data["b"]'),
        (lambda bad: result(None, {"m": bad}), 'meta["m"]'),
        (lambda bad: Log(key="k", value=[{"x": bad}]), 'value[0]["x"]'),
        (lambda bad: Log(key="k", value=bad), "value"),
    ],
    ids=[
        "task-data",
        "task-list",
        "task-tuple",
        "task-meta",
        "result",
        "result-meta",
        "log",
        "log-value",
    ],
)
def test_unsendable_values_raise_type_error_naming_the_path(
    bad: Any, mentions: str, build: Any, path: str
) -> None:
    message = build(bad)
    with pytest.raises(TypeError) as info:
        encode_frame(message)
    assert path_in(path, str(info.value)), str(info.value)
    assert mentions in str(info.value)
    field = "value" if isinstance(message, Log) else path.split("[")[0]
    with pytest.raises(TypeError) as info:
        check_payload(getattr(message, field), field)
    assert path_in(path, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({1: "a"}, "data"),
        ({"ok": {None: 1}}, 'data["ok"]'),
        ([{b"k": 1}], "data[0]"),
        (({(1, 2): 3},), "data[0]"),
    ],
)
def test_dict_keys_must_be_str(value: Any, path: str) -> None:
    with pytest.raises(TypeError, match="keys must be str") as info:
        encode_frame(task(value))
    assert path_in(path, str(info.value))
    with pytest.raises(TypeError, match="keys must be str"):
        check_payload(value, "data")


@pytest.mark.parametrize(
    ("value", "out_of_band"),
    [
        (None, 0),
        ({"a": 1, "s": "x" * 100_000, "b": b"y" * INLINE_BYTES_MAX}, 0),
        (b"y" * (INLINE_BYTES_MAX + 1), INLINE_BYTES_MAX + 1),
        (np.float32(1.5), 4),
        (np.zeros((0, 4)), 0),
        (np.zeros((3, 5), ">c16")[:, ::2], 3 * 3 * 16),
        (
            {
                "w": np.zeros(10, "<f8"),
                "big": b"x" * (INLINE_BYTES_MAX + 1),
                "small": b"y" * 100,
                "t": (np.zeros(3, np.int8), [np.uint16(7)]),
            },
            80 + INLINE_BYTES_MAX + 1 + 3 + 2,
        ),
    ],
    ids=["none", "inline", "large-bytes", "scalar", "empty", "strided", "mixed"],
)
def test_check_payload_returns_out_of_band_bytes(value: Any, out_of_band: int) -> None:
    assert check_payload(value, "data") == out_of_band
    parts = encode_frame(task(value))
    assert sum(part.nbytes for part in parts[1:]) == out_of_band


# -- 5. limits and foreign bytes ------------------------------------------------------------------


def bytes_until_error(reader: FrameReader, blob: bytes) -> int:
    """Feed one byte at a time; how many were in when `FrameError` was raised."""
    for count in range(1, len(blob) + 1):
        view = reader.buffer_for_read()
        view[:1] = blob[count - 1 : count]
        del view
        reader.bytes_read(1)
        try:
            assert reader.next_message() is None
        except FrameError:
            return count
    pytest.fail("no FrameError")


def test_header_over_the_limit_fails_on_the_prefix() -> None:
    blob = blob_of(task(None, {"note": "x" * 500}))
    header_bytes = PREFIX.unpack_from(blob)[3]
    reader = FrameReader(Limits(max_header_bytes=100))
    with pytest.raises(FrameError, match=rf"header of {header_bytes} bytes .*limit of 100 bytes"):
        feed(reader, blob)
    assert bytes_until_error(FrameReader(Limits(max_header_bytes=100)), blob) == PREFIX.size


def test_header_at_the_limit_is_fine() -> None:
    message = task(None, {"note": "x" * 500})
    header_bytes = PREFIX.unpack_from(blob_of(message))[3]
    (received,) = roundtrip(message, limits=Limits(max_header_bytes=header_bytes))
    assert received == message


def test_a_huge_header_claim_fails_without_allocating() -> None:
    claim = PREFIX.pack(b"FA", 1, 0, 2**32 - 1, 0)
    tracemalloc.start()
    try:
        reader = FrameReader()
        with pytest.raises(FrameError, match=r"4294967295 bytes .*16777216"):
            feed(reader, claim)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB


def test_frame_over_the_limit_fails_on_the_header_without_allocating() -> None:
    """A header that claims 2**40 bytes of buffers: refused once the header is in."""
    data = ext(EXT_TUPLE, [ext(EXT_BYTES, 0), ext(EXT_BYTES, 1)])
    blob = frame(task_dict(data), [2**39, 2**39])  # only the prefix and header, no buffers
    header_end = len(blob)
    total = header_end + 2**40
    tracemalloc.start()
    try:
        reader = FrameReader()
        with pytest.raises(FrameError, match=rf"frame of {total} bytes .*limit of {8 * 2**30}"):
            feed(reader, blob, chunk=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB
    assert bytes_until_error(FrameReader(), blob) == header_end


def test_frame_limit_counts_prefix_header_and_buffers() -> None:
    message = task(np.zeros(1000, "<f8"))
    size = len(blob_of(message))
    (received,) = roundtrip(message, limits=Limits(max_frame_bytes=size))
    assert_same_message(received, message)
    with pytest.raises(FrameError, match=rf"frame of {size} bytes .*limit of {size - 1} bytes"):
        roundtrip(message, limits=Limits(max_frame_bytes=size - 1))
    header_end = len(blob_of(message)) - 8000
    assert bytes_until_error(FrameReader(Limits(max_frame_bytes=size - 1)), blob_of(message)) == (
        header_end
    )


def test_too_many_buffers_fail_on_the_prefix() -> None:
    message = task([np.zeros(2), np.zeros(3), np.zeros(4)])
    limits = Limits(max_buffers=2)
    with pytest.raises(FrameError, match=r"3 buffers exceeds the limit of 2"):
        roundtrip(message, limits=limits)
    assert bytes_until_error(FrameReader(limits), blob_of(message)) == PREFIX.size
    (received,) = roundtrip(message, limits=Limits(max_buffers=3))
    assert_same_message(received, message)


def test_a_huge_buffer_count_fails_on_the_prefix() -> None:
    claim = PREFIX.pack(b"FA", 1, 0, 10, 2**32 - 1)
    with pytest.raises(FrameError, match=r"4294967295 buffers exceeds the limit of 65536"):
        feed(FrameReader(), claim)


@pytest.mark.parametrize(
    "blob",
    [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS ClientHello
        b"SSH-2.0-OpenSSH_9.6\r\n",
        bytes(12),
    ],
    ids=["http", "tls", "ssh", "zeros"],
)
def test_foreign_bytes_are_not_a_peer(blob: bytes) -> None:
    with pytest.raises(FrameError, match="not a flare_agent_async peer") as info:
        feed(FrameReader(), blob)
    assert repr(blob[:2]) in str(info.value)
    assert isinstance(info.value, RemoteProtocolError)
    assert bytes_until_error(FrameReader(), blob) == PREFIX.size


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_frame_versions_are_refused(version: int) -> None:
    blob = frame({"kind": "heartbeat"}, version=version)
    with pytest.raises(FrameError, match=rf"frame version {version} is not supported"):
        feed(FrameReader(), blob)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (PREFIX.pack(b"FA", 1, 0, 3, 0) + b"\xc1\xc1\xc1", "malformed frame header"),
        (PREFIX.pack(b"FA", 1, 0, 0, 0), "malformed frame header"),
        (frame({"kind": "heartbeat"}, [4], b"abcd", buffer_count=0), "do not match its prefix"),
        (frame({"kind": "heartbeat"}, [-1], buffer_count=1), "do not match its prefix"),
        (frame({"kind": "nope"}), "malformed nope: Invalid value 'nope'"),
        (frame({"kind": "task_ack"}), "malformed"),
        (frame({"kind": "heartbeat"}, [3], b"abc"), "buffer 0 belongs to no payload value"),
        (frame([1, 2]), "malformed"),
    ],
    ids=["garbage", "empty", "count", "negative", "kind", "field", "unused-buffer", "not-a-map"],
)
def test_malformed_frames_raise_frame_error(blob: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        feed(FrameReader(), blob)


# -- 6. undecodable task payloads -----------------------------------------------------------------

F8 = np.arange(3, dtype="<f8").tobytes()

BAD_PAYLOADS = [
    pytest.param(ext(EXT_ARRAY, ["|O", [3], 0, False]), [24], F8, "dtype", id="object-dtype"),
    pytest.param(ext(EXT_ARRAY, ["<U2", [3], 0, False]), [24], F8, "dtype", id="str-dtype"),
    pytest.param(ext(EXT_ARRAY, ["<M8[s]", [3], 0, False]), [24], F8, "dtype", id="datetime"),
    pytest.param(ext(EXT_ARRAY, ["zz", [3], 0, False]), [24], F8, "zz", id="bogus-dtype"),
    pytest.param(ext(EXT_ARRAY, [5, [3], 0, False]), [24], F8, "", id="dtype-not-str"),
    pytest.param(ext(EXT_ARRAY, ["<f8", [4], 0, False]), [24], F8, "expected 32", id="length"),
    pytest.param(ext(EXT_ARRAY, ["<f8", [-3], 0, False]), [24], F8, "shape", id="neg-shape"),
    pytest.param(ext(EXT_ARRAY, ["<f8", 3, 0, False]), [24], F8, "shape", id="int-shape"),
    pytest.param(ext(EXT_ARRAY, ["<f8", [3], 1, False]), [24], F8, "out of range", id="index"),
    pytest.param(ext(EXT_ARRAY, ["<f8", [3], "0", False]), [24], F8, "out of range", id="str-idx"),
    pytest.param(ext(EXT_ARRAY, ["<f8", [3]]), [24], F8, "", id="short-array-ext"),
    pytest.param(msgspec.msgpack.Ext(EXT_ARRAY, b"\xc1"), [24], F8, "", id="garbage-ext"),
    pytest.param(
        [ext(EXT_ARRAY, ["<f8", [3], 0, False]), ext(EXT_ARRAY, ["<f8", [3], 0, False])],
        [24],
        F8,
        "used twice",
        id="twice",
    ),
    pytest.param(ext(EXT_BYTES, 3), [24], F8, "out of range", id="bytes-index"),
    pytest.param(ext(EXT_BYTES, -1), [], b"", "out of range", id="bytes-negative"),
    pytest.param(ext(9, 0), [], b"", "unknown payload extension 9", id="unknown-ext"),
    pytest.param(ext(-5, 0), [], b"", "unknown payload extension -5", id="negative-ext"),
    pytest.param(None, [24], F8, "buffer 0 belongs to no payload value", id="unclaimed"),
    pytest.param(
        ext(EXT_CUSTOM, ["tests.NotRegistered", 1]), [], b"", "not registered", id="custom"
    ),
    pytest.param(ext(EXT_TUPLE, [ext(9, 0)]), [], b"", "unknown payload extension 9", id="tuple"),
    pytest.param(
        {"ok": [1, {"deep": ext(EXT_ARRAY, ["|O", [1], 0, False])}]},
        [8],
        bytes(8),
        "dtype",
        id="nested",
    ),
    pytest.param(
        ext(EXT_ARRAY, ["|O", [3 * MiB + 5], 0, False]),
        [3 * MiB + 5],
        random_bytes(1, 3 * MiB + 5),
        "dtype",
        id="large-buffer-discarded",
    ),
]


@pytest.mark.parametrize(("data", "lengths", "buffers", "reason"), BAD_PAYLOADS)
@pytest.mark.parametrize("chunk", [1, 4096, (7, 65536), None])
def test_undecodable_task_payload_yields_invalid_payload_and_keeps_in_sync(
    data: Any, lengths: list[int], buffers: bytes, reason: str, chunk: Chunk
) -> None:
    if chunk == 1 and len(buffers) > MiB:
        chunk = (1, 65536)  # byte by byte through megabytes would only be slow
    size = 300 if chunk == 1 else 30_000  # large: read straight into the array
    good = task({"w": np.arange(size, dtype=">i4")}, task_id="t-good")
    blob = frame(task_dict(data), lengths, buffers) + blob_of(Heartbeat(), good)
    reader = FrameReader()
    bad, heartbeat, after = feed(reader, blob, chunk)
    assert not reader.mid_frame
    assert type(bad) is TaskAssign
    assert (bad.task_id, bad.task_name) == ("t-bad", "train")
    assert isinstance(bad.data, InvalidPayload)
    assert isinstance(bad.data.reason, str) and bad.data.reason
    assert reason in bad.data.reason
    assert reason in repr(bad.data)
    assert heartbeat == Heartbeat()
    assert_same_message(after, good)


def test_undecodable_task_meta_yields_invalid_payload() -> None:
    bad = frame(task_dict(None, meta={"x": ext(9, 0)}))
    received, after = feed(FrameReader(), bad + blob_of(TaskAck(task_id="x")))
    assert isinstance(received.data, InvalidPayload)
    assert "unknown payload extension 9" in received.data.reason
    assert after == TaskAck(task_id="x")


@pytest.mark.parametrize(("data", "lengths", "buffers", "reason"), BAD_PAYLOADS)
def test_undecodable_payload_in_other_messages_is_a_frame_error(
    data: Any, lengths: list[int], buffers: bytes, reason: str
) -> None:
    with pytest.raises(FrameError, match="malformed result") as info:
        feed(FrameReader(), frame(result_dict(data), lengths, buffers))
    assert reason in str(info.value)
    log = {"kind": "log", "key": "k", "value": data}
    with pytest.raises(FrameError, match="malformed log"):
        feed(FrameReader(), frame(log, lengths, buffers))


def test_task_with_a_broken_envelope_is_a_frame_error() -> None:
    broken = task_dict(ext(9, 0))
    del broken["task_id"]
    with pytest.raises(FrameError, match="malformed task"):
        feed(FrameReader(), frame(broken))
    wrong_type = task_dict(None) | {"task_id": 5}
    with pytest.raises(FrameError, match="malformed task"):
        feed(FrameReader(), frame(wrong_type))


# -- 7. fuzzing -----------------------------------------------------------------------------------

FUZZ_LIMITS = Limits(max_header_bytes=64 * KiB, max_frame_bytes=MiB, max_buffers=16)

FUZZ_BASES = [
    blob_of(Heartbeat(), TaskAck(task_id="t"), Bye(reason="r")),
    blob_of(
        task(
            {"w": np.arange(12, dtype=">f4").reshape(3, 4), "t": (1, b"ab", np.int16(3))},
            {"round": 2, "f": 1.5},
        )
    ),
    blob_of(
        result({"big": b"b" * (INLINE_BYTES_MAX + 10), "a": np.ones(20_000, "<u4")}),
        Log(key="loss", value=[np.float64(0.5), None, "x"], step=1),
        Heartbeat(),
    ),
]


def mutate(blob: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    data = bytearray(blob)
    for op, position, extra in edits:
        at = position % (len(data) + 1)
        if op == "flip" and at < len(data):
            data[at] ^= extra[0] if extra and extra[0] else 0xFF
        elif op == "set" and at < len(data):
            data[at : at + len(extra)] = extra[: len(data) - at]
        elif op == "insert":
            data[at:at] = extra
        elif op == "delete":
            del data[at : at + 1 + len(extra)]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(0, 2**18),
        st.binary(max_size=9),
    ),
    min_size=1,
    max_size=4,
)


def fuzz(blob: bytes, chunk: Chunk) -> None:
    """Feed ``blob``: a FrameError or nothing, and nothing received beyond the limits."""
    received: list[Message] = []
    tracemalloc.start()
    try:
        try:
            feed(FrameReader(FUZZ_LIMITS), blob, chunk, received)
        except FrameError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Each frame is within the limits; a few frames, a staging buffer, and Python's own objects.
    assert peak < (len(received) + 1) * FUZZ_LIMITS.max_frame_bytes + 2 * MiB
    for message in received:
        for field in ("meta", "data", "value"):
            for leaf in walk(getattr(message, field, None)):
                if isinstance(leaf, np.ndarray):
                    assert leaf.nbytes <= FUZZ_LIMITS.max_frame_bytes
                elif isinstance(leaf, bytes):
                    assert len(leaf) <= FUZZ_LIMITS.max_frame_bytes


# Small reads land the frame's boundaries in every state; a read of "as much as fits" in each cycle
# keeps big blobs quick (tracemalloc slows every small read).
fuzz_chunks = st.lists(st.sampled_from([1, 2, 7, 100, 4096, 65536]), max_size=4).map(
    lambda sizes: [*sizes, None]
)


@settings(max_examples=150, deadline=None)
@given(
    head=st.sampled_from([b"", b"FA", b"FA\x01", b"FA\x01\x00"]),
    noise=st.binary(max_size=300),
    chunk=fuzz_chunks,
)
def test_fuzz_random_bytes(head: bytes, noise: bytes, chunk: Chunk) -> None:
    fuzz(head + noise, chunk)


@settings(max_examples=150, deadline=None)
@given(base=st.sampled_from(FUZZ_BASES), edits=edits, chunk=fuzz_chunks)
def test_fuzz_mutated_frames(
    base: bytes, edits: list[tuple[str, int, bytes]], chunk: Chunk
) -> None:
    fuzz(mutate(base, edits), chunk)


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from(FUZZ_BASES[1:]),
    position=st.integers(0, 200),
    value=st.integers(0, 255),
    chunk=fuzz_chunks,
)
def test_fuzz_one_header_byte(base: bytes, position: int, value: int, chunk: Chunk) -> None:
    """Single byte changes in the prefix and header, where they matter most."""
    header_end = PREFIX.size + PREFIX.unpack_from(base)[3]
    blob = bytearray(base)
    blob[position % header_end] = value
    fuzz(bytes(blob), chunk)


small_ints = st.integers(-2, 40) | st.integers(-(2**63), 2**64 - 1)
plausible_array_exts = st.builds(
    lambda *fields: ext(EXT_ARRAY, list(fields)),
    st.sampled_from(["<f8", ">i4", "|u1", "|b1", "<c16", "|O", "<U3", "V8", "<M8[s]", "f", ""])
    | small_ints,
    st.lists(small_ints, max_size=5) | small_ints,
    small_ints,
    st.booleans() | st.none(),
)
plausible_exts = st.one_of(
    plausible_array_exts,
    st.builds(ext, st.just(EXT_BYTES), small_ints),
    st.builds(
        ext,
        st.just(EXT_CUSTOM),
        st.tuples(st.sampled_from(["tests.NotRegistered", ""]), small_ints),
    ),
)


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 64) | st.integers(0, 2**64 - 1), max_size=4),
    body=st.recursive(
        st.none() | small_ints | st.text(max_size=3) | st.binary(max_size=8) | plausible_exts,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=2), children, max_size=3)
            | st.builds(
                ext,
                st.sampled_from([EXT_ARRAY, EXT_BYTES, EXT_TUPLE, EXT_CUSTOM, 0, 7]),
                st.lists(children, max_size=4),
            )
        ),
        max_leaves=8,
    ),
    extra=st.binary(max_size=64),
    chunk=fuzz_chunks,
)
def test_fuzz_well_formed_headers_with_random_payload_extensions(
    lengths: list[int], body: Any, extra: bytes, chunk: Chunk
) -> None:
    for message in (task_dict(body), result_dict(body), {"kind": "log", "key": "k", "value": body}):
        fuzz(frame(message, lengths, extra), chunk)


# -- 8. registered payload types ------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    x: float
    y: float


class Point3(Point):
    pass


@dataclass
class Vector:
    values: np.ndarray[Any, Any]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(_payload, "_types_by_name", dict(_payload._types_by_name))
    monkeypatch.setattr(_payload, "_types_by_class", dict(_payload._types_by_class))
    register_payload_type(
        PayloadType(
            "tests.Point", Point, to_wire=lambda p: (p.x, p.y), from_wire=lambda t: Point(*t)
        )
    )
    register_payload_type(
        PayloadType("tests.Vector", Vector, to_wire=lambda v: v.values, from_wire=Vector)
    )


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("chunk", [1, 65536, None])
def test_registered_types_round_trip(chunk: Chunk) -> None:
    big = np.arange(40_000, dtype=">f8")
    data = {
        "p": Point(1.5, -2.0),
        "ps": [Point(0.0, 1.0), (Point(3.0, 4.0),)],
        "v": Vector(np.arange(6, dtype="<i2").reshape(2, 3)),
        "big": Vector(big),
    }
    (received,) = roundtrip(task(data, {"origin": Point(0.0, 0.0)}), chunk=chunk)
    assert received.meta == {"origin": Point(0.0, 0.0)}
    got = received.data
    assert got["p"] == Point(1.5, -2.0) and type(got["p"]) is Point
    assert got["ps"] == [Point(0.0, 1.0), (Point(3.0, 4.0),)]
    assert type(got["v"]) is Vector
    assert_same(got["v"].values, data["v"].values)
    assert_same(got["big"].values, big)
    assert check_payload(data, "data") == 12 + big.nbytes


@pytest.mark.usefixtures("registry")
def test_registered_types_cover_subclasses() -> None:
    (received,) = roundtrip(Log(key="k", value=Point3(1.0, 2.0)))
    assert received.value == Point(1.0, 2.0)


@pytest.mark.usefixtures("registry")
def test_a_registered_type_sent_as_something_unsendable_names_the_path() -> None:
    with pytest.raises(TypeError) as info:
        encode_frame(task({"p": Point(object(), 1.0)}))  # type: ignore[arg-type]
    assert path_in('data["p"][0]', str(info.value))


def test_unregistered_custom_name_is_invalid_for_a_task_and_an_error_otherwise() -> None:
    data = ext(EXT_CUSTOM, ["tests.Point", ext(EXT_TUPLE, [1.0, 2.0])])
    bad, after = feed(FrameReader(), frame(task_dict(data)) + blob_of(Heartbeat()))
    assert isinstance(bad.data, InvalidPayload)
    assert "'tests.Point' is not registered" in bad.data.reason
    assert after == Heartbeat()
    with pytest.raises(FrameError, match="not registered"):
        feed(FrameReader(), frame(result_dict(data)))


def test_unregistered_classes_cannot_be_sent() -> None:
    with pytest.raises(TypeError, match="register_payload_type") as info:
        encode_frame(task({"p": Point(1.0, 2.0)}))
    assert path_in('data["p"]', str(info.value))
    assert "Point" in str(info.value)


@pytest.mark.torch
def test_torch_tensors_round_trip() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    (received,) = roundtrip(task({"t": tensor, "s": tensor[:, 1]}))
    assert isinstance(received.data["t"], torch.Tensor)
    assert torch.equal(received.data["t"], tensor)
    assert torch.equal(received.data["s"], tensor[:, 1])
    assert received.data["t"].dtype == torch.float32


# -- 9. mid_frame ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [Heartbeat(), task({"x": np.arange(5)}, {"m": 1}), task(np.arange(100_000, dtype="<i2"))],
    ids=["heartbeat", "small-task", "large-task"],
)
def test_mid_frame_is_true_inside_a_frame_and_false_between(message: Message) -> None:
    blob = blob_of(message)
    cuts = sorted(
        {1, 2, PREFIX.size - 1, PREFIX.size, PREFIX.size + 1, len(blob) - 1}
        | set(range(0, len(blob), max(1, len(blob) // 50)))
    )
    for cut in cuts:
        reader = FrameReader()
        assert not reader.mid_frame
        assert feed(reader, blob[:cut], chunk=(3, 65536)) == []
        assert reader.mid_frame is (cut > 0), cut
        (received,) = feed(reader, blob[cut:], chunk=(3, 65536))
        assert_same_message(received, message)
        assert not reader.mid_frame


def test_mid_frame_between_back_to_back_frames() -> None:
    first, second = blob_of(TaskAck(task_id="a")), blob_of(task(np.arange(70_000, dtype="u1")))
    reader = FrameReader()
    assert feed(reader, first) == [TaskAck(task_id="a")]
    assert not reader.mid_frame
    assert feed(reader, second[:5]) == []
    assert reader.mid_frame
    (received,) = feed(reader, second[5:], chunk=7)
    assert not reader.mid_frame
    assert_same(received.data, np.arange(70_000, dtype="u1"))


def test_frame_progress_is_reported() -> None:
    message = task(np.arange(100_000, dtype="<f8"))
    blob = blob_of(message)
    reader = FrameReader()
    assert (reader.frame_bytes, reader.frame_bytes_read) == (0, 0)
    feed(reader, blob[: len(blob) // 2], chunk=(1000, 65536))
    assert reader.frame_bytes == len(blob)
    assert 0 < reader.frame_bytes_read <= len(blob) // 2
    assert reader.frame_message == ("TaskAssign", "t-1")
    (received,) = feed(reader, blob[len(blob) // 2 :], chunk=(1000, 65536))
    assert (reader.frame_bytes, reader.frame_bytes_read) == (0, 0)
    assert_same_message(received, message)


# -- bugs once found here, kept fixed ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        ({"a": np.float32(1.0)},),
        ([b"x" * (INLINE_BYTES_MAX + 1)],),
        {"t": (1, [np.int8(3)])},
    ],
    ids=["scalar-in-dict-in-tuple", "bytes-in-list-in-tuple", "nested"],
)
def test_buffered_values_in_a_container_in_a_tuple_are_resolved(data: Any) -> None:
    (received,) = roundtrip(task(data))
    assert_same(received.data, data)


@pytest.mark.usefixtures("registry")
def test_a_failing_from_wire_makes_the_task_payload_invalid() -> None:
    data = ext(EXT_CUSTOM, ["tests.Point", "abc"])  # Point(*"abc"): TypeError
    bad, after = feed(FrameReader(), frame(task_dict(data)) + blob_of(Heartbeat()))
    assert isinstance(bad.data, InvalidPayload)
    assert after == Heartbeat()


@pytest.mark.parametrize(("data", "lengths", "buffers", "reason"), BAD_PAYLOADS)
def test_an_undecodable_entry_is_a_part_that_says_why_and_keeps_in_sync(
    data: Any, lengths: list[int], buffers: bytes, reason: str
) -> None:
    part = {"kind": "part", "task_id": "t1", "key": "w", "value": data}
    bad, after = feed(FrameReader(), frame(part, lengths, buffers) + blob_of(Heartbeat()))
    assert type(bad) is Part and (bad.task_id, bad.key, bad.value) == ("t1", "w", None)
    assert bad.error.startswith("cannot decode the entry: ") and reason in bad.error
    assert after == Heartbeat()


@pytest.mark.usefixtures("registry")
def test_a_failing_from_wire_in_an_entry_is_a_part_that_says_why() -> None:
    part = {
        "kind": "part",
        "task_id": "t1",
        "key": "w",
        "value": ext(EXT_CUSTOM, ["tests.Point", "abc"]),
    }
    (bad,) = feed(FrameReader(), frame(part))
    assert type(bad) is Part and bad.value is None and "cannot decode the entry" in bad.error


@pytest.mark.usefixtures("registry")
def test_a_failing_from_wire_in_a_result_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        feed(FrameReader(), frame(result_dict(ext(EXT_CUSTOM, ["tests.Point", "abc"]))))


def test_a_deeply_nested_header_is_a_frame_error() -> None:
    header = b"\x92\x90" + b"\x91" * 1500 + b"\xc0"  # msgpack [[], [[[...[nil]...]]]]
    blob = PREFIX.pack(b"FA", 1, 0, len(header), 0) + header
    with pytest.raises(FrameError):
        feed(FrameReader(), blob)
