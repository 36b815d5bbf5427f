"""NVIDIA FLARE's Client API on this library's agent: a script written for NVFlare changes one
import line::

    import flare_agent_async.client as flare  # was: import nvflare.client as flare
    from flare_agent_async.client import FLModel  # or NVFlare's own FLModel

    flare.init()  # configured by AgentExecutor(launch=...)'s environment
    while flare.is_running():
        model = flare.receive()
        params = train(model.params)
        flare.send(FLModel(params=params, metrics={"accuracy": acc}))

The module functions block; they drive one `Client`, made by `init`. `AsyncClient` is the same
for async trainers, on asyncio or trio. What each call does after an abort or the end of the job
is in ``docs/client.md``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ._client import AsyncClient, Client, RankFailed
from ._exchange import ClientConfig, model_from_task, params_diff, result_from_model
from ._model import FLModel, FLModelConst, MetaKey, ParamsType, as_fl_model
from ._ranks import resolve_rank, share

__all__ = [
    "AsyncClient",
    "Client",
    "ClientConfig",
    "FLModel",
    "FLModelConst",
    "MetaKey",
    "ParamsType",
    "RankFailed",
    "as_fl_model",
    "clear",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_aborted",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "model_from_task",
    "params_diff",
    "receive",
    "resolve_rank",
    "result_from_model",
    "send",
    "share",
    "shutdown",
    "system_info",
]

_lock = threading.Lock()
_client: Client | None = None


def init(rank: str | int | None = None, config_file: str | None = None, **options: Any) -> Client:
    """Start the Client API: connect to the site (on rank 0) and return the `Client`.

    With no arguments it is configured by the environment `AgentExecutor(launch=...)` sets;
    ``options`` are `AsyncClient`'s (``site``, ``agent_id``, ``site_name``, ``job_id``,
    ``secret``, ``transfer_type``, ...) and ``backend``. A second call returns the same client
    and changes nothing, as NVFlare's does.

    :raises ValueError: ``config_file`` is given (this client takes its settings as arguments),
        or a setting is missing.
    :raises TypeError: an option is unknown.
    :raises ConnectionRejected: the site refused the agent.
    :raises TransportError: no connection within ``connect_timeout``.
    """
    global _client
    if config_file is not None:
        raise ValueError(
            "config_file is NVFlare's own client configuration; pass settings to init() instead"
        )
    with _lock:
        if _client is not None:
            logging.getLogger("flare_agent_async.client").warning(
                "init() was called more than once; the later calls are ignored"
            )
            return _client
        client = Client(rank=rank, **options)
        client.start()
        _client = client
        return client


def _current() -> Client:
    client = _client
    if client is None:
        raise RuntimeError("the Client API is not started: call flare.init() first")
    return client


def receive(timeout: float | None = None) -> FLModel | None:
    """The model of the next task, or of the task held; see `AsyncClient.receive`."""
    return _current().receive(timeout)


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Send the result of the task held; see `AsyncClient.send`."""
    _current().send(model, clear_cache)


def is_running() -> bool:
    """Whether the job goes on (waits for the next task); see `AsyncClient.is_running`."""
    return _current().is_running()


def is_aborted() -> bool:
    """Whether the site aborted the task held; see `Client.is_aborted`."""
    return _current().is_aborted()


def is_train() -> bool:
    """Whether the task held is the training task."""
    return _current().is_train()


def is_evaluate() -> bool:
    """Whether the task held is the evaluation task."""
    return _current().is_evaluate()


def is_submit_model() -> bool:
    """Whether the task held asks for the local model."""
    return _current().is_submit_model()


def get_task_name() -> str:
    """The name of the task held."""
    return _current().get_task_name()


def get_job_id() -> str:
    """The job's id."""
    return _current().get_job_id()


def get_site_name() -> str:
    """The site's name."""
    return _current().get_site_name()


def system_info() -> dict[str, Any]:
    """The site's name and the job's id."""
    return _current().system_info()


def get_config() -> dict[str, Any]:
    """The client's configuration."""
    return _current().get_config()


def log(key: str, value: Any, data_type: Any = None, **kwargs: Any) -> None:
    """Send a metric to the site; see `AsyncClient.log`."""
    _current().log(key, value, data_type, **kwargs)


def clear() -> None:
    """Let go of the task held, unanswered."""
    _current().clear()


def shutdown() -> None:
    """Stop the client: results still unacknowledged are delivered first; `init` may then start
    a new one."""
    global _client
    with _lock:
        client, _client = _client, None
    if client is not None:
        client.shutdown()
