"""Tasks become FLModels and FLModels results as NVFlare's FLModelUtils maps them; the Client
API's rules for what is held, sent and cleared. No I/O, no event loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flare_agent_async import RC, Task
from flare_agent_async.client import (
    ClientConfig,
    FLModel,
    ParamsType,
    model_from_task,
    params_diff,
    result_from_model,
)
from flare_agent_async.client._exchange import Exchange

CONFIG = ClientConfig(site_name="site-1", job_id="job-1")


def task(data: Any, data_kind: str = "WEIGHTS", name: str = "train", **meta: Any) -> Task:
    meta = {"data_kind": data_kind, "current_round": 2, "total_round": 5, **meta}
    return Task(name, "t1", meta, data)


def test_a_weights_task_is_a_full_model_with_its_rounds_and_meta() -> None:
    weights = {"w": np.arange(3.0)}
    model = model_from_task(task(weights, NUM_STEPS_CURRENT_ROUND=4), CONFIG)
    assert model.params_type is ParamsType.FULL and model.params is weights
    assert (model.current_round, model.total_rounds, model.metrics) == (2, 5, None)
    assert model.meta == {"NUM_STEPS_CURRENT_ROUND": 4, "job_id": "job-1", "site_name": "site-1"}


@pytest.mark.parametrize(
    ("data_kind", "params_type"),
    [("WEIGHT_DIFF", ParamsType.DIFF), ("COLLECTION", ParamsType.FULL)],
)
def test_data_kinds_name_the_params_type(data_kind: str, params_type: ParamsType) -> None:
    assert model_from_task(task({"w": 1}, data_kind), CONFIG).params_type is params_type


def test_a_metrics_task_and_initial_metrics_are_metrics() -> None:
    assert model_from_task(task({"acc": 0.5}, "METRICS"), CONFIG).metrics == {"acc": 0.5}
    with_metrics = model_from_task(task({"w": 1}, initial_metrics={"acc": 0.7}), CONFIG)
    assert with_metrics.params == {"w": 1} and with_metrics.metrics == {"acc": 0.7}


def test_a_task_of_an_unknown_kind_without_data_is_refused() -> None:
    with pytest.raises(ValueError, match="without data"):
        model_from_task(task(None, "COLLECTION"), CONFIG)


def test_results_carry_the_data_kind_of_their_params_type_and_their_metrics() -> None:
    full = result_from_model(FLModel(params={"w": 2}, current_round=2, meta={"n": 1}))
    assert (full.data, full.return_code) == ({"w": 2}, RC.OK)
    assert full.meta == {"n": 1, "data_kind": "WEIGHTS", "current_round": 2}
    diff = result_from_model(FLModel(params={"w": 1}, params_type="DIFF", metrics={"a": 1}))
    assert diff.meta == {"initial_metrics": {"a": 1}, "data_kind": "WEIGHT_DIFF"}
    metrics = result_from_model(FLModel(metrics={"acc": 0.8}))
    assert (metrics.data, metrics.meta) == ({"acc": 0.8}, {"data_kind": "METRICS"})
    with pytest.raises(ValueError, match="without params and metrics"):
        result_from_model(FLModel())


def test_params_diff_is_nvflares() -> None:
    diff = params_diff(
        {"a": np.ones(2), "b": [1, 2], "gone": 1}, {"a": np.full(2, 3.0), "b": [2, 4]}
    )
    assert sorted(diff) == ["a", "b"]
    np.testing.assert_array_equal(diff["a"], [2.0, 2.0])
    assert diff["b"] == [1, 2]
    with pytest.raises(RuntimeError, match="no common keys"):
        params_diff({"a": 1}, {"b": 1})


def test_the_exchange_holds_one_task_until_its_result_is_sent() -> None:
    exchange = Exchange(CONFIG)
    with pytest.raises(RuntimeError, match="receive"):
        exchange.result(FLModel(params={"w": 1}))
    received = exchange.take(task({"w": np.ones(2)}))
    assert exchange.held() is received
    sent = FLModel(params={"w": np.full(2, 2.0)})
    assert exchange.result(sent).data is sent.params
    exchange.sent_result(sent, clear_cache=True)
    assert exchange.held() is None
    assert sent.params is None and received.params is None  # large models are let go of


def test_without_clear_cache_the_model_stays_but_is_answered_once() -> None:
    exchange = Exchange(CONFIG)
    received = exchange.take(task({"w": 1}))
    exchange.sent_result(FLModel(params={"w": 2}), clear_cache=False)
    assert exchange.held() is received and received.params == {"w": 1}
    with pytest.raises(RuntimeError, match="sent already"):
        exchange.result(FLModel(params={"w": 3}))


def test_an_aborted_task_is_dropped_at_the_next_look() -> None:
    exchange = Exchange(CONFIG)
    held = task({"w": 1})
    exchange.take(held)
    held.set_aborted()
    assert exchange.held() is None
    with pytest.raises(RuntimeError, match="receive"):
        exchange.result(FLModel(params={"w": 2}))


def test_diff_transfer_sends_the_change_of_full_params() -> None:
    exchange = Exchange(ClientConfig(site_name="s", transfer_type="DIFF"))
    exchange.take(task({"w": np.ones(2)}))
    result = exchange.result(FLModel(params={"w": np.full(2, 4.0)}, metrics={"loss": 1.0}))
    assert result.meta["data_kind"] == "WEIGHT_DIFF"
    np.testing.assert_array_equal(result.data["w"], [3.0, 3.0])
    assert result.meta["initial_metrics"] == {"loss": 1.0}
    with pytest.raises(ValueError, match="transfer_type"):
        ClientConfig(site_name="s", transfer_type="HALF")


@pytest.mark.torch
@pytest.mark.parametrize("transfer_type", ["FULL", "DIFF"])
def test_with_the_pytorch_exchange_format_the_trainer_sees_tensors_and_the_wire_arrays(
    transfer_type: str,
) -> None:
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[torch]'")
    weights = {"w": np.arange(3.0), "step": 7}
    exchange = Exchange(
        ClientConfig(
            site_name="site-1", params_exchange_format="pytorch", transfer_type=transfer_type
        )
    )
    model = exchange.take(task(weights))
    received = model.params["w"]
    assert isinstance(received, torch.Tensor) and model.params["step"] == 7
    assert received.data_ptr() == weights["w"].ctypes.data  # the same memory, no copy
    trained = {"w": received + 1.0}
    result = exchange.result(FLModel(params=trained))
    assert isinstance(result.data["w"], np.ndarray)
    expected = np.ones(3) if transfer_type == "DIFF" else np.arange(3.0) + 1.0
    np.testing.assert_array_equal(result.data["w"], expected)
    assert isinstance(trained["w"], torch.Tensor)  # the trainer's own model is left as it was


def test_an_unknown_exchange_format_is_refused() -> None:
    with pytest.raises(ValueError, match="params_exchange_format must be one of raw, numpy"):
        ClientConfig(site_name="site-1", params_exchange_format="keras_layer_weights")


def test_a_task_from_nvflare_is_the_model_nvflares_client_api_receives() -> None:
    pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.shareable import Shareable
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from flare_agent_async.nvflare._convert import shareable_to_task

    for data_kind, data, meta in (
        (DataKind.WEIGHTS, {"w": np.arange(3.0)}, {"NUM_STEPS_CURRENT_ROUND": 3}),
        (DataKind.WEIGHT_DIFF, {"w": np.ones(2)}, {}),
        (DataKind.METRICS, {"acc": 0.25}, {}),
        (DataKind.WEIGHTS, {"w": np.ones(1)}, {"initial_metrics": {"acc": 0.5}}),
    ):
        shareable = DXO(data_kind, data=data, meta=dict(meta)).to_shareable()
        shareable.set_header(AppConstants.CURRENT_ROUND, 1)
        shareable.set_header(AppConstants.NUM_ROUNDS, 4)
        theirs = FLModelUtils.from_shareable(shareable)
        sent = shareable_to_task(shareable)
        ours = model_from_task(Task("train", sent.task_id, sent.meta, sent.data), CONFIG)
        assert ours.params_type == theirs.params_type
        assert ours.params is theirs.params or ours.params == theirs.params
        assert ours.metrics == theirs.metrics
        assert (ours.current_round, ours.total_rounds) == (
            theirs.current_round,
            theirs.total_rounds,
        )
        assert ours.meta == {**theirs.meta, "job_id": "job-1", "site_name": "site-1"}
    # cross-site evaluation's request for the trainer's model holds no DXO
    request = Shareable()
    request.set_header(AppConstants.SUBMIT_MODEL_NAME, "best")
    request.set_header(AppConstants.VALIDATE_TYPE, "model_validation")
    theirs = FLModelUtils.from_shareable(request)
    sent = shareable_to_task(request)
    ours = model_from_task(Task("submit_model", sent.task_id, sent.meta, sent.data), CONFIG)
    assert (ours.params, ours.params_type, ours.metrics) == (None, None, None)
    assert (theirs.params, theirs.params_type, theirs.metrics) == (None, None, None)
    assert ours.meta == {**theirs.meta, "job_id": "job-1", "site_name": "site-1"}


def test_a_result_reaches_nvflare_as_nvflares_client_api_sends_it() -> None:
    pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")
    from nvflare.apis.dxo import from_shareable
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from flare_agent_async.nvflare import result_to_shareable

    for model in (
        FLModel(params={"w": np.ones(2)}, current_round=1, total_rounds=3, meta={"n": 5}),
        FLModel(params={"w": np.ones(2)}, params_type="DIFF", metrics={"acc": 0.5}),
        FLModel(metrics={"acc": 0.75}, current_round=2),
    ):
        ours = result_to_shareable(result_from_model(model))
        theirs = FLModelUtils.to_shareable(model)
        ours_dxo, theirs_dxo = from_shareable(ours), from_shareable(theirs)
        assert ours_dxo.data_kind == theirs_dxo.data_kind
        assert ours_dxo.data is theirs_dxo.data or ours_dxo.data == theirs_dxo.data
        assert ours_dxo.meta == theirs_dxo.meta
        for header in (AppConstants.CURRENT_ROUND, AppConstants.NUM_ROUNDS):
            assert ours.get_header(header) == theirs.get_header(header)
