"""PyTorch Lightning on the Client API: `patch` a `Trainer`, and it trains federated.

As NVFlare's ``nvflare.client.lightning``, with the import line changed::

    import flare_agent_async.client.lightning as flare  # was: import nvflare.client.lightning

    trainer = Trainer(max_epochs=1, strategy="ddp", devices=2)
    flare.patch(trainer)  # init() on rank 0, and the callback below
    while flare.is_running():
        trainer.validate(model, datamodule=data)  # the global model's metrics
        trainer.fit(model, datamodule=data)  # trains it; the result goes back at the end

At the start of ``fit`` and ``validate`` rank 0 receives the task and every rank loads the global
weights: they reach the other ranks through the process group, as tensors, not pickled. After
``fit`` the local ``state_dict`` goes back with ``NUM_STEPS_CURRENT_ROUND`` and the validation
metrics; an evaluation task sends the metrics only. A task the site aborts stops ``fit`` on every
rank at the same batch, and nothing is sent. Needs ``lightning`` (or ``pytorch_lightning``).
"""

from __future__ import annotations

import copy
import importlib
import logging
from typing import Any

from . import (
    clear,
    get_config,
    get_job_id,
    get_site_name,
    init,
    is_aborted,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    send,
    shutdown,
    system_info,
)
from ._model import FLModel, MetaKey, ParamsType

__all__ = [
    "FLCallback",
    "FLModel",
    "ParamsType",
    "RestoreState",
    "clear",
    "get_config",
    "get_job_id",
    "get_site_name",
    "init",
    "is_aborted",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "shutdown",
    "system_info",
]

logger = logging.getLogger("flare_agent_async.client.lightning")

FL_META_KEY = "__fl_meta__"
"""A `LightningModule` attribute: a dict that goes with the result's meta, as NVFlare's."""


def _lightning() -> Any:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ModuleNotFoundError(
        "flare_agent_async.client.lightning needs PyTorch Lightning: "
        "pip install 'flare-agent-async[torch]'",
        name="lightning",
    )


pl = _lightning()
_VALIDATING = pl.trainer.states.TrainerFn.VALIDATING


def patch(
    trainer: Any,
    restore_state: bool = True,
    load_state_dict_strict: bool = True,
    update_fit_loop: bool = True,
    **init_options: Any,
) -> None:
    """Make ``trainer`` a federated trainer: `init` (rank 0 connects; the rank is the trainer's
    global rank) and `FLCallback`, with `RestoreState` unless ``restore_state`` is False.

    :param load_state_dict_strict: ``strict`` for loading the received weights.
    :param update_fit_loop: raise ``max_epochs`` and ``max_steps`` by one round's worth after
        each round, so that the next ``fit`` trains as long again.
    :param init_options: more arguments for `init` (``site``, ``agent_id``, ...).
    :raises RuntimeError: the trainer has several processes that Lightning would start itself:
        start every rank up front instead (torchrun), so that they can share the first task.
    """
    if trainer.world_size > 1:
        if not trainer.strategy.cluster_environment.creates_processes_externally:
            raise RuntimeError(
                "start every rank up front, with torchrun (python -m torch.distributed.run "
                "--nproc-per-node N script.py): Lightning would start the other ranks only "
                "inside fit(), after rank 0 received the first task alone"
            )
        # The process group now, not at the first fit(): the first is_running() and receive()
        # are collectives already. Lightning's own setup finds it made and goes on.
        trainer.strategy.setup_environment()
    callbacks = list(trainer.callbacks)
    if not any(isinstance(callback, FLCallback) for callback in callbacks):
        callbacks.append(
            FLCallback(
                rank=trainer.global_rank,
                load_state_dict_strict=load_state_dict_strict,
                update_fit_loop=update_fit_loop,
                **init_options,
            )
        )
    if restore_state and not any(isinstance(callback, RestoreState) for callback in callbacks):
        callbacks.append(RestoreState())
    trainer.callbacks = callbacks


