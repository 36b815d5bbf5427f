"""The Client API's rules without I/O: tasks become `FLModel`s, `FLModel`s become results.

The mapping is NVFlare's own (``FLModelUtils`` in ``nvflare.app_common.utils.fl_model_utils``),
so that the server sees what a stock Client API job sends:

* a task's data is the model's ``params``, or its ``metrics`` when the task's data kind is
  ``METRICS``; ``WEIGHTS`` means `ParamsType.FULL`, ``WEIGHT_DIFF`` `ParamsType.DIFF`; metrics that
  came with params (``initial_metrics``) are the model's metrics;
* a result carries ``params`` with the data kind of its params type (``FULL`` when unset) and its
  metrics as ``initial_metrics``, or, without params, the metrics as ``METRICS``;
* rounds travel as ``current_round`` and ``total_round`` in the task's and the result's meta.

`Exchange` holds what one trainer received and not yet answered; `AsyncClient` and `Client`
drive it, each over its agent.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..defs import MetaKey as TaskMetaKey
from ..defs import Task, TaskResult
from ._model import FLModel, MetaKey, ParamsType, as_fl_model

__all__ = ["ClientConfig", "Exchange", "model_from_task", "params_diff", "result_from_model"]

WEIGHTS, WEIGHT_DIFF, METRICS = "WEIGHTS", "WEIGHT_DIFF", "METRICS"
_DATA_KIND_OF = {ParamsType.FULL: WEIGHTS, ParamsType.DIFF: WEIGHT_DIFF}
_PARAMS_TYPE_OF = {WEIGHTS: ParamsType.FULL, WEIGHT_DIFF: ParamsType.DIFF}
_EXCHANGE_FORMATS = ("raw", "numpy", "pytorch")
_TASK_KEYS = (TaskMetaKey.DATA_KIND, TaskMetaKey.CURRENT_ROUND, TaskMetaKey.TOTAL_ROUND)
"""Keys the site adds to a task's meta; the model's meta is the rest."""


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How a Client API trainer is set up: its site, its job, and its task names."""

    site_name: str
    job_id: str | None = None
    train_task_name: str = "train"
    eval_task_name: str = "validate"
    submit_model_task_name: str = "submit_model"
    transfer_type: str = "FULL"
    """``"DIFF"``: `send` sends the change of full params since they were received."""
    params_exchange_format: str = "raw"
    """``"pytorch"``: the trainer gets and gives torch tensors; the wire carries numpy arrays."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else, returned by ``get_config()``."""

    def __post_init__(self) -> None:
        if self.transfer_type not in ("FULL", "DIFF"):
            raise ValueError(f"transfer_type must be 'FULL' or 'DIFF', got {self.transfer_type!r}")
        if self.params_exchange_format not in _EXCHANGE_FORMATS:
            raise ValueError(
                f"params_exchange_format must be one of {', '.join(_EXCHANGE_FORMATS)}, "
                f"got {self.params_exchange_format!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        """The configuration as ``get_config()`` returns it."""
        return {
            **self.extra,
            MetaKey.SITE_NAME: self.site_name,
            MetaKey.JOB_ID: self.job_id,
            "TASK_EXCHANGE": {
                "train_task_name": self.train_task_name,
                "eval_task_name": self.eval_task_name,
                "submit_model_task_name": self.submit_model_task_name,
                "transfer_type": self.transfer_type,
                "exchange_format": self.params_exchange_format,
            },
        }


def model_from_task(task: Task, config: ClientConfig) -> FLModel:
    """The `FLModel` a task brings (NVFlare's ``FLModelUtils.from_shareable``).

    :raises ValueError: the task's data kind names params, and it has none.
    """
    meta = {key: value for key, value in task.meta.items() if key not in _TASK_KEYS}
    data_kind = task.meta.get(TaskMetaKey.DATA_KIND, WEIGHTS)
    params_type: ParamsType | None = None
    params: Any = None
    metrics: Any = None
    if MetaKey.SUBMIT_MODEL_NAME in meta:
        pass  # cross-site evaluation asks for a model: the task brings none
    elif data_kind == METRICS:
        metrics = task.data
    else:
        params = task.data
        params_type = _PARAMS_TYPE_OF.get(data_kind)
        if params_type is None:
            if params is None:
                raise ValueError(f"a task of data kind {data_kind!r} without data")
            params_type = ParamsType.FULL
        metrics = meta.get(MetaKey.INITIAL_METRICS)
    if config.job_id is not None:
        meta[MetaKey.JOB_ID] = config.job_id
    meta[MetaKey.SITE_NAME] = config.site_name
    return FLModel(
        params_type=params_type,
        params=params,
        metrics=metrics,
        current_round=task.meta.get(TaskMetaKey.CURRENT_ROUND),
        total_rounds=task.meta.get(TaskMetaKey.TOTAL_ROUND),
        meta=meta,
    )


def result_from_model(model: FLModel) -> TaskResult:
    """The result an `FLModel` makes (NVFlare's ``FLModelUtils.to_shareable``).

    :raises ValueError: the model has neither params nor metrics.
    """
    if model.params is None and model.metrics is None:
        raise ValueError("FLModel without params and metrics is NOT supported.")
    meta: dict[str, Any] = {}
    if model.params is not None:
        params_type = model.params_type or ParamsType.FULL
        data_kind, data = _DATA_KIND_OF[ParamsType(params_type)], model.params
        if model.metrics is not None:
            # Params with metrics: an evaluation of the global model, as NVFlare reads it.
            meta[MetaKey.INITIAL_METRICS] = model.metrics
    else:
        data_kind, data = METRICS, model.metrics
    meta.update(model.meta or {})
    meta[TaskMetaKey.DATA_KIND] = data_kind
    if model.current_round is not None:
        meta[TaskMetaKey.CURRENT_ROUND] = model.current_round
    if model.total_rounds is not None:
        meta[TaskMetaKey.TOTAL_ROUND] = model.total_rounds
    return TaskResult(meta, data)


def params_diff(original: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new - original`` for every key both have (NVFlare's ``numerical_params_diff``).

    :raises RuntimeError: they have no key in common.
    """
    diff: dict[str, Any] = {}
    for key in original:
        if key not in new:
            continue
        old, now = original[key], new[key]
        if isinstance(now, list) and isinstance(old, list):
            diff[key] = [now[i] - old[i] for i in range(len(now))]
        else:
            diff[key] = now - old
    if not diff:
        raise RuntimeError(
            "no common keys between original and new dict, parameters difference are empty."
        )
    return diff


def _as_tensors(params: Any) -> Any:
    """A dict's numpy arrays as torch tensors that share their memory (no copy)."""
    if not isinstance(params, dict):
        return params
    torch = importlib.import_module("torch")
    return {
        key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for key, value in params.items()
    }


def _as_arrays(params: Any) -> Any:
    """A dict's torch tensors as numpy arrays: the same memory for a CPU tensor; a tensor on
    another device is copied to the host, as it must be to leave the process."""
    if not isinstance(params, dict):
        return params
    return {
        key: value.detach().cpu().numpy() if _is_tensor(value) else value
        for key, value in params.items()
    }


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


class Exchange:
    """One trainer's Client API state: the task it holds, the model it was given.

    ``receive`` hands out the same model until ``send`` (or ``clear``) lets it go; a task the
    site aborted is dropped at the next look.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.task: Task | None = None
        self.model: FLModel | None = None
        self.sent = False  # the held task's result was sent (clear_cache=False keeps the model)

    def held(self) -> FLModel | None:
        """The model of the task held, if the site still wants it."""
        if self.task is not None and self.task.aborted:
            self.clear()
        return self.model

    def take(self, task: Task) -> FLModel:
        """Hold ``task`` and return its model.

        :raises ValueError: the task cannot be read as a model (see `model_from_task`).
        """
        model = model_from_task(task, self.config)
        if self.config.params_exchange_format == "pytorch":
            model.params = _as_tensors(model.params)
        self.task, self.model, self.sent = task, model, False
        return model

    def result(self, model: object) -> TaskResult:
        """The result to submit for the held task.

        :raises RuntimeError: nothing was received, or its result was sent already.
        :raises TypeError: ``model`` is not an `FLModel` (ours or NVFlare's).
        :raises ValueError: it has neither params nor metrics.
        """
        if self.model is None or self.task is None:
            raise RuntimeError('"receive" needs to be called before sending model!')
        if self.sent:
            raise RuntimeError(
                f"the result of task {self.task.task_id!r} was sent already; receive the next one"
            )
        model = as_fl_model(model)
        if (
            self.config.transfer_type == "DIFF"
            and model.params_type == ParamsType.FULL
            and isinstance(model.params, dict)
            and isinstance(self.model.params, dict)
        ):
            try:
                diff = params_diff(self.model.params, model.params)
            except Exception as exc:
                raise RuntimeError(f"params diff function failed: {exc}") from exc
            model = copy.copy(model)  # a shallow copy: the sender's model keeps its full params
            model.params, model.params_type = diff, ParamsType.DIFF
        if self.config.params_exchange_format == "pytorch":
            model = copy.copy(model)
            model.params = _as_arrays(model.params)
        return result_from_model(model)

    def sent_result(self, model: object, *, clear_cache: bool) -> None:
        """The result went: with ``clear_cache``, let go of both models (their params are
        dropped, as NVFlare does, so large models are freed); else keep the one received."""
        self.sent = True
        if clear_cache:
            for done in (model, self.model):  # ours, or NVFlare's: the same attributes
                for name in ("params", "optimizer_params"):
                    if hasattr(done, name):
                        setattr(done, name, None)
            self.clear()

    def clear(self) -> None:
        """Let go of the held task and its model."""
        self.task = self.model = None
        self.sent = False

    def task_name(self) -> str:
        """The held task's name.

        :raises RuntimeError: no task is held.
        """
        if self.task is None:
            raise RuntimeError("no task was received: call receive() first")
        return self.task.task_name
