"""AgentExecutor in a deployed NVFlare: POC mode (server, two clients, admin) on this machine,
jobs submitted through the admin API, and the faults of a real deployment: a job aborted, a
client job process killed, a launched trainer killed. No process of a job may outlive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

import trustme
from _poc import (
    ADMIN,
    Poc,
    kill_all,
    processes_under,
    services_env,
    wait_until_gone,
    write_project,
)
from nvflare_bridge import _jobs

from flare_agent_async.nvflare import AgentExecutor

pytestmark = pytest.mark.deployment

HERE = Path(__file__).parent
TRAINER = HERE / "deployed_trainer.py"
JOB_TIMEOUT = 180.0
GONE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Poc]:
    """One POC deployment for the module; stopped even when a test fails, and whatever outlived
    the stop is killed and fails the module."""
    deployment = Poc(tmp_path_factory.mktemp("deployment"))
    try:
        deployment.start()
        yield deployment
    finally:
        killed = deployment.stop()
        deployment.remove()
    assert not killed, f"processes outlived 'nvflare poc stop': {killed}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, the site's certificate for 127.0.0.1, and a trainer's certificate (mutual TLS)."""
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    paths = {name: folder / f"{name}.pem" for name in ("ca", "site", "trainer")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(paths["site"]))
    ca.issue_cert("trainer@site-1").private_key_and_cert_chain_pem.write_to_path(
        str(paths["trainer"])
    )
    return paths


def submit(
    poc: Poc,
    folder: Path,
    name: str,
    executors: dict[str, AgentExecutor],
    rounds: int,
) -> str:
    """The suite's FedAvg job with each site's executor and the trainer script, submitted
    through the admin API; its id."""
    job = _jobs.fedavg_job(
        name, executors, folder / "initial.npz", rounds=rounds, train_timeout=600
    )
    for site in executors:
        job.to(str(TRAINER), site)
    job.export_job(str(folder / "jobs"))
    return str(poc.session().submit_job(str(folder / "jobs" / name)))


def trainer(mode: str, records: Path, *options: str) -> str:
    return f"{{python}} -u custom/{TRAINER.name} {mode} {records} " + " ".join(options)


def trainers(records: Path, *options: str, **executor_options: Any) -> dict[str, AgentExecutor]:
    """An async trainer on site-1, a sync one on site-2, with these options; reconnects end
    after 5 s."""
    return {
        site: AgentExecutor(
            agent_id="trainer",
            launch=trainer(mode, records, *options, "--reconnect", "5"),
            **executor_options,
        )
        for site, mode in (("site-1", "async"), ("site-2", "sync"))
    }


