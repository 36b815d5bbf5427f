"""A result's arrays go to the NVFlare server straight from the trainer, one at a time.

The client job asks the agent to hold back its result's arrays (`FlareSite.run_task` with
``hold_arrays``), and hands NVFlare a result whose arrays are references (`LazyDownloadRef`) to
a download transaction on the client job's own cell: NVFlare's way of saying "download these
from there", which its server already follows for its own Client API. As the server downloads
each array, the transaction fetches it from the agent, serialises it as NVFlare's numpy
downloads do, and lets go of it; while one array goes to the server, the next is fetched and
serialised. When the transaction ends, the result is released: the trainer's ``submit_result``
returns (True if the server downloaded every array, by NVFlare's own account of the transfer).
So the client job holds an array or two at a time, never the whole result.
"""

from __future__ import annotations

import gc
import io
import threading
import zipfile
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import anyio.from_thread
import anyio.to_thread
import numpy as np
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.task_utils import get_filters
from nvflare.app_common.np.np_downloader import ArrayDownloadable
from nvflare.fuel.f3.streaming.obj_downloader import ObjectDownloader
from nvflare.fuel.f3.streaming.transfer_outcome import TransferOutcome
from nvflare.fuel.utils.fobs import dots
from nvflare.fuel.utils.fobs.decomposers.via_downloader import LazyDownloadRef
from nvflare.private.privacy_manager import Scope

from ..defs import TaskResult
from ..site import HeldResult

__all__ = ["COLLECTOR", "Collector", "consumed_in_client", "npz", "relay"]

DOWNLOAD_TIMEOUT = 600.0
"""Seconds the server may stay silent in the middle of downloading a result (NVFlare's default
streaming idle timeout); then the transaction ends, and the result is refused at the agent."""
_CHUNK_BYTES = 2 * 2**20  # NVFlare's own for numpy downloads: one array per item beyond it


COLLECT_EVERY_BYTES = 128 * 2**20
"""How many bytes a download moves between full collections of Python's garbage (`Collector`)."""


class Collector:
    """Runs a full collection of Python's garbage every ``every_bytes`` a download moved.

    NVFlare's streaming leaves each message it sent or received in reference cycles, payload
    and all, which only a full collection frees; and the collector runs by the count of objects
    made, not by their size: a few large payloads make it no sooner. Without this, a client job
    that moves a large model keeps every array it moved, as garbage, until the round ends. A
    full collection takes tens of milliseconds in a client job, so it runs by bytes, not by
    item.
    """

    def __init__(self, every_bytes: int = COLLECT_EVERY_BYTES) -> None:
        self.every_bytes = every_bytes
        self._moved = 0
        self._lock = threading.Lock()

    def moved(self, nbytes: int) -> None:
        with self._lock:
            self._moved += nbytes
            if self._moved < self.every_bytes:
                return
            self._moved = 0
        gc.collect()


COLLECTOR = Collector()
"""The client job's one, for what its executors' downloads move both ways."""


class _HeldArrays(ArrayDownloadable):  # type: ignore[misc]
    """The held-back arrays of a result, as NVFlare's download service serves them: item ``i``
    is the array of ``result.held[i]``, fetched from the agent and serialised (`npz`) when the
    server asks for it, or ahead of that when NVFlare says it comes next (`prefetch_item`).

    Each item's size is its array's (`HeldResult.held_nbytes`), if the agent said: NVFlare needs
    it to know, before it makes an item, that the item will not fit in the message it is
    filling. Without it, NVFlare makes the next item at once to find out, before it sends the
    one it has.
    """

    def __init__(
        self,
        result: HeldResult,
        item_ids: list[str],
        portal: anyio.from_thread.BlockingPortal,
    ) -> None:
        super().__init__(dict.fromkeys(item_ids), _CHUNK_BYTES)
        self._result = result
        self._portal = portal
        self._lock = threading.Lock()
        self._ahead: dict[int, Future[bytes]] = {}  # by index; NVFlare keeps one or two ahead
        self._released = False

    async def _make(self, index: int) -> bytes:
        """Item ``index``: its array fetched from the agent, serialised under the item's name
        (the array is dropped once serialised; what stays is NVFlare's format for a numpy
        download, the .npz of one array)."""
        array = await self._result.fetch(self._result.held[index])
        return await anyio.to_thread.run_sync(npz, self.keys[index], array)

    def get_item_size(self, index: int) -> int | None:
        return self._result.held_nbytes.get(self._result.held[index])

    def prefetch_item(self, index: int) -> None:
        with self._lock:
            if not self._released and index not in self._ahead:
                self._ahead[index] = self._portal.start_task_soon(self._make, index)

    def produce_item(self, index: int) -> bytes:
        with self._lock:
            ahead = self._ahead.pop(index, None)
        item = self._portal.call(self._make, index) if ahead is None else ahead.result()
        COLLECTOR.moved(len(item))
        return item

    def release(self) -> None:
        with self._lock:
            self._released = True
            ahead, self._ahead = list(self._ahead.values()), {}
        for future in ahead:  # what the server will not ask for: its fetch stops
            future.cancel()
        super().release()


