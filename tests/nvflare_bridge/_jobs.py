"""Build NVFlare jobs for the tests and run them in the simulator, bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import (
    InTimeAccumulateWeightedAggregator,
)
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import (
    FullModelShareableGenerator,
)
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.job_config.api import FedJob

from flare_agent_async.nvflare import NpzModelPersistor

ROUNDS = 2
CLIENTS = 2
SIMULATOR_TIMEOUT = 90.0
INITIAL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(4, dtype=np.float64)}


def fedavg_job(
    name: str,
    executor: Any,
    initial_model: Path,
    *,
    meta: dict[str, Any] | None = None,
    components: dict[str, Any] | None = None,
    rounds: int = ROUNDS,
    train_timeout: float = 60,
) -> FedJob:
    """ScatterAndGather over ``CLIENTS`` clients for ``rounds`` rounds, ``executor`` on each (or,
    for a dict, each site's own)."""
    np.savez(initial_model, **INITIAL)
    job = FedJob(name=name, min_clients=CLIENTS, meta_props=meta)
    job.set_app_packages(["flare_agent_async"])
    job.to(NpzModelPersistor(str(initial_model)), "server", id="persistor")
    job.to(FullModelShareableGenerator(), "server", id="shareable_generator")
    job.to(
        InTimeAccumulateWeightedAggregator(expected_data_kind="WEIGHTS"), "server", id="aggregator"
    )
    job.to(
        ScatterAndGather(
            min_clients=CLIENTS,
            num_rounds=rounds,
            wait_time_after_min_received=0,
            persistor_id="persistor",
            train_timeout=train_timeout,
            task_check_period=0.05,
        ),
        "server",
    )
    for name_, component in (components or {}).items():
        job.to_clients(component, id=name_)
    if isinstance(executor, dict):
        for site, one in executor.items():
            job.to(one, site, tasks=["train"])
    else:
        job.to_clients(executor, tasks=["train"])
    return job


def fedavg_controller_job(
    name: str, executor: Any, initial_model: Path, *, components: dict[str, Any] | None = None
) -> FedJob:
    """NVFlare's FLModel-based FedAvg controller over ``CLIENTS`` clients for ``ROUNDS`` rounds,
    with the same persistor, ``executor`` on each client."""
    from nvflare.app_common.workflows.fedavg import FedAvg

    np.savez(initial_model, **INITIAL)
    job = FedJob(name=name, min_clients=CLIENTS)
    job.set_app_packages(["flare_agent_async"])
    job.to(NpzModelPersistor(str(initial_model)), "server", id="persistor")
    job.to(FedAvg(num_clients=CLIENTS, num_rounds=ROUNDS, persistor_id="persistor"), "server")
    for name_, component in (components or {}).items():
        job.to_clients(component, id=name_)
    job.to_clients(executor, tasks=["train"])
    return job


def ipc_exchanger_job(initial_model: Path) -> FedJob:
    """The same job with NVFlare's stock IPCExchanger on each client (agent id ``trainer``,
    heartbeats every second), each client's cell URL written to ``cell_url.txt``."""
    from cell_url_reporter import CellURLReporter
    from nvflare.app_common.executors.ipc_exchanger import IPCExchanger

    return fedavg_job(
        "ipc_exchanger",
        IPCExchanger(agent_heartbeat_interval=1.0),
        initial_model,
        meta={"agent_id": "trainer"},
        components={"cell_url_reporter": CellURLReporter()},
    )


def allow_our_classes(workspace: Path) -> None:
    """The sites' class allow-list: NVFlare's defaults, this package, and NVFlare's cross-site
    evaluation, which its defaults leave out."""
    local = workspace / "local"
    local.mkdir(parents=True, exist_ok=True)
    extra = ["flare_agent_async.", "nvflare.app_common.workflows.cross_site_eval."]
    allow = [*DEFAULT_CLASS_ALLOW_LIST, *extra]
    (local / "resources.json").write_text(json.dumps({"class_allow_list": allow}))


def start_simulator(job: FedJob, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Export the job and start the simulator on it (2 clients, 2 threads) in its own group."""
    jobs = tmp_path / "jobs"
    job.export_job(str(jobs))
    workspace = tmp_path / "workspace"
    allow_our_classes(workspace)
    command = [
        sys.executable,
        "-m",
        "nvflare.private.fed.app.simulator.simulator",
        str(jobs / job.name),
        "-w",
        str(workspace),
        "-n",
        str(CLIENTS),
        "-t",
        str(CLIENTS),
    ]
    with (tmp_path / "simulator.out").open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, workspace


def finish_simulator(process: subprocess.Popen[bytes], timeout: float = SIMULATOR_TIMEOUT) -> int:
    """Wait for the simulator; on timeout kill its whole process group and fail."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        raise AssertionError(f"the simulator did not finish within {timeout} s") from None


def final_model(workspace: Path) -> dict[str, np.ndarray]:
    paths = sorted(workspace.rglob("global_model.npz"))
    assert len(paths) == 1, f"expected one saved global model under {workspace}, found {paths}"
    with np.load(paths[0], allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def error_logs(workspace: Path) -> dict[str, str]:
    """The non-empty error logs of every site, by path."""
    return {
        str(path.relative_to(workspace)): path.read_text()
        for path in workspace.rglob("error_log*.txt")
        if path.read_text().strip()
    }


def wait_for_file(
    path_glob: str, root: Path, process: subprocess.Popen[bytes], timeout: float
) -> Path:
    """Bounded wait for a file the job writes; fails if the simulator ends first."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        found = sorted(root.rglob(path_glob))
        if found:
            return found[0]
        if process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {path_glob} under {root} within {timeout} s")
