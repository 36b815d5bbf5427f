"""Wall time of one 2-client x 2-round job, three ways, measured in one run; and task times.

1. our `AgentExecutor`, which launches our agents (one async, one sync);
2. NVFlare's IPCExchanger with NVFlare's IPCAgent trainers;
3. NVFlare's IPCExchanger with our agents over ``nvflare-ipc://``.

Run from the repository: ``python tests/nvflare_bridge/compare_jobs.py [REPEATS]``. Each job runs in
NVFlare's simulator in a fresh workspace; the wall times include the simulator's own start and
stop. The task time is the client executor's, from sending a task to the trainer to having its
result, in the second round (the first includes the trainer's start), read from the sites' logs.
"""

from __future__ import annotations

import datetime
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _jobs
import numpy as np

from flare_agent_async.nvflare import AgentExecutor

HERE = Path(__file__).parent
SITES = [f"site-{n}" for n in range(1, _jobs.CLIENTS + 1)]


Timing = tuple[float, list[float]]
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _stamp(line: str) -> float:
    match = re.match(_STAMP, line)
    assert match, line
    when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return when.timestamp()


def task_times_ms(workspace: Path) -> list[float]:
    """Each site's last task: from sending it to the trainer to having its result, in ms."""
    times = []
    for site in SITES:
        lines = (workspace / site / "log.txt").read_text().splitlines()
        ours = [float(m.group(1)) for line in lines if (m := re.search(r" in ([\d.]+) ms$", line))]
        if ours:
            times.append(ours[-1])
            continue
        sent = [_stamp(line) for line in lines if "try to send task" in line]
        received = [_stamp(line) for line in lines if "received result from" in line]
        times.append((received[-1] - sent[-1]) * 1000)
    return times


def run_agent_executor(tmp: Path) -> Timing:
    launch = f"{sys.executable} {HERE / 'trainer.py'} {{url}} {{site_name}} {{agent_id}} auto {tmp}"
    job = _jobs.fedavg_job("agent_executor", AgentExecutor(launch=launch), tmp / "initial.npz")
    started = time.monotonic()
    process, workspace = _jobs.start_simulator(job, tmp)
    assert _jobs.finish_simulator(process) == 0
    elapsed = time.monotonic() - started
    check(workspace)
    return elapsed, task_times_ms(workspace)


def run_ipc_exchanger(tmp: Path, trainer: Callable[[str, str], list[str]]) -> Timing:
    job = _jobs.ipc_exchanger_job(tmp / "initial.npz")
    started = time.monotonic()
    process, workspace = _jobs.start_simulator(job, tmp)
    trainers = []
    try:
        for site in SITES:
            url = _jobs.wait_for_file("cell_url.txt", workspace / site, process, 30).read_text()
            trainers.append(subprocess.Popen(trainer(url.strip(), site)))
        assert _jobs.finish_simulator(process) == 0
        elapsed = time.monotonic() - started
        for process_ in trainers:
            process_.wait(timeout=60)
    finally:
        for process_ in trainers:
            process_.kill()
            process_.wait(timeout=10)
    check(workspace)
    return elapsed, task_times_ms(workspace)


def check(workspace: Path) -> None:
    model = _jobs.final_model(workspace)
    for name, initial in _jobs.INITIAL.items():
        np.testing.assert_array_equal(model[name], initial + _jobs.ROUNDS)
    assert _jobs.error_logs(workspace) == {}, _jobs.error_logs(workspace)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)

        def ipc_agent(url: str, site: str) -> list[str]:
            script = str(HERE / "ipc_agent_trainer.py")
            return [sys.executable, script, url, site, "trainer", str(work_dir)]

        def our_agent(url: str, site: str) -> list[str]:
            ipc_url = "nvflare-ipc://" + url.partition("://")[2]
            return [
                sys.executable,
                str(HERE / "trainer.py"),
                ipc_url,
                site,
                "trainer",
                "auto",
                work,
            ]

        ways: dict[str, Callable[[Path], Timing]] = {
            "AgentExecutor + our agents": run_agent_executor,
            "IPCExchanger + NVFlare's IPCAgent": lambda tmp: run_ipc_exchanger(tmp, ipc_agent),
            "IPCExchanger + our agents (nvflare-ipc://)": lambda tmp: run_ipc_exchanger(
                tmp, our_agent
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        tasks: dict[str, list[float]] = {name: [] for name in ways}
        for repeat in range(repeats):
            for index, (name, way) in enumerate(ways.items()):
                tmp = work_dir / f"run-{repeat}-{index}"
                tmp.mkdir()
                elapsed, task_ms = way(tmp)
                times[name].append(elapsed)
                tasks[name].extend(task_ms)
                print(f"{name}: {elapsed:.2f} s, tasks {task_ms} ms", flush=True)
    print(f"\n2 clients x 2 rounds in the simulator, {repeats} runs each:")
    print(f"  {'':45} {'job wall time (median, min)':>30} {'task at the site (median)':>28}")
    for name, values in times.items():
        wall = f"{statistics.median(values):.2f} s, {min(values):.2f} s"
        print(f"  {name:45} {wall:>30} {statistics.median(tasks[name]):>24.1f} ms")


if __name__ == "__main__":
    main()
