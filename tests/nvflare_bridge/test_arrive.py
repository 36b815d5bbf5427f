"""NVFlare's numpy download items: how the executor reads a task's (in place where it can,
checked always) and writes a result's (as ``np.savez`` does, without its copies, the next one
made while the server takes the one before)."""

from __future__ import annotations

import gc
import io
import threading
import weakref
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import numpy as np
import pytest

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

from flare_agent_async.nvflare._arrive import _npz_array
from flare_agent_async.nvflare._relay import Collector, _HeldArrays
from flare_agent_async.nvflare._relay import npz as npz_of


def npz(save: Callable[..., None] = np.savez, **arrays: Any) -> bytes:
    stream = io.BytesIO()
    save(stream, **arrays)
    return stream.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=">i4").reshape(3, 4),
        np.float32(2.5) * np.ones((), dtype=np.float32),
        np.zeros((0, 3)),
        np.arange(600_000, dtype=np.float64),
    ],
    ids=["big-endian-2d", "0-d", "empty", "large"],
)
def test_a_stored_array_is_read_in_place(array: np.ndarray) -> None:
    item = npz(T3=array)
    name, got = _npz_array(item)
    assert name == "T3" and got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert np.shares_memory(got, np.frombuffer(item, np.uint8)) or got.size == 0
    assert not got.flags.writeable


@pytest.mark.parametrize(
    ("item", "want"),
    [
        (npz(T0=np.asfortranarray(np.arange(6.0).reshape(2, 3))), np.arange(6.0).reshape(2, 3)),
        (npz(np.savez_compressed, T0=np.arange(5)), np.arange(5)),
    ],
    ids=["fortran-order", "compressed"],
)
def test_other_arrays_are_loaded_as_numpy_loads_them(item: bytes, want: np.ndarray) -> None:
    name, got = _npz_array(item)
    assert name == "T0"
    np.testing.assert_array_equal(got, want)


def test_a_damaged_item_or_one_that_is_not_one_plain_array_is_refused() -> None:
    item = bytearray(npz(T0=np.arange(1000.0)))
    item[len(item) // 2] ^= 1
    with pytest.raises(ValueError, match="'T0' is damaged"):
        _npz_array(bytes(item))
    with pytest.raises(ValueError, match=r"holds \['T0.npy', 'T1.npy'\]"):
        _npz_array(npz(T0=np.ones(2), T1=np.ones(2)))
    with pytest.raises(ValueError, match="Python objects"):
        _npz_array(npz(T0=np.array([{"a": 1}], dtype=object)))
    with pytest.raises(zipfile.BadZipFile):
        _npz_array(b"not a zip file")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=">i4").reshape(3, 4),
        np.ones((), dtype=np.float32),
        np.zeros((0, 3)),
        np.array([1 + 2j, 3j]),
        np.arange(600_000, dtype=np.float64),
    ],
    ids=["big-endian-2d", "0-d", "empty", "complex", "large"],
)
def test_a_results_array_is_written_as_np_savez_writes_it(array: np.ndarray) -> None:
    assert npz_of("T0", array) == npz(T0=array)


def test_an_array_that_is_not_c_contiguous_is_written_in_c_order() -> None:
    array = np.arange(12.0).reshape(3, 4)
    for view in (array.T, array[:, ::2]):
        with np.load(io.BytesIO(npz_of("T1", view)), allow_pickle=False) as loaded:
            np.testing.assert_array_equal(loaded["T1"], view)


def test_the_collector_runs_by_the_bytes_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *generation: runs.append(len(runs)) or 0)
    collector = Collector(every_bytes=100)
    for nbytes in (60, 30, 9):
        collector.moved(nbytes)
    assert runs == []
    collector.moved(1)  # 100 moved
    collector.moved(150)  # one run however far past
    assert runs == [0, 1]


def test_garbage_cycles_holding_a_payload_are_freed_by_the_collector() -> None:
    class Cycle:
        def __init__(self, payload: bytes) -> None:
            self.payload, self.me = payload, self

    gc.disable()  # no collection but the collector's
    try:
        freed = weakref.ref(Cycle(b"x" * 1000))
        assert freed() is not None  # in a cycle: only a collection frees it
        Collector(every_bytes=1000).moved(1000)
        assert freed() is None
    finally:
        gc.enable()


# -- a result's items, made one ahead of the server ---------------------------------------------

ARRAYS = {"w": np.arange(6, dtype=np.float32), "b": np.ones((2, 2))}


class Held:
    """What the items use of a `HeldResult`: its keys, their sizes, and `fetch`, which records
    each call (`fetching` is set at the first) and, if ``stuck``, never ends (`stopped` is set
    when it is cancelled)."""

    def __init__(self, say_sizes: bool = True, stuck: bool = False) -> None:
        self.held = tuple(ARRAYS)
        self.held_nbytes = {key: array.nbytes for key, array in ARRAYS.items()} if say_sizes else {}
        self.fetched: list[str] = []
        self.fetching, self.stopped = threading.Event(), threading.Event()
        self.stuck = stuck

    async def fetch(self, key: str) -> np.ndarray:
        self.fetched.append(key)
        self.fetching.set()
        try:
            if self.stuck:
                await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.stopped.set()
            raise
        return ARRAYS[key]


@contextmanager
def held_items(backend: str, held: Held) -> Iterator[_HeldArrays]:
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        yield _HeldArrays(held, ["A0", "A1"], portal)  # type: ignore[arg-type]


def loaded(item: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(item), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.mark.parametrize("say_sizes", [True, False], ids=["sizes-said", "sizes-unsaid"])
def test_items_are_sized_as_the_agent_said_so_nvflare_need_not_make_one_to_know(
    anyio_backend: str, say_sizes: bool
) -> None:
    with held_items(anyio_backend, Held(say_sizes)) as items:
        sizes = [items.get_item_size(index) for index in range(2)]
    assert sizes == ([24, 32] if say_sizes else [None, None])


def test_an_item_made_ahead_is_fetched_once_and_served_when_asked(anyio_backend: str) -> None:
    held = Held()
    with held_items(anyio_backend, held) as items:
        items.prefetch_item(1)
        items.prefetch_item(1)  # NVFlare may say so again: still one fetch
        assert held.fetching.wait(10), "the item ahead was not fetched before it was asked"
        first = items.produce_item(0)  # not made ahead: fetched now
        second = items.produce_item(1)
    assert held.fetched == ["b", "w"]
    np.testing.assert_array_equal(loaded(first)["A0"], ARRAYS["w"])
    np.testing.assert_array_equal(loaded(second)["A1"], ARRAYS["b"])


def test_an_item_still_being_made_when_the_download_ends_is_given_up(anyio_backend: str) -> None:
    held = Held(stuck=True)
    with held_items(anyio_backend, held) as items:
        items.prefetch_item(1)
        assert held.fetching.wait(10), "the item ahead was never fetched"
        items.release()
        assert held.stopped.wait(10), "the fetch of an item nobody wants went on"
        items.prefetch_item(0)  # after the end: nothing more is fetched
    assert held.fetched == ["b"]
