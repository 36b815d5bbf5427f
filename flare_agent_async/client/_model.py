"""`FLModel` and `ParamsType`: NVFlare's model exchange structure, field for field.

A script written for NVFlare's Client API builds and reads these exactly as it does NVFlare's
(``nvflare.app_common.abstract.fl_model``): the same fields, defaults and validation errors. Where
nvflare is installed, `as_fl_model` also takes NVFlare's own `FLModel`.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["FLModel", "FLModelConst", "MetaKey", "ParamsType", "as_fl_model"]


class ParamsType(str, enum.Enum):  # noqa: UP042 - as NVFlare's, whose str() this keeps
    """What ``FLModel.params`` holds: the whole model, or its change since it was received."""

    FULL = "FULL"
    DIFF = "DIFF"


class FLModelConst:
    """Names of `FLModel`'s fields, as NVFlare spells them."""

    PARAMS_TYPE = "params_type"
    PARAMS = "params"
    OPTIMIZER_PARAMS = "optimizer_params"
    METRICS = "metrics"
    CURRENT_ROUND = "current_round"
    START_ROUND = "start_round"
    TOTAL_ROUNDS = "total_rounds"
    META = "meta"


class MetaKey:
    """Well-known keys of ``FLModel.meta`` (NVFlare's ``FLMetaKey``)."""

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    PROCESSED_ALGORITHM = "PROCESSED_ALGORITHM"
    PROCESSED_KEYS = "PROCESSED_KEYS"
    INITIAL_METRICS = "initial_metrics"
    FILTER_HISTORY = "filter_history"
    CONFIGS = "configs"
    VALIDATE_TYPE = "validate_type"
    START_ROUND = "start_round"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"
    SUBMIT_MODEL_NAME = "submit_model_name"


def _check_non_negative_int(name: str, value: object) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, but got {type(value)}.")
    if value < 0:
        raise ValueError(f"{name} must >= 0, but got {value}")


class FLModel:
    """A model as the Client API exchanges it: parameters, metrics, rounds and meta.

    :param params_type: what ``params`` holds; with ``params`` and no type, `ParamsType.FULL`.
    :param params: the model's parameters (a dict of arrays, usually).
    :param optimizer_params: the optimizer's parameters, when they travel too.
    :param metrics: evaluation metrics (a dict).
    :param start_round: the round the job started from.
    :param current_round: this round (None outside training).
    :param total_rounds: how many rounds the job has.
    :param meta: anything else, by key (`MetaKey` names the well-known ones).
    :raises ValueError: a params type without params, or a negative round.
    :raises TypeError: metrics or meta not a dict, or a round not an int.
    """

    def __init__(
        self,
        params_type: str | ParamsType | None = None,
        params: Any = None,
        optimizer_params: Any = None,
        metrics: dict[str, Any] | None = None,
        start_round: int | None = 0,
        current_round: int | None = None,
        total_rounds: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if params_type is None:
            if params is not None:
                params_type = ParamsType.FULL
        else:
            params_type = ParamsType(params_type)
        if params_type is not None and params is None:
            raise ValueError(f"params must be provided when params_type is {params_type}")
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"metrics must be {dict}, but got {type(metrics)}.")
        for name, value in (
            ("start_round", start_round),
            ("current_round", current_round),
            ("total_rounds", total_rounds),
        ):
            if value is not None:
                _check_non_negative_int(name, value)
        if meta is None:
            meta = {}
        elif not isinstance(meta, dict):
            raise TypeError(f"meta must be {dict}, but got {type(meta)}.")
        self.params_type: ParamsType | None = params_type
        self.params = params
        self.optimizer_params = optimizer_params
        self.metrics = metrics
        self.start_round = start_round
        self.current_round = current_round
        self.total_rounds = total_rounds
        self.meta: dict[str, Any] = meta

    def summary(self) -> dict[str, Any]:
        """What the model holds, briefly: sizes of dicts, types of the rest (as NVFlare's)."""
        summary: dict[str, Any] = {}
        for key in ("params", "optimizer_params", "metrics", "meta", "params_type"):
            value = getattr(self, key)
            if value:
                if isinstance(value, dict):
                    summary[key] = len(value)
                elif isinstance(value, ParamsType):
                    summary[key] = value
                else:
                    summary[key] = type(value)
        for key in ("start_round", "current_round", "total_rounds"):
            value = getattr(self, key)
            if value:
                summary[key] = value
        return summary

    def __repr__(self) -> str:
        return str(self.summary())


_FIELDS = (
    "params_type",
    "params",
    "optimizer_params",
    "metrics",
    "start_round",
    "current_round",
    "total_rounds",
    "meta",
)


def as_fl_model(model: object) -> FLModel:
    """``model`` as our `FLModel`: ours as it is, NVFlare's (``nvflare``'s ``FLModel``) field
    for field.

    :raises TypeError: it is neither.
    """
    if isinstance(model, FLModel):
        return model
    kind = type(model)
    if kind.__name__ == "FLModel" and kind.__module__.startswith("nvflare."):
        fields = {name: getattr(model, name, None) for name in _FIELDS}
        params_type = fields["params_type"]
        if params_type is not None:
            fields["params_type"] = ParamsType(getattr(params_type, "value", params_type))
        return FLModel(**fields)
    raise TypeError(f"expected an FLModel, got {kind.__module__}.{kind.__qualname__}")
