"""Metrics writers with the shapes of NVFlare's (``nvflare.client.tracking``): TensorBoard's
`SummaryWriter`, MLflow's `MLflowWriter`, W&B's `WandBWriter`. Each call is one
`flare_agent_async.client.log` record with NVFlare's data type and writer name; inside NVFlare,
`AgentExecutor` fires it as NVFlare's analytics event, so the server's receivers get it as they
would from NVFlare's own writers. Call ``flare.init()`` first.

An async trainer calls ``await client.log(key, value, AnalyticsDataType.SCALAR,
global_step=step, writer=LogWriterName.TORCH_TB)`` the same way.
"""

from __future__ import annotations

import enum
from typing import Any

from . import log as _log

__all__ = ["AnalyticsDataType", "LogWriterName", "MLflowWriter", "SummaryWriter", "WandBWriter"]


class AnalyticsDataType(str, enum.Enum):  # noqa: UP042 - the values are NVFlare's
    """What a logged value is (NVFlare's ``AnalyticsDataType``, value for value)."""

    SCALARS = "SCALARS"
    SCALAR = "SCALAR"
    IMAGE = "IMAGE"
    TEXT = "TEXT"
    LOG_RECORD = "LOG_RECORD"
    PARAMETER = "PARAMETER"
    PARAMETERS = "PARAMETERS"
    METRIC = "METRIC"
    METRICS = "METRICS"
    MODEL = "MODEL"
    TAG = "TAG"
    TAGS = "TAGS"
    INIT_DATA = "INIT_DATA"


class LogWriterName(str, enum.Enum):  # noqa: UP042 - the values are NVFlare's
    """Whose syntax a record follows (NVFlare's ``LogWriterName``, value for value)."""

    TORCH_TB = "TORCH_TENSORBOARD"
    MLFLOW = "MLFLOW"
    WANDB = "WEIGHTS_AND_BIASES"


class SummaryWriter:
    """TensorBoard's ``SummaryWriter``, as NVFlare's: replace the import, keep the calls."""

    def add_scalar(
        self, tag: str, scalar: float, global_step: int | None = None, **kwargs: Any
    ) -> None:
        """Log one value under ``tag``."""
        _log(
            tag,
            scalar,
            AnalyticsDataType.SCALAR,
            global_step=global_step,
            writer=LogWriterName.TORCH_TB,
            **kwargs,
        )

    def add_scalars(
        self, tag: str, scalars: dict[str, float], global_step: int | None = None, **kwargs: Any
    ) -> None:
        """Log several values under the parent ``tag``."""
        _log(
            tag,
            scalars,
            AnalyticsDataType.SCALARS,
            global_step=global_step,
            writer=LogWriterName.TORCH_TB,
            **kwargs,
        )

    def flush(self) -> None:
        """Nothing to flush: each record leaves when it is logged."""


class WandBWriter:
    """``wandb``'s ``log``, as NVFlare's ``WandBWriter``."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics at ``step``."""
        _log(
            "metrics",
            metrics,
            AnalyticsDataType.METRICS,
            global_step=step,
            writer=LogWriterName.WANDB,
        )


class MLflowWriter:
    """MLflow's logging calls, as NVFlare's ``MLflowWriter``."""

    def log_param(self, key: str, value: Any) -> None:
        """Log one parameter."""
        _log(key, value, AnalyticsDataType.PARAMETER, writer=LogWriterName.MLFLOW)

    def log_params(self, values: dict[str, Any]) -> None:
        """Log several parameters."""
        _log("params", values, AnalyticsDataType.PARAMETERS, writer=LogWriterName.MLFLOW)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Log one metric at ``step``."""
        _log(key, value, AnalyticsDataType.METRIC, global_step=step, writer=LogWriterName.MLFLOW)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log several metrics at ``step``."""
        _log(
            "metrics",
            metrics,
            AnalyticsDataType.METRICS,
            global_step=step,
            writer=LogWriterName.MLFLOW,
        )

    def log_text(self, text: str, artifact_file_path: str) -> None:
        """Log text as an artifact at ``artifact_file_path`` in the run."""
        _log(
            "text",
            text,
            AnalyticsDataType.TEXT,
            path=artifact_file_path,
            writer=LogWriterName.MLFLOW,
        )

    def set_tag(self, key: str, tag: Any) -> None:
        """Set one tag."""
        _log(key, tag, AnalyticsDataType.TAG, writer=LogWriterName.MLFLOW)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set several tags."""
        _log("tags", tags, AnalyticsDataType.TAGS, writer=LogWriterName.MLFLOW)