class FLCallback(pl.Callback):  # type: ignore[misc,name-defined]
    """Receives at the start of ``fit``/``validate``, sends at their end (see the module)."""

    def __init__(
        self,
        rank: int = 0,
        load_state_dict_strict: bool = True,
        update_fit_loop: bool = True,
        **init_options: Any,
    ) -> None:
        super().__init__()
        init(rank=rank, **init_options)
        self.rank = rank
        self._strict = load_state_dict_strict
        self._update_fit_loop = update_fit_loop
        self.current_round: int | None = None
        self.metrics: dict[str, Any] | None = None
        self._epochs_per_round: int | None = None
        self._steps_per_round: int | None = None
        self._pending: FLModel | None = None  # received by validate, for the fit that follows
        self._training = self._evaluating = self._round_started = self._aborted = False
        self._start_step = 0

    def reset_state(self, trainer: Any) -> None:
        """Ready for the next round: the fit loop is extended by one round's epochs and steps."""
        if self.current_round is not None:
            if self._epochs_per_round is None and trainer.max_epochs and trainer.max_epochs > 0:
                self._epochs_per_round = trainer.max_epochs
            if self._steps_per_round is None and trainer.max_steps and trainer.max_steps > 0:
                self._steps_per_round = trainer.max_steps
            trainer.num_sanity_val_steps = 0  # the sanity check is for the first round only
            if self._update_fit_loop:
                if self._epochs_per_round is not None and trainer.current_epoch:
                    trainer.fit_loop.max_epochs = self._epochs_per_round + trainer.current_epoch
                if self._steps_per_round is not None and trainer.global_step:
                    trainer.fit_loop.epoch_loop.max_steps = (
                        self._steps_per_round + trainer.global_step
                    )
        self.metrics = self._pending = None
        self._round_started = self._aborted = False
        clear()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model, self._pending = self._pending, None
        if model is None:
            model = self._receive(pl_module)
        if model is not None and self._training:
            self._start_step = trainer.global_step
            self._round_started = True

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if self._round_started and is_aborted():  # a collective: every rank stops together
            self._aborted = True
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._training:
            return
        if self._aborted:
            logger.warning("the task was aborted: its result is not sent")
        else:
            meta = dict(getattr(pl_module, FL_META_KEY, None) or {})
            meta.setdefault(MetaKey.NUM_STEPS_CURRENT_ROUND, trainer.global_step - self._start_step)
            state = pl_module.cpu().state_dict()
            send(FLModel(params=state, metrics=self.metrics, meta=meta), clear_cache=False)
        self.reset_state(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._standalone_validation(trainer):
            model = self._receive(pl_module)
            if model is not None and self._training:
                self._pending = model

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._standalone_validation(trainer):
            self.metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
            if self._evaluating:
                send(FLModel(metrics=self.metrics), clear_cache=False)
                self.reset_state(trainer)

    def _standalone_validation(self, trainer: Any) -> bool:
        """A ``validate`` call of its own, before the round's ``fit`` (not fit's own checks)."""
        return self.metrics is None and not self._round_started and trainer.state.fn == _VALIDATING

    def _receive(self, pl_module: Any) -> FLModel | None:
        """The task's model, on every rank, loaded into the module."""
        model = receive()
        if model is None:
            self._training = self._evaluating = False
            return None
        self._training, self._evaluating = is_train(), is_evaluate()
        if model.params:
            torch = importlib.import_module("torch")
            params = {key: torch.as_tensor(value) for key, value in model.params.items()}
            missing, unexpected = pl_module.load_state_dict(params, strict=self._strict)
            if missing or unexpected:
                logger.warning(
                    "loaded the global weights: missing %s, unexpected %s", missing, unexpected
                )
        if model.current_round is not None:
            self.current_round = model.current_round
        return model


class RestoreState(pl.Callback):  # type: ignore[misc,name-defined]
    """Keeps the optimizers', scaler's and learning rate schedulers' states from one round's
    ``fit`` to the next (each ``fit`` would start them afresh)."""

    def __init__(self) -> None:
        super().__init__()
        self._optimizers: list[Any] = []
        self._scaler: Any = None
        self._schedulers: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._optimizers:
            return
        trainer.strategy.load_optimizer_state_dict({"optimizer_states": self._optimizers})
        if self._scaler is not None and trainer.scaler is not None:
            trainer.scaler.load_state_dict(self._scaler)
        for config, state in zip(trainer.lr_scheduler_configs, self._schedulers, strict=False):
            config.scheduler.load_state_dict(state)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._optimizers = [
            copy.deepcopy(optimizer.state_dict()) for optimizer in trainer.optimizers
        ]
        self._scaler = copy.deepcopy(trainer.scaler.state_dict()) if trainer.scaler else None
        self._schedulers = [
            copy.deepcopy(config.scheduler.state_dict()) for config in trainer.lr_scheduler_configs
        ]
