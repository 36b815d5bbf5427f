"""`AsyncClient`, NVFlare's Client API over `AsyncFlareAgent`; `Client`, the same for blocking
scripts, through anyio's portal (as `SyncFlareAgent`)."""

from __future__ import annotations

import enum
import json
import logging
import os
import ssl
import weakref
from types import TracebackType
from typing import Any, Self

import anyio

from .._environment import (
    CLIENT_SETTINGS,
    ENV_AGENT_ID,
    ENV_CLIENT_CONFIG,
    ENV_JOB_ID,
    ENV_SECRET,
    ENV_SITE_NAME,
    ENV_URL,
)
from .._portal import BACKENDS, PortalRunner
from ..agent import AsyncFlareAgent
from ..defs import RC, TaskResult
from ..exceptions import AgentClosed
from ..transports import Connector
from ._exchange import ClientConfig, Exchange
from ._model import FLModel, ParamsType
from ._ranks import Collective, resolve_rank

__all__ = ["AsyncClient", "Client"]

logger = logging.getLogger("flare_agent_async.client")


def _setting(value: str | None, variable: str, what: str) -> str:
    if value is not None:
        return value
    found = os.environ.get(variable)
    if not found:
        raise ValueError(
            f"no {what}: pass it to init(), or set {variable} (AgentExecutor(launch=...) does)"
        )
    return found


def _configured(arguments: dict[str, str | None]) -> dict[str, str]:
    """Each setting from its argument, else from ``FLARE_AGENT_CLIENT_CONFIG``, else its default.

    :raises ValueError: the variable is not a JSON object of known settings with str values.
    """
    found = os.environ.get(ENV_CLIENT_CONFIG)
    configured: dict[str, Any] = {}
    if found:
        try:
            configured = json.loads(found)
        except ValueError as exc:
            raise ValueError(f"{ENV_CLIENT_CONFIG} is not JSON: {exc}") from exc
        if not isinstance(configured, dict):
            raise ValueError(f"{ENV_CLIENT_CONFIG} must be a JSON object, got {found!r}")
        unknown = sorted(set(configured) - set(CLIENT_SETTINGS))
        if unknown:
            raise ValueError(f"{ENV_CLIENT_CONFIG} has unknown settings: {', '.join(unknown)}")
        for name, value in configured.items():
            if not isinstance(value, str):
                raise ValueError(f"{ENV_CLIENT_CONFIG}: {name} must be a string, got {value!r}")
    return {
        name: given if (given := arguments[name]) is not None else configured.get(name, default)
        for name, default in CLIENT_SETTINGS.items()
    }


