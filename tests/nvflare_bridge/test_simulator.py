"""Real NVFlare jobs in NVFlare's simulator: 2 clients, 2 rounds of ScatterAndGather.

Each trainer adds 1 to every weight, so the global model after the job is the initial one plus 2.
One site's trainer is an `AsyncFlareAgent`, the other's a `SyncFlareAgent`, each its own process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

import _jobs
from nvflare.app_common.filters.exclude_vars import ExcludeVars
from nvflare.job_config.defs import FilterType

from flare_agent_async.nvflare import AgentExecutor

TRAINER = Path(__file__).with_name("trainer.py")
SITES = [f"site-{n}" for n in range(1, _jobs.CLIENTS + 1)]


def check_job(workspace: Path, out_dir: Path) -> None:
    model = _jobs.final_model(workspace)
    assert sorted(model) == sorted(_jobs.INITIAL)
    for name, initial in _jobs.INITIAL.items():
        np.testing.assert_array_equal(model[name], initial + _jobs.ROUNDS)
        assert model[name].dtype == initial.dtype
    assert _jobs.error_logs(workspace) == {}
    done = {site: (out_dir / f"{site}.done").read_text() for site in SITES}
    assert done == {"site-1": f"async {_jobs.ROUNDS}", "site-2": f"sync {_jobs.ROUNDS}"}


def test_agent_executor_runs_a_job_on_launched_agents(tmp_path: Path) -> None:
    """site-2's results go to the server array by array from its trainer (a `SyncFlareAgent`);
    site-1 has a result filter, which reads each result in the client job: its results come
    there whole."""
    out_dir = tmp_path / "trainers"
    out_dir.mkdir()
    launch = f"{sys.executable} {TRAINER} {{url}} {{site_name}} {{agent_id}} auto {out_dir}"
    executors = {
        site: AgentExecutor(agent_id="trainer", launch=launch, agent_connect_timeout=30)
        for site in SITES
    }
    job = _jobs.fedavg_job("agent_executor", executors, tmp_path / "initial.npz")
    job.to(
        ExcludeVars(["excludes_nothing"]),
        "site-1",
        tasks=["train"],
        filter_type=FilterType.TASK_RESULT,
    )
    started = time.monotonic()
    process, workspace = _jobs.start_simulator(job, tmp_path)
    assert _jobs.finish_simulator(process) == 0, (tmp_path / "simulator.out").read_text()[-3000:]
    print(f"2 clients x 2 rounds with AgentExecutor: {time.monotonic() - started:.1f} s")
    check_job(workspace, out_dir)
    urls = [(workspace / site / "simulate_job" / "flare_agent_async.url") for site in SITES]
    assert all(url.read_text().startswith("tcp://127.0.0.1:") for url in urls)
    relayed = Counter(
        site
        for path in workspace.rglob("log.txt")
        for line in path.read_text().splitlines()
        if "downloads the result's 2 arrays from the agent" in line
        for site in SITES
        if site in line
    )
    assert relayed == Counter({"site-2": _jobs.ROUNDS})


def test_our_agents_serve_a_stock_ipc_exchanger_job(tmp_path: Path) -> None:
    out_dir = tmp_path / "trainers"
    out_dir.mkdir()
    job = _jobs.ipc_exchanger_job(tmp_path / "initial.npz")
    started = time.monotonic()
    process, workspace = _jobs.start_simulator(job, tmp_path)
    trainers = []
    try:
        for site in SITES:
            url_file = _jobs.wait_for_file("cell_url.txt", workspace / site, process, 30)
            host_port = url_file.read_text().strip().partition("://")[2]
            command = [sys.executable, str(TRAINER), f"nvflare-ipc://{host_port}", site]
            trainers.append(subprocess.Popen([*command, "trainer", "auto", str(out_dir)]))
        assert _jobs.finish_simulator(process) == 0
        for trainer in trainers:
            assert trainer.wait(timeout=30) == 0
    finally:
        for trainer in trainers:
            trainer.kill()
            trainer.wait(timeout=10)
    print(f"2 clients x 2 rounds, IPCExchanger with our agents: {time.monotonic() - started:.1f} s")
    check_job(workspace, out_dir)
