"""Between NVFlare's Shareable/DXO and our tasks and results, as NVFlare's IPCExchanger does it."""

from __future__ import annotations

import uuid
from typing import Any

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_constant import ReturnCode as FlareRC
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from ..defs import RC, MetaKey, TaskResult

__all__ = ["BadShareable", "TaskInput", "result_to_shareable", "shareable_to_task"]

_SUBMIT_MODEL_NAME = "submit_model_name"
_VALIDATE_TYPE = "validate_type"
"""The FLModel meta keys of NVFlare's Client API for these headers."""

_FLARE_RCS = frozenset(
    value
    for name, value in vars(FlareRC).items()
    if not name.startswith("_") and isinstance(value, str)
)


class BadShareable(ValueError):
    """A task's Shareable holds no DXO (the site answers ``BAD_TASK_DATA``)."""


class TaskInput:
    """A task on its way to an agent: id, data, meta, and whether its data kind is app-defined."""

    def __init__(self, task_id: str, data: Any, meta: dict[str, Any], app_defined: bool) -> None:
        self.task_id = task_id
        self.data = data
        self.meta = meta
        self.app_defined = app_defined


def shareable_to_task(shareable: Shareable) -> TaskInput:
    """The task data (the DXO's data), and meta: the DXO's meta, its data kind, and the rounds.

    Cross-site evaluation's request for a trainer's model holds no DXO: its task has no data,
    and the requested model's name in its meta (``submit_model_name``), as NVFlare's Client API
    gives it. A validation task's type (``validate_type``) goes to the meta too.

    :raises BadShareable: the Shareable holds no DXO, and is no request for a model.
    """
    meta: dict[str, Any] = {}
    data: Any = None
    app_defined = False
    submit_model_name = shareable.get_header(AppConstants.SUBMIT_MODEL_NAME)
    if submit_model_name:
        meta[_SUBMIT_MODEL_NAME] = submit_model_name
    else:
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:
            raise BadShareable(f"the task holds no DXO: {exc}") from exc
        meta.update(dxo.meta or {})
        # NVFlare's data kinds are str enums; the agent gets the plain string ("WEIGHTS").
        meta[MetaKey.DATA_KIND] = str(getattr(dxo.data_kind, "value", dxo.data_kind))
        data = dxo.data if dxo.data is not None else {}
        app_defined = dxo.data_kind == DataKind.APP_DEFINED
    validate_type = shareable.get_header(AppConstants.VALIDATE_TYPE, None)
    if validate_type is not None:
        meta[_VALIDATE_TYPE] = validate_type
    current_round = shareable.get_header(AppConstants.CURRENT_ROUND, None)
    total_rounds = shareable.get_header(AppConstants.NUM_ROUNDS, None)
    if current_round is not None:
        meta[MetaKey.CURRENT_ROUND] = current_round
    if total_rounds is not None:
        meta[MetaKey.TOTAL_ROUND] = total_rounds
    task_id = shareable.get_header(FLContextKey.TASK_ID) or uuid.uuid4().hex
    return TaskInput(str(task_id), data, meta, app_defined)


def result_to_shareable(result: TaskResult, app_defined: bool = False) -> Shareable:
    """The Shareable NVFlare expects for a result.

    ``RC.OK`` (and NVFlare's ``EARLY_TERMINATION``) become a DXO of the data kind named in the
    result's meta (default ``WEIGHTS``; ``APP_DEFINED`` when the task was); other return codes
    become an empty reply with that code (``EXECUTION_EXCEPTION`` when NVFlare does not know it).
    """
    rc = result.return_code
    if rc not in (RC.OK, FlareRC.EARLY_TERMINATION):
        return make_reply(rc if rc in _FLARE_RCS else FlareRC.EXECUTION_EXCEPTION)
    if not isinstance(result.data, dict):
        return make_reply(FlareRC.EXECUTION_RESULT_ERROR)
    meta = dict(result.meta)
    # What the site added to a task's meta (and the Client API puts in a result's) travels as
    # NVFlare's Client API sends it: the data kind as the DXO's, the rounds as headers.
    kind = meta.pop(MetaKey.DATA_KIND, DataKind.WEIGHTS)
    current_round = meta.pop(MetaKey.CURRENT_ROUND, None)
    total_rounds = meta.pop(MetaKey.TOTAL_ROUND, None)
    data_kind = DataKind.APP_DEFINED if app_defined else kind
    try:
        shareable = DXO(data_kind=data_kind, data=result.data, meta=meta).to_shareable()
    except Exception:
        return make_reply(FlareRC.EXECUTION_RESULT_ERROR)
    if current_round is not None:
        shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    if total_rounds is not None:
        shareable.set_header(AppConstants.NUM_ROUNDS, total_rounds)
    shareable.set_return_code(rc)
    return shareable
