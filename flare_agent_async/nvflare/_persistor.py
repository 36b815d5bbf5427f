"""`NpzModelPersistor`: a server-side persistor for a model that is a dict of numpy arrays."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import (
    ModelLearnable,
    ModelLearnableKey,
    make_model_learnable,
)
from nvflare.app_common.abstract.model_persistor import ModelPersistor

__all__ = ["NpzModelPersistor"]


class NpzModelPersistor(ModelPersistor):  # type: ignore[misc]
    """Loads the initial global model from an ``.npz`` file and saves each new one next to the job.

    The model is a dict of numpy arrays (the weights a `FlareSite` sends as task data). NVFlare's
    own persistors keep other kinds of models; this one needs nothing but numpy, and never pickles.

    :param initial_model: the ``.npz`` file of the initial model (absolute, or relative to the
        server app's directory).
    :param save_name: the file the latest global model is written to, in the job's run directory.
    """

    def __init__(self, initial_model: str, save_name: str = "global_model.npz") -> None:
        super().__init__()
        if not isinstance(initial_model, str) or not initial_model:
            raise ValueError(f"initial_model must be a path to an .npz file, got {initial_model!r}")
        if (
            not isinstance(save_name, str)
            or not save_name
            or os.path.basename(save_name) != save_name
        ):
            raise ValueError(f"save_name must be a plain file name, got {save_name!r}")
        self.initial_model = initial_model
        self.save_name = save_name

    def _app_dir(self, fl_ctx: FLContext) -> str:
        return str(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))

    def _run_dir(self, fl_ctx: FLContext) -> str:
        return str(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        """The latest saved model if there is one, else the initial model."""
        saved = os.path.join(self._run_dir(fl_ctx), self.save_name)
        path = saved if os.path.exists(saved) else self.initial_model
        if not os.path.isabs(path):
            path = os.path.join(self._app_dir(fl_ctx), path)
        with np.load(path, allow_pickle=False) as arrays:
            weights = {name: arrays[name] for name in arrays.files}
        self.log_info(fl_ctx, f"loaded a model of {len(weights)} arrays from {path}")
        return make_model_learnable(weights, {})

    def save_model(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        """Write the model's weights to ``save_name`` in the run directory, atomically."""
        weights: dict[str, Any] = model_learnable[ModelLearnableKey.WEIGHTS]
        path = os.path.join(self._run_dir(fl_ctx), self.save_name)
        partial = path + ".partial.npz"
        arrays = {name: np.asarray(value) for name, value in weights.items()}
        save: Any = np.savez  # its stubs take the first keyword for allow_pickle
        save(partial, **arrays)
        os.replace(partial, path)
