"""The components the job scenario puts into its NVFlare job (see `benchmarks.job`).

NVFlare loads them by class path in the simulator's processes, which find this package on their
``PYTHONPATH``; the job names ``benchmarks`` as an app package, so no source is copied into it.

* `EchoedModelPersistor` (server): the model, a dict of float32 arrays made in memory; saving
  keeps a reference only, so persisting costs nothing inside a round. At ``END_RUN`` it checks
  that the final global model equals the initial one, as it must when the only trainer echoes,
  and writes that verdict to a file.
* `EventTimer` (server and client job): one JSON line per NVFlare event of interest, with
  ``time.monotonic()``, which every process of the machine shares.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import (
    ModelLearnable,
    ModelLearnableKey,
    make_model_learnable,
)
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from benchmarks._harness import payload


class EchoedModelPersistor(ModelPersistor):  # type: ignore[misc]
    """An in-memory model of ``mib`` MiB in ``arrays`` float32 arrays; at the end of the run,
    whether it came back unchanged goes to ``verdict_file``."""

    def __init__(self, mib: float = 1 / 1024, arrays: int = 2, verdict_file: str = "") -> None:
        super().__init__()
        self.mib = mib
        self.arrays = arrays
        self.verdict_file = verdict_file
        self._last: ModelLearnable | None = None
        self._saves = 0

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        return make_model_learnable(payload(self.mib, self.arrays), {})

    def save_model(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        self._last = model_learnable
        self._saves += 1

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.END_RUN and self.verdict_file:
            with open(self.verdict_file, "w") as out:
                json.dump(self._verdict(), out)

    def _verdict(self) -> dict[str, Any]:
        if self._last is None:
            return {"ok": False, "saves": 0, "detail": "no model was saved"}
        got = self._last[ModelLearnableKey.WEIGHTS]
        want = payload(self.mib, self.arrays)
        changed = [
            name
            for name, array in want.items()
            if name not in got
            or np.asarray(got[name]).dtype != array.dtype
            or not np.array_equal(got[name], array)
        ]
        ok = not changed and set(got) == set(want)
        return {
            "ok": ok,
            "saves": self._saves,
            "detail": "the final model is the initial one" if ok else f"changed: {changed}",
        }


_SERVER_EVENTS = {
    AppEventType.ROUND_STARTED: "round_started",
    AppEventType.ROUND_DONE: "round_done",
    # ServerRunner, as it hands a task to the client and as the client's result comes in:
    EventType.BEFORE_TASK_DATA_FILTER: "task_dispatch",
    EventType.BEFORE_TASK_RESULT_FILTER: "result_in",
}
_CLIENT_EVENTS = {
    # ClientRunner fires these right around the executor's execute():
    EventType.BEFORE_TASK_EXECUTION: "before_execute",
    EventType.AFTER_TASK_EXECUTION: "after_execute",
}


class EventTimer(FLComponent):  # type: ignore[misc]
    """Appends ``{"event", "mono", "round"}`` to ``out_file`` for each NVFlare event of interest
    to the ``role`` (``"server"`` or ``"client"``)."""

    def __init__(self, out_file: str = "", role: str = "server") -> None:
        super().__init__()
        self.out_file = out_file
        self.role = role
        self._events = _SERVER_EVENTS if role == "server" else _CLIENT_EVENTS

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        name = self._events.get(event_type)
        if name is None or not self.out_file:
            return
        record = {
            "event": name,
            "mono": time.monotonic(),
            "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            "pid": os.getpid(),
        }
        with open(self.out_file, "a") as out:
            out.write(json.dumps(record) + "\n")
