"""`use_agent_executor`: NVFlare's job recipes, `AgentExecutor` in place of their script runners.

A recipe (``FedAvgRecipe``, ``CyclicRecipe``, ...) puts NVFlare's ``ScriptRunner`` on its clients,
which adds a ``ClientAPIExecutor`` to the client app to run ``train_script``. This module replaces
each of those executors with an `AgentExecutor` that launches the same script, with the same
arguments, for the same tasks. The server side is left as it is.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, TypedDict, TypeVar, Unpack

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.job_config.api import FedJob
from nvflare.job_config.fed_app_config import ClientAppConfig

from ._executor import AgentExecutor

__all__ = ["ExecutorOptions", "use_agent_executor"]

R = TypeVar("R")

_PACKAGE = "flare_agent_async"
_PYTHONS = ("python", "python3")
"""Interpreters named without a path: the launched trainer gets the client job's own Python."""
_FROM_THE_RECIPE = ("launch", "client_config")
_EXCHANGE_FORMATS = ("raw", "numpy", "pytorch")


class ExecutorOptions(TypedDict, total=False):
    """`AgentExecutor`'s options that `use_agent_executor` passes on; see `AgentExecutor`."""

    agent_id: str | None
    listen_url: str
    url_file: str | None
    launch_stop_timeout: float
    agent_connect_timeout: float
    task_timeout: float | None
    heartbeat_interval: float
    heartbeat_timeout: float
    reconnect_timeout: float
    secret_env: str | None
    tls_certfile: str | None
    tls_keyfile: str | None
    tls_client_ca: str | None
    abort_check_interval: float
    backend: str
    relay_results: bool
    relay_tasks: bool


def use_agent_executor(recipe: R, **options: Unpack[ExecutorOptions]) -> R:
    """Run the recipe's training scripts on `AgentExecutor` instead of NVFlare's script runner.

    Every client-side ``ClientAPIExecutor`` the recipe's ``ScriptRunner`` made (for every site,
    with per-site settings where the recipe has them) becomes an `AgentExecutor` for the same
    tasks that launches the same script with the same arguments and command, as an external
    process whether or not the runner launched one, with the runner's task names and
    ``params_transfer_type`` (for `flare_agent_async.client`). A command that starts with
    ``python`` or ``python3`` runs the client job's own Python (``{python}``). The recipe's
    training script then imports ``flare_agent_async.client as flare`` instead of
    ``nvflare.client``. Call it where NVFlare's own helpers (``add_experiment_tracking``) go:
    after ``set_per_site_config``. A ``FedJob`` built by hand with ``ScriptRunner`` is converted
    the same way.

    :param options: `AgentExecutor`'s options (``listen_url``, ``tls_certfile``, ``secret_env``,
        ``task_timeout``, ...); ``launch`` and ``client_config`` come from the recipe.
    :returns: the recipe (or job), changed.
    :raises TypeError: ``recipe`` is neither an NVFlare recipe nor a ``FedJob``; an option is
        unknown or comes from the recipe.
    :raises ValueError: an option's value is bad; the recipe has no script runner, or one this
        cannot convert (attach mode, ``launch_once=False``, TensorFlow's exchange format). The
        recipe is unchanged then.
    """
    taken = sorted(set(options) & set(_FROM_THE_RECIPE))
    if taken:
        raise TypeError(
            f"use_agent_executor() got {', '.join(taken)}: it comes from the recipe's script runner"
        )
    AgentExecutor(launch="trainer", **options)  # an unknown option or a bad value fails here
    job = recipe if isinstance(recipe, FedJob) else getattr(recipe, "_job", None)
    if not isinstance(job, FedJob):
        raise TypeError(f"expected an NVFlare job recipe, got {type(recipe).__name__}")
    # As NVFlare's own recipe helpers do: create the client apps a recipe makes lazily, then
    # look at the job's deploy map, for which FedJob has no public accessor.
    prepare = getattr(recipe, "_ensure_client_apps_prepared", None)
    if prepare is not None:
        prepare()
    runners, others = [], []
    for app in getattr(job, "_deploy_map", {}).values():
        config = app.app_config
        if isinstance(config, ClientAppConfig):
            for definition in config.executors:
                executor = definition.executor
                if isinstance(executor, ClientAPIExecutor):
                    runners.append(definition)
                else:
                    others.append(type(executor).__name__)
    if not runners:
        found = ", ".join(others) if others else "no client executor"
        raise ValueError(f"recipe {job.name!r} has no script runner to replace; it has {found}")
    # Every executor is converted before any is replaced: a failure leaves the recipe whole.
    converted: dict[int, AgentExecutor] = {}
    for definition in runners:
        if id(definition.executor) not in converted:
            converted[id(definition.executor)] = _agent_executor(definition.executor, options)
    for definition in runners:
        definition.executor = converted[id(definition.executor)]
    packages = list(job.job.app_packages)
    if _PACKAGE not in packages:
        # Installed on the sites: the job names its classes and does not copy its source.
        job.set_app_packages([*packages, _PACKAGE])
    return recipe


def _agent_executor(runner: ClientAPIExecutor, options: ExecutorOptions) -> AgentExecutor:
    """The `AgentExecutor` that does what ``runner`` would. Its settings are read from the
    attributes NVFlare's job export reads too (each argument, kept under ``_`` + its name)."""
    settings: dict[str, Any] = vars(runner)
    mode = settings["_execution_mode"]
    if mode == ExecutionMode.EXTERNAL_PROCESS:
        command = settings["_command"]
        argv = shlex.split(command) if isinstance(command, str) else list(command)
    elif mode == ExecutionMode.IN_PROCESS:
        script = settings["_task_script_path"]
        script = os.path.basename(script) if os.path.isabs(script) else script
        argv = ["python3", "-u", f"custom/{script}", *shlex.split(settings["_task_script_args"])]
    else:
        raise ValueError(f"cannot convert a ClientAPIExecutor in {mode!r} mode: it starts nothing")
    if not settings["_launch_once"]:
        raise ValueError(
            "cannot convert a script runner with launch_once=False: AgentExecutor launches its "
            "trainer once per job, and the Client API script loops over the tasks"
        )
    # The command is a format string for AgentExecutor: braces of the user's are kept as they are.
    parts = [shlex.quote(part.replace("{", "{{").replace("}", "}}")) for part in argv]
    if parts and argv[0] in _PYTHONS:
        parts[0] = "{python}"
    exchange_format = _value(settings["_params_exchange_format"])
    if exchange_format not in _EXCHANGE_FORMATS:
        raise ValueError(
            f"cannot convert a script runner with the {exchange_format!r} exchange format: the "
            f"Client API here exchanges {', '.join(_EXCHANGE_FORMATS)}"
        )
    return AgentExecutor(
        launch=" ".join(parts),
        client_config={
            "train_task_name": settings["_train_task_name"],
            "eval_task_name": settings["_evaluate_task_name"],
            "submit_model_task_name": settings["_submit_model_task_name"],
            "transfer_type": _value(settings["_params_transfer_type"]),
            "params_exchange_format": exchange_format,
        },
        **options,
    )


def _value(setting: Any) -> str:
    """An NVFlare setting's plain string: its enums are str enums."""
    return str(getattr(setting, "value", setting))
