"""A task's arrays come from the NVFlare server one at a time, and go on to the trainer as they do.

NVFlare downloads a task's arrays into the client job before an executor sees the task, unless
the job's cell passes the task through (``decode_pass_through_topics``, as NVFlare's own Client
API does for its external trainers): then the task's arrays are references (`LazyDownloadRef`) to
a download transaction on the server. The executor downloads them itself, one array at a time,
and hands each to the site as it comes (`flare_agent_async.Coming`), so the agent receives the
first arrays while the client job still downloads the rest: the two hops overlap, and the
client job never holds the downloaded bytes of more than one item.

Only what the executor can hand on this way is passed through: a job whose every executor is an
`AgentExecutor`. NVFlare itself brings the arrays into the client job for a task data filter
(`apply_filters` materialises references), and the executor does the same for references it
cannot hand on one by one (nested ones, or of other kinds than numpy arrays).
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import FLContextKey, ServerCommandNames
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.utils.task_utils import contains_lazy_download_ref
from nvflare.fuel.f3.cellnet.defs import CellChannel
from nvflare.fuel.f3.streaming.cacheable import ItemConsumer
from nvflare.fuel.f3.streaming.download_service import download_object
from nvflare.fuel.utils.fobs import dots
from nvflare.fuel.utils.fobs.decomposers.via_downloader import LazyDownloadRef

from ._relay import COLLECTOR, DOWNLOAD_TIMEOUT

__all__ = ["TASK_ROUTE", "download_arrays_to", "lazy_arrays", "only_executors_of"]

TASK_ROUTE = (CellChannel.SERVER_COMMAND, ServerCommandNames.GET_TASK)
"""The cell's route for tasks from the server; passed through, a task's arrays stay references."""


def only_executors_of(kind: type, fl_ctx: FLContext) -> bool:
    """Whether every executor of the job's client runner is a ``kind`` (False if it cannot tell):
    passing tasks through changes what every executor of the job gets."""
    runner = fl_ctx.get_prop(FLContextKey.RUNNER)
    table = getattr(getattr(runner, "task_router", None), "task_table", None)
    if not isinstance(table, dict) or not table:
        return False
    return all(isinstance(executor, kind) for executor in table.values())


def lazy_arrays(data: Any) -> dict[str, LazyDownloadRef] | None:
    """The entries of a task's data that are numpy arrays still on the server, by key; None if
    the data holds references this module cannot hand on one by one (NVFlare must bring those
    into the client job first)."""
    if not isinstance(data, dict):
        return None if contains_lazy_download_ref(data) else {}
    refs: dict[str, LazyDownloadRef] = {}
    for key, value in data.items():
        if isinstance(value, LazyDownloadRef) and isinstance(key, str):
            if value.dot != dots.NUMPY_DOWNLOAD:
                return None
            refs[key] = value
        elif contains_lazy_download_ref(value):
            return None
    return refs


class _Arrays(ItemConsumer):  # type: ignore[misc]
    """NVFlare's numpy download items (one ``.npz`` of one array each), each handed to ``give``
    as it arrives: the array reads the item's own bytes (checked, CRC included), with no copy."""

    supports_pipelining = True  # the next item is asked for while this one is handed on

    def __init__(self, keys: dict[str, str], give: Callable[[str, np.ndarray], None]) -> None:
        super().__init__()
        self.keys = keys  # item id to key
        self.given: set[str] = set()
        self.give = give

    def consume_items(self, items: list[Any], result: Any) -> Any:
        for item in items:
            COLLECTOR.moved(len(item))
            item_id, array = _npz_array(item)
            key = self.keys.get(item_id)
            if key is not None:
                self.given.add(item_id)
                self.give(key, array)
        return result


def _npz_array(item: Any) -> tuple[str, np.ndarray]:
    """The one array of an ``.npz`` (as NVFlare's numpy downloads make them), and its name; a
    read-only view of ``item``'s bytes where it is stored as is, else a copy (``np.load``).

    :raises ValueError: the item is not an ``.npz`` of one array that ``np.load`` would read
        without pickles, or it is damaged.
    :raises zipfile.BadZipFile: the item is no zip archive at all.
    """
    view = memoryview(item).cast("B")
    # BytesIO shares a bytes object's memory (it copies any other buffer); the archive reads
    # only its directory, at the end.
    with zipfile.ZipFile(io.BytesIO(item if isinstance(item, bytes) else bytes(view))) as archive:
        infos = archive.infolist()
        if len(infos) != 1 or not infos[0].filename.endswith(".npy"):
            raise ValueError(f"a numpy download item holds {[i.filename for i in infos]}")
        info = infos[0]
        name = info.filename[: -len(".npy")]
        if info.compress_type != zipfile.ZIP_STORED:
            return name, _loaded(archive, info)
        local = view[info.header_offset : info.header_offset + 30]
        if len(local) < 30 or bytes(local[:4]) != b"PK\x03\x04":
            raise ValueError("a numpy download item has a broken zip header")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        member = view[start : start + info.file_size]
        if len(member) != info.file_size or zlib.crc32(member) != info.CRC:
            raise ValueError(f"numpy download item {name!r} is damaged (size or CRC)")
        header = io.BytesIO(member[: min(len(member), 65536 + 16)])
        read_header = _NPY_HEADERS.get(np.lib.format.read_magic(header))
        if read_header is None:  # a format version this module does not read itself
            return name, _loaded(archive, info)
        shape, fortran_order, dtype = read_header(header)
        if dtype.hasobject:
            raise ValueError(f"numpy download item {name!r} holds Python objects")
        count = math.prod(shape)
        offset = header.tell()
        if fortran_order or offset + count * dtype.itemsize != len(member):
            return name, _loaded(archive, info)
        array = np.frombuffer(member, dtype=dtype, count=count, offset=offset)
        return name, array.reshape(shape)


_NPY_HEADERS: dict[tuple[int, int], Callable[[io.BytesIO], tuple[Any, bool, np.dtype[Any]]]] = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _loaded(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        array = np.lib.format.read_array(member, allow_pickle=False)
    assert isinstance(array, np.ndarray)
    return array


def download_arrays_to(
    refs: dict[str, LazyDownloadRef],
    cell: Any,
    abort_signal: Signal,
    give: Callable[[str, np.ndarray], None],
) -> str | None:
    """Download the arrays ``refs`` point at, calling ``give(key, array)`` for each as it comes;
    returns why the download failed, or None. An exception from ``give`` stops the download."""
    by_source: dict[tuple[str, str], dict[str, str]] = {}  # item id to key, per transaction
    for key, ref in refs.items():
        by_source.setdefault((ref.fqcn, ref.ref_id), {})[ref.item_id] = key
    for (fqcn, ref_id), keys in by_source.items():
        consumer = _Arrays(keys, give)
        download_object(
            from_fqcn=fqcn,
            ref_id=ref_id,
            per_request_timeout=DOWNLOAD_TIMEOUT,
            cell=cell,
            consumer=consumer,
            abort_signal=abort_signal,
        )
        if consumer.error:
            return f"the download from {fqcn} failed: {consumer.error}"
        missing = sorted(set(keys) - consumer.given)
        if missing:
            return f"the download from {fqcn} had no items {missing}"
    return None