def npz(name: str, array: np.ndarray) -> bytes:
    """``array`` as ``np.savez(stream, **{name: array})`` writes it, read as ``np.load`` reads
    it back; the array's bytes are copied once, into the result (``np.savez`` copies them in
    16 MiB pieces first, which the C allocator keeps in the thread's heap once freed)."""
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # np.savez copies it too
    header = io.BytesIO()
    fields = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header too long for version 1.0, as np.save does
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    stream = io.BytesIO()
    with (
        zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
        archive.open(f"{name}.npy", "w", force_zip64=True) as member,
    ):
        member.write(header.getbuffer())
        if array.size:
            member.write(array.data.cast("B"))
    return stream.getvalue()  # the stream's own buffer, trimmed: not a copy


def relay(
    result: HeldResult, cell: Any, portal: anyio.from_thread.BlockingPortal
) -> tuple[TaskResult, Callable[[], None]]:
    """``result`` with a `LazyDownloadRef` to ``cell``'s download service in place of each held
    array, and a function that abandons the download (if the result is not sent after all). The
    result is released when the server's download ends, is abandoned, or times out."""

    def done(outcome: TransferOutcome) -> None:
        # Not the transaction's own end status: "finished" counts a receiver that failed too.
        accepted = outcome.completed
        reason = (
            "" if accepted else f"the server's download ended {outcome.status}: {outcome.reason}"
        )
        try:
            portal.call(result.release, accepted, reason)
        except RuntimeError:  # the site's loop is gone (the run ended): it released everything
            pass

    item_ids = [f"A{index}" for index in range(len(result.held))]
    downloader = ObjectDownloader(
        cell=cell, timeout=DOWNLOAD_TIMEOUT, num_receivers=1, outcome_cb=done
    )
    ref_id = downloader.add_object(_HeldArrays(result, item_ids, portal))
    fqcn = cell.get_fqcn()
    data = dict(result.data)
    for key, item_id in zip(result.held, item_ids, strict=True):
        data[key] = LazyDownloadRef(fqcn, ref_id, item_id, dots.NUMPY_DOWNLOAD)
    return TaskResult(result.meta, data, result.return_code), downloader.delete_transaction


def consumed_in_client(task_name: str, fl_ctx: FLContext) -> bool:
    """Whether something in the client job reads the task's result before it is sent: a result
    filter, or a component that says so (``requires_materialized_task_result``), as NVFlare's
    Client API executor asks. Then the result comes to the client job whole."""
    runner = fl_ctx.get_prop(FLContextKey.RUNNER)
    active = fl_ctx.get_prop(FLContextKey.TASK_NAME)
    if active != task_name:  # run by a workflow inside the client: does it read the result?
        find = getattr(runner, "find_executor", None)
        outer = find(active) if callable(find) and isinstance(active, str) else None
        requires = getattr(outer, "requires_materialized_task_result", None)
        return callable(requires) and requires(task_name) is True
    filters = getattr(runner, "task_result_filters", None)
    if isinstance(filters, dict) and get_filters(
        Scope.TASK_RESULT_FILTERS_NAME, fl_ctx, filters, task_name, FilterKey.OUT
    ):
        return True
    engine = fl_ctx.get_engine()
    components = getattr(engine, "get_all_components", lambda: None)()
    if not isinstance(components, dict):
        return False
    for component in components.values():
        requires = getattr(component, "requires_materialized_task_result", None)
        if callable(requires) and requires(task_name) is True:
            return True
    return False
