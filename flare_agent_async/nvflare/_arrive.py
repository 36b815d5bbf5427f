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

from collections.abc import Callable
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import FLContextKey, ServerCommandNames
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.utils.task_utils import contains_lazy_download_ref
from nvflare.app_common.np.np_downloader import download_arrays
from nvflare.fuel.f3.cellnet.defs import CellChannel
from nvflare.fuel.utils.fobs import dots
from nvflare.fuel.utils.fobs.decomposers.via_downloader import LazyDownloadRef

from ._relay import DOWNLOAD_TIMEOUT

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
        given: set[str] = set()

        def received(
            arrays: dict[str, np.ndarray], keys: dict[str, str] = keys, given: set[str] = given
        ) -> None:
            for item_id in list(arrays):
                key = keys.get(item_id)
                if key is not None:
                    given.add(item_id)
                    give(key, arrays.pop(item_id))  # popped: only the site holds it from here

        error, _ = download_arrays(
            from_fqcn=fqcn,
            ref_id=ref_id,
            per_request_timeout=DOWNLOAD_TIMEOUT,
            cell=cell,
            abort_signal=abort_signal,
            arrays_received_cb=received,
        )
        if error:
            return f"the download from {fqcn} failed: {error}"
        missing = sorted(set(keys) - given)
        if missing:
            return f"the download from {fqcn} had no items {missing}"
    return None