def events(records: Path, site: str) -> list[dict[str, Any]]:
    path = records / f"{site}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_event(records: Path, site: str, event: str, timeout: float = 90.0) -> dict[str, Any]:
    """Bounded polling until the site's trainer recorded ``event``; that record."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events(records, site) if e["event"] == event]
        if found:
            return found[0]
        assert time.monotonic() < deadline, (
            f"{site}'s trainer recorded no {event!r} within {timeout} s: {events(records, site)}"
        )
        time.sleep(0.2)


def wait_for_status(poc: Poc, job_id: str, timeout: float = JOB_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(poc.session().get_job_status(job_id))
        if status.startswith("FINISHED"):
            return status
        assert time.monotonic() < deadline, f"job {job_id} is {status} after {timeout} s"
        time.sleep(0.5)


def end_and_count(poc: Poc, job_id: str) -> None:
    """The job must end; then no process of it may be left."""
    if not wait_for_status(poc, job_id).startswith("FINISHED"):
        poc.session().abort_job(job_id)
    left = wait_until_gone(poc.workspace, job_id, GONE_TIMEOUT)
    assert not left, f"processes of job {job_id} outlived it by {GONE_TIMEOUT} s: {left}"


def error_logs(poc: Poc, job_id: str) -> dict[str, str]:
    return {
        str(path): path.read_text()
        for folder in poc.job_folders(job_id)
        for path in folder.rglob("error_log*.txt")
        if path.read_text().strip()
    }


# -- the tests ------------------------------------------------------------------------------------


def test_a_submitted_job_runs_to_the_end_with_an_async_trainer_over_mutual_tls_and_a_sync_one(
    poc: Poc, certs: dict[str, Path], tmp_path: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    executors = {
        "site-1": AgentExecutor(
            agent_id="trainer",
            listen_url="tls://127.0.0.1:0",
            tls_certfile=str(certs["site"]),
            tls_client_ca=str(certs["ca"]),
            launch=trainer(
                "async", records, "--ca", str(certs["ca"]), "--cert", str(certs["trainer"])
            ),
        ),
        "site-2": AgentExecutor(agent_id="trainer", launch=trainer("sync", records)),
    }
    job_id = submit(poc, tmp_path, "deployed", executors, rounds=2)
    assert wait_for_status(poc, job_id) == "FINISHED:COMPLETED"
    end_and_count(poc, job_id)
    result = Path(poc.session().download_job_result(job_id, str(tmp_path / "result")))
    (saved,) = result.rglob("global_model.npz")
    with np.load(saved) as model:
        for name, value in _jobs.INITIAL.items():
            np.testing.assert_allclose(model[name], value + 2)  # two rounds of +1, averaged
    assert events(records, "site-1")[0]["url"].startswith("tls://")
    for site in ("site-1", "site-2"):
        assert [e["event"] for e in events(records, site)] == ["started", "task", "task", "end"]
    assert error_logs(poc, job_id) == {}


def test_a_job_aborted_through_the_admin_api_aborts_every_trainers_task_and_leaves_nothing(
    poc: Poc, tmp_path: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    slow = trainers(records, "--slow")
    job_id = submit(poc, tmp_path, "aborted", slow, rounds=2)
    for site in slow:
        wait_for_event(records, site, "task")
    poc.session().abort_job(job_id)
    assert wait_for_status(poc, job_id) == "FINISHED:ABORTED"
    end_and_count(poc, job_id)
    for site in slow:  # each saw its task aborted, then the goodbye, and left
        assert [e["event"] for e in events(records, site)] == ["started", "task", "aborted", "end"]


def test_a_client_job_killed_mid_round_ends_its_trainer_after_reconnect_timeout(
    poc: Poc, tmp_path: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    job_id = submit(poc, tmp_path, "killed_cj", trainers(records), rounds=1000)
    wait_for_event(records, "site-1", "task")
    client_jobs = {
        pid: command
        for pid, command in processes_under(poc.workspace, job_id).items()
        if "site-1" in command and TRAINER.name not in command
    }
    assert len(client_jobs) == 1, f"site-1's client job process: {client_jobs}"
    (pid,) = client_jobs
    os.kill(pid, signal.SIGKILL)
    closed = wait_for_event(records, "site-1", "closed", timeout=60)
    assert "the site is gone" in closed["reason"], closed
    end_and_count(poc, job_id)  # NVFlare ends the job; site-2's trainer hears the goodbye
    assert events(records, "site-2")[-1]["event"] == "end"


def test_a_launched_trainer_killed_mid_task_fails_the_task_at_once_with_the_reason(
    poc: Poc, tmp_path: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    slow = trainers(records, "--slow", task_timeout=600)
    job_id = submit(poc, tmp_path, "killed_trainer", slow, rounds=2)
    started = wait_for_event(records, "site-1", "task")
    wait_for_event(records, "site-2", "task")
    killed_at = time.monotonic()
    os.kill(started["pid"], signal.SIGKILL)
    deadline = killed_at + 30  # far less than task_timeout
    reason = "the trainer exited with code -9"
    while reason not in poc.client_log("site-1", job_id):
        assert time.monotonic() < deadline, "site-1's task did not fail when its trainer died"
        time.sleep(0.2)
    assert "failed: the trainer exited with code -9" in poc.client_log("site-1", job_id)
    # The trainer is not launched again: the job cannot go on without site-1's results.
    poc.session().abort_job(job_id)
    end_and_count(poc, job_id)


CLIENT_API_SCRIPT = """\
import flare_agent_async.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params={key: value + 1 for key, value in model.params.items()}))
"""


def test_a_converted_recipe_runs_on_prod_env_against_the_deployment(
    poc: Poc, tmp_path: Path
) -> None:
    from nvflare.app_common.np.recipes.fedavg import NumpyFedAvgRecipe
    from nvflare.recipe import ProdEnv

    from flare_agent_async.nvflare import use_agent_executor

    script = tmp_path / "client.py"
    script.write_text(CLIENT_API_SCRIPT)
    recipe = NumpyFedAvgRecipe(
        name="recipe", min_clients=2, num_rounds=2, model=[0.0] * 4, train_script=str(script)
    )
    use_agent_executor(recipe)
    run = recipe.execute(ProdEnv(startup_kit_location=str(poc.prod / ADMIN)))
    result = run.get_result(timeout=JOB_TIMEOUT)
    assert run.get_status() == "FINISHED:COMPLETED"
    end_and_count(poc, run.get_job_id())
    assert result is not None
    (saved,) = Path(result).rglob("server.npy")
    np.testing.assert_array_equal(np.load(saved), np.full(4, 2.0))  # two rounds of +1
    assert error_logs(poc, run.get_job_id()) == {}


POC_ENV_JOB = """\
import sys

from nvflare.app_common.np.recipes.fedavg import NumpyFedAvgRecipe
from nvflare.recipe import PocEnv

from flare_agent_async.nvflare import use_agent_executor

recipe = NumpyFedAvgRecipe(
    name="pocenv", min_clients=2, num_rounds=2, model=[0.0] * 4, train_script="client.py"
)
use_agent_executor(recipe)
run = recipe.execute(PocEnv(project_conf_path=sys.argv[1]))
result = run.get_result(timeout=180, clean_up=False)  # stops POC; keeps its workspace
print("STATUS", run.get_status())
print("RESULT", result)
"""


def test_a_converted_recipe_runs_on_poc_env(tmp_path: Path) -> None:
    """NVFlare's PocEnv provisions and starts a POC of its own, runs the job, and stops."""
    (tmp_path / "client.py").write_text(CLIENT_API_SCRIPT)
    (tmp_path / "job.py").write_text(POC_ENV_JOB)
    workspace = tmp_path / "poc"
    project = write_project(tmp_path / "project.yml")
    try:
        done = subprocess.run(
            [sys.executable, "job.py", str(project)],
            cwd=tmp_path,
            env=services_env(workspace),
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT + 120,
            start_new_session=True,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "STATUS FINISHED:COMPLETED" in done.stdout, done.stdout[-3000:]
        result = done.stdout.split("RESULT ", 1)[1].strip()
        (saved,) = Path(result).rglob("server.npy")
        np.testing.assert_array_equal(np.load(saved), np.full(4, 2.0))
        deadline = time.monotonic() + GONE_TIMEOUT
        while processes_under(workspace) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        left = kill_all(processes_under(workspace))
    assert not left, f"processes outlived PocEnv's stop: {left}"