class AsyncClient:
    """NVFlare's Client API for an async trainer, on asyncio or trio::

        async with AsyncClient() as flare:  # configured by AgentExecutor's environment
            while await flare.is_running():
                model = await flare.receive()
                params = train(model.params)
                await flare.send(FLModel(params=params, metrics={"accuracy": acc}))

    Where the site is, who the agent is and its job come from the arguments, else from the
    environment a launched trainer finds (``FLARE_AGENT_URL``, ``FLARE_AGENT_SITE_NAME``,
    ``FLARE_AGENT_ID``, ``FLARE_AGENT_JOB_ID``, ``FLARE_AGENT_SECRET``).

    Only rank 0 (the ``rank`` argument, else ``RANK``, else 0) talks to the site; on other ranks
    `receive` returns None, `is_running` False and `send` sends nothing, as NVFlare's do. (The
    blocking `Client` does better where ``torch.distributed`` is initialised: every rank gets
    rank 0's answers.)

    The task names, transfer type and exchange format left unset come from
    ``FLARE_AGENT_CLIENT_CONFIG`` (a JSON object; `AgentExecutor`'s ``client_config`` sets it),
    else from NVFlare's defaults (``train``, ``validate``, ``submit_model``, ``FULL``, ``raw``).

    :param transfer_type: ``"DIFF"`` sends the change of full params since they were received.
    :param params_exchange_format: ``"pytorch"``: received arrays are torch tensors (sharing
        their memory), and tensors sent go as numpy arrays, as NVFlare's PyTorch exchange does;
        ``"raw"`` or ``"numpy"``: params go as they are.
    :param config: more entries for `get_config`.
    :raises ValueError: the site, site name or agent id is given nowhere; a bad option.
    """

    def __init__(
        self,
        site: str | Connector | None = None,
        *,
        agent_id: str | None = None,
        site_name: str | None = None,
        job_id: str | None = None,
        secret: bytes | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        rank: str | int | None = None,
        train_task_name: str | None = None,
        eval_task_name: str | None = None,
        submit_model_task_name: str | None = None,
        transfer_type: str | None = None,
        params_exchange_format: str | None = None,
        config: dict[str, Any] | None = None,
        connect_timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
        close_timeout: float = 10.0,
    ) -> None:
        self.rank = resolve_rank(rank)
        site_name = _setting(site_name, ENV_SITE_NAME, "site name")
        settings = _configured(
            {
                "train_task_name": train_task_name,
                "eval_task_name": eval_task_name,
                "submit_model_task_name": submit_model_task_name,
                "transfer_type": transfer_type,
                "params_exchange_format": params_exchange_format,
            }
        )
        self._exchange = Exchange(
            ClientConfig(
                site_name=site_name,
                job_id=job_id if job_id is not None else os.environ.get(ENV_JOB_ID),
                extra=dict(config or {}),
                **settings,
            )
        )
        self._agent: AsyncFlareAgent | None = None
        if self.rank == "0":
            self._agent = AsyncFlareAgent(
                site if site is not None else _setting(None, ENV_URL, "site URL"),
                agent_id=_setting(agent_id, ENV_AGENT_ID, "agent id"),
                site_name=site_name,
                job_id=self._exchange.config.job_id,
                secret=secret if secret is not None else os.environ.get(ENV_SECRET) or None,
                ssl_context=ssl_context,
                connect_timeout=connect_timeout,
                reconnect_timeout=reconnect_timeout,
                close_timeout=close_timeout,
            )

    async def __aenter__(self) -> Self:
        if self._agent is not None:
            await self._agent.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._agent is not None:
            await self._agent.__aexit__(exc_type, exc, tb)

    def _rank_0(self, what: str) -> AsyncFlareAgent:
        if self._agent is None:
            raise RuntimeError(f"only rank 0 can call {what}!")
        return self._agent

    # -- the training loop ------------------------------------------------------------------------

    async def receive(self, timeout: float | None = None) -> FLModel | None:
        """The model of the next task, or of the task held (until `send` or `clear`).

        :returns: the model; None if none came within ``timeout`` seconds, once the site said
            goodbye (the job is over), or on a rank other than 0.
        :raises AgentClosed: the site is gone (it did not come back within ``reconnect_timeout``).
        """
        agent = self._agent
        if agent is None:
            return None
        model = self._exchange.held()
        if model is not None:
            return model
        with anyio.move_on_after(timeout):
            while True:
                try:
                    task = await agent.get_task()
                except AgentClosed:  # the job is over, unless the agent failed
                    if agent.failure is not None:
                        raise
                    return None
                assert task is not None
                try:
                    return self._exchange.take(task)
                except ValueError as exc:  # not a model: the site hears BAD_TASK_DATA
                    logger.error("task %s cannot be read as a model: %s", task.task_id, exc)
                    await agent.submit_result(TaskResult({}, None, RC.BAD_TASK_DATA))
        return None

    async def send(self, model: FLModel, clear_cache: bool = True) -> None:
        """Send the result of the task held: ``model``, ours or NVFlare's `FLModel`.

        With ``clear_cache`` (the default) both models' params are dropped afterwards and the
        next `receive` waits for the next task. A result the site did not keep (the task was
        aborted meanwhile, or the job ended) is logged, not raised.

        :raises RuntimeError: nothing was received, or its result was sent already.
        :raises TypeError: ``model`` is not an `FLModel`.
        :raises ValueError: it has neither params nor metrics.
        """
        agent = self._agent
        if agent is None:
            return
        result = self._exchange.result(model)
        task = self._exchange.task
        kept = await agent.submit_result(result)
        self._exchange.sent_result(model, clear_cache=clear_cache)
        if not kept:
            logger.warning("the site did not keep the result of task %s", task)

    async def is_running(self) -> bool:
        """Whether the job goes on: waits for the next task (which `receive` then returns).

        :returns: False once the site said goodbye, and on ranks other than 0.
        :raises AgentClosed: the site is gone.
        """
        return await self.receive() is not None

    async def log(self, key: str, value: Any, data_type: Any = None, **kwargs: Any) -> None:
        """Send a metric to the site, tagged with the task held, as NVFlare's ``log``:
        ``data_type`` is an `AnalyticsDataType` (ours, NVFlare's or its name), ``kwargs`` go to
        the receiver (``global_step``, ``writer``, ...). Inside NVFlare, `AgentExecutor` fires it
        as NVFlare's analytics event, for the server's TensorBoard, MLflow or W&B receivers.

        :raises RuntimeError: on a rank other than 0.
        :raises TypeError: the value or an argument cannot be sent.
        """
        agent = self._rank_0("log")
        options = {name: _plain(option) for name, option in kwargs.items()}
        step = options.get("global_step", options.get("step"))
        kind = None if data_type is None else str(_plain(data_type))
        await agent.log(key, value, step, data_type=kind, options=options)

    async def shutdown(self) -> None:
        """Stop the agent: results still unacknowledged are delivered first."""
        if self._agent is not None:
            await self._agent.stop()

    # -- what the task and the job are ------------------------------------------------------------

    def clear(self) -> None:
        """Let go of the task held, unanswered; the next `receive` waits for the next task."""
        self._exchange.clear()

    def is_aborted(self) -> bool:
        """Whether the site aborted the task held: stop working on it (its result would not be
        kept); the next `receive` waits for the next task. False on ranks other than 0."""
        task = self._exchange.task
        return task is not None and task.aborted

    def get_task_name(self) -> str:
        """The name of the task held.

        :raises RuntimeError: no task is held, or on a rank other than 0.
        """
        self._rank_0("get_task_name")
        return self._exchange.task_name()

    def is_train(self) -> bool:
        """Whether the task held is the training task (``train_task_name``)."""
        return self.get_task_name() == self._exchange.config.train_task_name

    def is_evaluate(self) -> bool:
        """Whether the task held is the evaluation task (``eval_task_name``)."""
        return self.get_task_name() == self._exchange.config.eval_task_name

    def is_submit_model(self) -> bool:
        """Whether the task held asks for the local model (``submit_model_task_name``)."""
        return self.get_task_name() == self._exchange.config.submit_model_task_name

    def get_job_id(self) -> str:
        """The job's id (empty when none was given)."""
        return self._exchange.config.job_id or ""

    def get_site_name(self) -> str:
        """The site's name."""
        return self._exchange.config.site_name

    def system_info(self) -> dict[str, Any]:
        """The site's name and the job's id."""
        return {"site_name": self.get_site_name(), "job_id": self.get_job_id()}

    def get_config(self) -> dict[str, Any]:
        """The configuration: site, job, task names, transfer type, and what ``config`` added."""
        return self._exchange.config.as_dict()


