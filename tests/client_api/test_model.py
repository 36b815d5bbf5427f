"""FLModel and ParamsType behave as NVFlare's: fields, defaults, validation; NVFlare's own model
is taken field for field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flare_agent_async.client import FLModel, ParamsType, as_fl_model

CASES: list[dict[str, Any]] = [
    {},
    {"params": {"w": 1}},
    {"params": {"w": 1}, "params_type": "DIFF"},
    {"params_type": ParamsType.FULL},
    {"params": {"w": 1}, "params_type": "HALF"},
    {"metrics": {"acc": 0.5}},
    {"metrics": [0.5]},
    {"current_round": -1},
    {"current_round": 1.5},
    {"total_rounds": 3, "current_round": 2, "start_round": None},
    {"meta": ["not", "a", "dict"]},
    {"meta": {"NUM_STEPS_CURRENT_ROUND": 10}, "optimizer_params": {"lr": 0.1}},
]


def fields(model: Any) -> dict[str, Any]:
    names = ("params_type", "params", "optimizer_params", "metrics", "start_round")
    values = {name: getattr(model, name) for name in names}
    values.update(current_round=model.current_round, total_rounds=model.total_rounds)
    values["meta"] = model.meta
    if values["params_type"] is not None:
        values["params_type"] = values["params_type"].value
    return values


def outcome(make: Any, arguments: dict[str, Any]) -> Any:
    try:
        return fields(make(**arguments))
    except (TypeError, ValueError) as exc:
        return type(exc)


def test_defaults() -> None:
    model = FLModel()
    assert (model.params_type, model.params, model.metrics, model.meta) == (None, None, None, {})
    assert (model.start_round, model.current_round, model.total_rounds) == (0, None, None)
    assert FLModel(params={"w": 1}).params_type is ParamsType.FULL
    assert ParamsType("DIFF") is ParamsType.DIFF and ParamsType.DIFF == "DIFF"


@pytest.mark.parametrize("arguments", CASES)
def test_fields_and_validation_are_nvflares(arguments: dict[str, Any]) -> None:
    nvflare_model = pytest.importorskip(
        "nvflare.app_common.abstract.fl_model", reason="needs NVFlare: pip install -e '.[test]'"
    )
    assert outcome(FLModel, arguments) == outcome(nvflare_model.FLModel, arguments)


def test_nvflares_model_is_taken_field_for_field() -> None:
    nvflare_model = pytest.importorskip(
        "nvflare.app_common.abstract.fl_model", reason="needs NVFlare: pip install -e '.[test]'"
    )
    theirs = nvflare_model.FLModel(
        params={"w": np.arange(3.0)},
        params_type=nvflare_model.ParamsType.DIFF,
        metrics={"acc": 0.9},
        current_round=2,
        total_rounds=5,
        meta={"k": "v"},
    )
    ours = as_fl_model(theirs)
    assert isinstance(ours, FLModel)
    assert ours.params_type is ParamsType.DIFF
    assert ours.params is theirs.params  # no copy of the model
    assert (ours.metrics, ours.current_round, ours.total_rounds, ours.meta) == (
        {"acc": 0.9},
        2,
        5,
        {"k": "v"},
    )


def test_anything_else_is_not_a_model() -> None:
    with pytest.raises(TypeError, match="expected an FLModel"):
        as_fl_model({"params": {}})
    model = FLModel(metrics={"acc": 1.0})
    assert as_fl_model(model) is model