def _plain(value: Any) -> Any:
    """An enum (NVFlare's ``AnalyticsDataType.SCALAR``, say) as its value; else ``value``."""
    return value.value if isinstance(value, enum.Enum) else value


class Client:
    """`AsyncClient` for blocking scripts: the same methods, blocking, on an event loop thread
    of its own (anyio's portal, as `SyncFlareAgent`). Start it with `start` (``init()`` does)
    and end it with `shutdown`.

    In a trainer of many processes with ``torch.distributed`` initialised (torchrun, DDP,
    Lightning), every rank calls the same methods in the same order, and `receive`,
    `is_running`, `send` and `is_aborted` are collectives: rank 0 asks the site and every rank
    gets its answer (the same model, the same end of the job, the same abort, rank 0's error
    raised as a `RankFailed`); the task's name and kind are known on every rank. Without a
    process group, ranks other than 0 get None and False, as NVFlare's.

    Takes `AsyncClient`'s arguments, plus ``backend`` (``"asyncio"``, ``"trio"``,
    ``"uvloop"``).
    """

    def __init__(self, *args: Any, backend: str = "asyncio", **options: Any) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self._client = AsyncClient(*args, **options)
        self._runner = PortalRunner(self._client, backend, name=f"flare-client-{self._client.rank}")
        self._started = False
        self._shared: FLModel | None = None  # rank 0: the model every rank has
        self._held: FLModel | None = None  # other ranks: rank 0's model, and its task's name
        self._task_name: str | None = None

    @property
    def rank(self) -> str:
        """The process's rank; only rank 0 talks to the site."""
        return self._client.rank

    def start(self) -> None:
        """Connect to the site (on rank 0); returns once the site welcomed the agent."""
        self._runner.start()
        self._started = True
        # Stop the loop when this object is collected, or at interpreter exit.
        weakref.finalize(self, self._runner.close)

    def receive(self, timeout: float | None = None) -> FLModel | None:
        """See `AsyncClient.receive`; a collective in a process group."""
        collective = Collective.current()
        if collective is None:
            return self._runner.call(self._client.receive, timeout)
        if collective.rank != 0:
            shared = _raised(collective.share(), "receive")
            if "model" in shared:
                self._held, self._task_name = _model_of(shared["model"]), shared["task_name"]
            elif "held" not in shared:
                self._held = self._task_name = None
            return self._held
        try:
            model = self._runner.call(self._client.receive, timeout)
        except Exception as exc:
            collective.share(_failure(exc))
            raise
        if model is None:
            collective.share({})
        elif model is self._shared:
            collective.share({"held": True})
        else:
            collective.share({"model": _fields(model), "task_name": self._client.get_task_name()})
        self._shared = model
        return model

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        """See `AsyncClient.send`; a collective in a process group, where ranks other than 0
        send nothing and return when rank 0's result went (or raise its error)."""
        collective = Collective.current()
        if collective is not None and collective.rank != 0:
            _raised(collective.share(), "send")
            if clear_cache:
                self._held = self._task_name = None
            return
        try:
            self._runner.call(self._client.send, model, clear_cache)
        except Exception as exc:
            if collective is not None:
                collective.share(_failure(exc))
            raise
        if collective is not None:
            collective.share({})
        if clear_cache:
            self._shared = None

    def is_running(self) -> bool:
        """See `AsyncClient.is_running`; a collective in a process group."""
        return self.receive() is not None

    def is_aborted(self) -> bool:
        """See `AsyncClient.is_aborted`; a collective in a process group, so that every rank
        sees an abort at the same step and they stop together."""
        collective = Collective.current()
        if collective is None:
            return self._runner.call_sync(self._client.is_aborted)
        if collective.rank != 0:
            return collective.share_flag()
        return collective.share_flag(self._runner.call_sync(self._client.is_aborted))

    def log(self, key: str, value: Any, data_type: Any = None, **kwargs: Any) -> None:
        """See `AsyncClient.log`."""

        async def log() -> None:
            await self._client.log(key, value, data_type, **kwargs)

        self._runner.call(log)

    def shutdown(self) -> None:
        """Stop the agent and its thread; results still unacknowledged are delivered first."""
        if self._started:
            self._runner.close()

    def clear(self) -> None:
        """See `AsyncClient.clear`."""
        self._held = self._task_name = self._shared = None
        self._runner.call_sync(self._client.clear)

    def get_task_name(self) -> str:
        """See `AsyncClient.get_task_name`; on every rank in a process group."""
        if self.rank != "0" and Collective.current() is not None:
            if self._task_name is None:
                raise RuntimeError("no task was received: call receive() first")
            return self._task_name
        return self._runner.call_sync(self._client.get_task_name)

    def is_train(self) -> bool:
        """See `AsyncClient.is_train`."""
        return self.get_task_name() == self._client._exchange.config.train_task_name

    def is_evaluate(self) -> bool:
        """See `AsyncClient.is_evaluate`."""
        return self.get_task_name() == self._client._exchange.config.eval_task_name

    def is_submit_model(self) -> bool:
        """See `AsyncClient.is_submit_model`."""
        return self.get_task_name() == self._client._exchange.config.submit_model_task_name

    def get_job_id(self) -> str:
        """See `AsyncClient.get_job_id`."""
        return self._client.get_job_id()

    def get_site_name(self) -> str:
        """See `AsyncClient.get_site_name`."""
        return self._client.get_site_name()

    def system_info(self) -> dict[str, Any]:
        """See `AsyncClient.system_info`."""
        return self._client.system_info()

    def get_config(self) -> dict[str, Any]:
        """See `AsyncClient.get_config`."""
        return self._client.get_config()


class RankFailed(RuntimeError):
    """Rank 0 failed in a call every rank made together; its error, on another rank."""


def _failure(exc: Exception) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}"}


def _raised(shared: dict[str, Any], what: str) -> dict[str, Any]:
    """Rank 0's answer; its error raised here."""
    error = shared.get("error")
    if error is not None:
        raise RankFailed(f"rank 0 failed in {what}(): {error}")
    return shared


def _fields(model: FLModel) -> dict[str, Any]:
    params_type = model.params_type
    return {
        "params": model.params,
        "params_type": None if params_type is None else ParamsType(params_type).value,
        "metrics": model.metrics,
        "current_round": model.current_round,
        "total_rounds": model.total_rounds,
        "meta": model.meta,
    }


def _model_of(fields: dict[str, Any]) -> FLModel:
    return FLModel(**fields)
