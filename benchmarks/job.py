"""What users feel: one FedAvg-style job in NVFlare 2.9's simulator (one client, ``-n 1 -t 1``),
its trainer run four ways.

* A: NVFlare's Client API, the script in an external process (``ScriptRunner``,
  ``launch_external_process=True``);
* B: the same script in the client job's process (``launch_external_process=False``);
* C: ours, `AgentExecutor` launching a `SyncFlareAgent` echo loop (``echo_agent.py``);
* D: ours with our Client API: A's job with ``flare_agent_async.client`` imported in its script in
  place of ``nvflare.client``, converted by `flare_agent_async.nvflare.use_agent_executor`.

Every trainer returns the model it receives, and lets go of it before it asks for the next one.
The server is the same for all: an in-memory model of float32 arrays, checked at the end of the
run to be the initial one (`benchmarks._job_parts`), NVFlare's full-model shareable generator,
its in-time weighted aggregator and ``ScatterAndGather`` (one client, no waiting after it,
tasks checked every 50 ms, no snapshots). NVFlare's own settings are left as they are, so the
client asks the server for a task every 2 s; a quick run may ask more often.

Event timers on the server and in the client job write NVFlare's events with monotonic
timestamps; from the rounds after the first come the dispatch to result at the server (the task
handed to the client until its result is in, ``BEFORE_TASK_DATA_FILTER`` to
``BEFORE_TASK_RESULT_FILTER``), the client's ``execute()`` (``BEFORE_TASK_EXECUTION`` to
``AFTER_TASK_EXECUTION``), the two hops around it (the task from its dispatch to ``execute()``,
the result from ``execute()`` to the server) and the round (``round_started`` to
``round_done``). The peak RSS
(``VmHWM``) of every process the simulator starts is sampled every 0.1 s: the client job's
(``simulator_worker``), the trainer's and the server's. A run is ok when the final model is the
initial one, every round was done, NVFlare logged no error and no process of the job is left.

    python -m benchmarks --only job
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import nvflare_ipc
from benchmarks._harness import ROOT, ChildFailed, spread, start_process
from flare_agent_async._processes import processes_with

SETUPS = {
    "A": "NVFlare Client API, external process",
    "B": "NVFlare Client API, in process",
    "C": "AgentExecutor, SyncFlareAgent",
    "D": "AgentExecutor, our Client API",
}
TINY_MIB = 1 / 1024
"""The tiny model (1 KiB in 2 arrays): each setup's baseline for the larger models' growth."""

HERE = Path(__file__).resolve().parent
_TRAINERS = ("echo_client_api.py", "echo_agent.py")
_OUR_IMPORTS = {
    "import nvflare.client as flare": "import flare_agent_async.client as flare",
    "from nvflare.app_common.abstract.fl_model import": "from flare_agent_async.client import",
}
"""D's one change to A's script: the Client API's imports."""
_TASK_TIMEOUT = 900
_SAMPLE_INTERVAL = 0.1
_MARK = "FLARE_JOB_BENCH_RUN"
"""In the environment of the simulator and all it starts: how a process of the run is known."""


def unavailable() -> str | None:
    """None when nvflare 2.9.x is importable; otherwise the reason to skip this scenario."""
    return nvflare_ipc.unavailable()


def size_name(mib: float) -> str:
    """``1 KiB``, ``64 MiB``, ``1 GiB``."""
    if mib < 1:
        return f"{mib * 1024:g} KiB"
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib:g} MiB"


def arrays_of(mib: float) -> int:
    """How many arrays the model has: 2 for the tiny one, 8 otherwise."""
    return 2 if mib < 1 else 8


def model_bytes(mib: float) -> int:
    """The model's size in bytes, as `benchmarks._harness.payload` makes it."""
    arrays = arrays_of(mib)
    return max(int(mib * 2**20) // 4 // arrays, 1) * 4 * arrays


# -- the job --------------------------------------------------------------------------------------


def build_job(setup: str, mib: float, rounds: int, folder: Path) -> Any:
    """The job of ``setup`` (A, B, C or D) with a model of ``mib`` MiB, writing its events and
    verdict into ``folder``."""
    from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import (
        InTimeAccumulateWeightedAggregator,
    )
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import (
        FullModelShareableGenerator,
    )
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from benchmarks._job_parts import EchoedModelPersistor, EventTimer
    from flare_agent_async.nvflare import AgentExecutor, use_agent_executor

    job = FedJob(name="echo", min_clients=1)
    # Installed (or on the simulator's PYTHONPATH) rather than copied into the job:
    job.set_app_packages(["flare_agent_async", "benchmarks"])
    persistor = EchoedModelPersistor(
        mib=mib, arrays=arrays_of(mib), verdict_file=str(folder / "verdict.json")
    )
    job.to(persistor, "server", id="persistor")
    job.to(FullModelShareableGenerator(), "server", id="shareable_generator")
    job.to(
        InTimeAccumulateWeightedAggregator(expected_data_kind="WEIGHTS"), "server", id="aggregator"
    )
    workflow = ScatterAndGather(
        min_clients=1,
        num_rounds=rounds,
        wait_time_after_min_received=0,
        persistor_id="persistor",
        train_timeout=_TASK_TIMEOUT,
        task_check_period=0.05,
        snapshot_every_n_rounds=0,
    )
    job.to(workflow, "server")
    job.to(EventTimer(str(folder / "events_server.jsonl"), "server"), "server", id="event_timer")
    job.to_clients(EventTimer(str(folder / "events_client.jsonl"), "client"), id="event_timer")
    if setup in ("A", "B", "D"):
        # Copied where no entry of sys.path holds it, NVFlare ships it as custom/<its name>,
        # which is where the external process's command looks for it.
        script = (HERE / _TRAINERS[0]).read_text()
        if setup == "D":
            for theirs, ours in _OUR_IMPORTS.items():
                script = script.replace(theirs, ours)
        (folder / _TRAINERS[0]).write_text(script)
        runner = ScriptRunner(
            script=str(folder / _TRAINERS[0]),
            launch_external_process=setup != "B",
            command=f"{sys.executable} -u",
            framework=FrameworkType.NUMPY,
        )
        job.to_clients(runner, tasks=["train"])
        if setup == "D":
            use_agent_executor(job, task_timeout=_TASK_TIMEOUT)
    elif setup == "C":
        launch = f"{shlex.quote(sys.executable)} {shlex.quote(str(HERE / _TRAINERS[1]))}"
        job.to_clients(AgentExecutor(launch=launch, task_timeout=_TASK_TIMEOUT), tasks=["train"])
    else:
        raise ValueError(f"unknown setup {setup!r}: one of {', '.join(SETUPS)}")
    return job


def _export(job: Any, folder: Path, request_interval_s: float | None) -> tuple[Path, Path]:
    """The job exported into ``folder``, and a workspace that lets its classes load."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    job.export_job(str(folder / "jobs"))
    job_dir = folder / "jobs" / job.name
    if request_interval_s is not None:
        config_file = job_dir / "app" / "config" / "config_fed_server.json"
        config = json.loads(config_file.read_text())
        config.setdefault("server", {})["task_request_interval"] = request_interval_s
        config_file.write_text(json.dumps(config, indent=1))
    workspace = folder / "workspace"
    (workspace / "local").mkdir(parents=True)
    allowed = [*DEFAULT_CLASS_ALLOW_LIST, "flare_agent_async.", "benchmarks."]
    (workspace / "local" / "resources.json").write_text(json.dumps({"class_allow_list": allowed}))
    return job_dir, workspace


# -- the processes of a run -----------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, int, str]]:
    """Every process of the machine: pid -> (parent pid, start time, state)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        table[int(name)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def _command(pid: int) -> str:
    """A process's command line ("" once it is a zombie, or gone)."""
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


class _ProcessTree(threading.Thread):
    """Every ``interval`` seconds, every process descended from ``root`` (and every one seen so,
    whoever its parent is now): its command line and its peak RSS."""

    def __init__(self, root: int, interval: float = _SAMPLE_INTERVAL) -> None:
        super().__init__(name="job processes", daemon=True)
        self.root = root
        self.interval = interval
        self.seen: dict[tuple[int, int], dict[str, Any]] = {}  # (pid, start) -> what was seen
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in table.items():
            children.setdefault(parent, []).append(pid)
        todo = [self.root]
        todo += [pid for pid, start in self.seen if pid in table and table[pid][1] == start]
        found: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in found or pid not in table:
                continue
            found.add(pid)
            todo.extend(children.get(pid, ()))
            parent, start, _ = table[pid]
            status = _read(f"/proc/{pid}/status").decode(errors="replace")
            command = _command(pid)
            peak = next(
                (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")),
                0,
            )
            entry = self.seen.setdefault((pid, start), {"pid": pid, "command": "", "peak_kib": 0})
            entry["parent"] = parent
            entry["peak_kib"] = max(entry["peak_kib"], peak)
            if command:
                entry["command"] = command

    def peaks_mib(self) -> dict[str, float | None]:
        """The highest peak RSS of the client job, the trainer and the server, in MiB (None for
        a role no process had)."""
        peaks: dict[str, float | None] = {"client_job": None, "trainer": None, "server": None}
        servers = {e["parent"] for e in self.seen.values() if "simulator_worker" in e["command"]}
        for entry in self.seen.values():
            if "simulator_worker" in entry["command"]:
                role = "client_job"
            elif any(name in entry["command"] for name in _TRAINERS):
                role = "trainer"
            elif entry["pid"] in servers:  # the simulator's process that runs the server
                role = "server"
            else:
                continue
            peaks[role] = max(peaks[role] or 0.0, entry["peak_kib"] / 1024)
        return peaks

    def alive(self, mark: str) -> dict[int, str]:
        """The processes of the run still alive: seen in its tree, or carrying its ``mark``."""
        alive = processes_with(f"{_MARK}={mark}".encode())
        for pid, (_, start, state) in _process_table().items():
            entry = self.seen.get((pid, start))
            if entry is not None and state != "Z":
                alive.setdefault(pid, _command(pid) or entry["command"])
        alive.pop(os.getpid(), None)
        return alive


def _kill_all(tree: _ProcessTree, mark: str, grace_s: float) -> list[str]:
    """Wait up to ``grace_s`` for the run's processes to end; kill those that do not. Their
    command lines."""
    deadline = time.monotonic() + grace_s
    while (left := tree.alive(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return sorted(left.values())


# -- one run --------------------------------------------------------------------------------------


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _times(events: list[dict[str, Any]], name: str) -> list[float]:
    return [e["mono"] for e in events if e["event"] == name]


def _spans_ms(starts: list[float], ends: list[float]) -> list[float]:
    return [(end - start) * 1000 for start, end in zip(starts, ends, strict=False)]


def run(
    setup: str,
    mib: float,
    rounds: int,
    request_interval_s: float | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One job of ``setup`` with a model of ``mib`` MiB for ``rounds`` rounds in the simulator:
    its figures (growth against a baseline is `Series`'s).

    :raises ChildFailed: the simulator did not end within ``timeout`` (then every process of the
        job is killed), or no round after the first was done.
    """
    if timeout is None:
        timeout = 120 + rounds * (20 + mib / 8)
    with tempfile.TemporaryDirectory(prefix="flare-job-bench-") as name:
        folder = Path(name)
        job = build_job(setup, mib, rounds, folder)
        job_dir, workspace = _export(job, folder, request_interval_s)
        mark = uuid.uuid4().hex
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, _MARK: mark}
        command = [sys.executable, "-m", "nvflare.cli", "simulator", str(job_dir)]
        command += ["-w", str(workspace), "-n", "1", "-t", "1"]
        log_path = folder / "simulator.log"
        started = time.monotonic()
        with log_path.open("wb") as log:
            process = start_process(
                command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        tree = _ProcessTree(process.pid)
        tree.start()
        timed_out = False
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            wall_s = time.monotonic() - started
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
            tree.stopping.set()
            tree.join()
            tree.sample()
            left = _kill_all(tree, mark, grace_s=0 if timed_out else 5)
        log_tail = log_path.read_text(errors="replace")[-3000:]
        if timed_out:
            raise ChildFailed(
                f"the simulator ran {setup}, {size_name(mib)} for more than {timeout:.0f} s: "
                f"killed its process group and {len(left)} processes of the job outside it; "
                f"its log ends:\n{log_tail}"
            )
        server = _events(folder / "events_server.jsonl")
        client = _events(folder / "events_client.jsonl")
        verdict_path = folder / "verdict.json"
        verdict = json.loads(verdict_path.read_text()) if verdict_path.exists() else None
        errors = {
            str(p.relative_to(workspace)): p.read_text(errors="replace")[-3000:]
            for p in workspace.rglob("error_log*.txt")
            if p.read_text(errors="replace").strip()
        }
    begun = {e["round"]: e["mono"] for e in server if e["event"] == "round_started"}
    done = {e["round"]: e["mono"] for e in server if e["event"] == "round_done"}
    round_ms = [(done[r] - begun[r]) * 1000 for r in sorted(begun) if r in done]
    dispatch_ms = _spans_ms(_times(server, "task_dispatch"), _times(server, "result_in"))
    before, after = _times(client, "before_execute"), _times(client, "after_execute")
    execute_ms = _spans_ms(before, after)
    # The two hops around execute(): the task reaching the executor, the result the server.
    task_in_ms = _spans_ms(_times(server, "task_dispatch"), before)
    result_out_ms = _spans_ms(after, _times(server, "result_in"))
    if min(map(len, (round_ms, dispatch_ms, execute_ms, task_in_ms, result_out_ms))) < 2:
        raise ChildFailed(
            f"the simulator ran {setup}, {size_name(mib)} with exit status {returncode} and did "
            f"{len(round_ms)} of {rounds} rounds: too few to measure; its log ends:\n{log_tail}"
        )
    peaks = tree.peaks_mib()
    problems = []
    if returncode:
        problems.append(f"the simulator's exit status was {returncode}")
    if not (verdict and verdict["ok"]):
        problems.append(verdict["detail"] if verdict else "no verdict on the model")
    if len(round_ms) != rounds:
        problems.append(f"{len(round_ms)} of {rounds} rounds done")
    if errors:
        problems.append(f"errors logged in {', '.join(errors)}")
    if left:
        problems.append(f"{len(left)} processes left behind (killed)")
    return {
        "setup": setup,
        "setup_name": SETUPS[setup],
        "mib": mib,
        "model_bytes": model_bytes(mib),
        "rounds": rounds,
        "request_interval_s": request_interval_s,
        # every round but the first, which starts the trainer
        "dispatch_to_result_ms": spread(dispatch_ms[1:]),
        "execute_ms": spread(execute_ms[1:]),
        "task_in_ms": spread(task_in_ms[1:]),
        "result_out_ms": spread(result_out_ms[1:]),
        "round_ms": spread(round_ms[1:]),
        "first_round_ms": round_ms[0],
        # None for a process the setup does not have (B's trainer runs in the client job)
        **{
            role: None if peaks[role] is None else {"peak_rss_mib": peaks[role], "growth_x": None}
            for role in ("client_job", "trainer")
        },
        "server": {"peak_rss_mib": peaks["server"]},
        "processes": [
            {"command": e["command"][:300], "peak_rss_mib": e["peak_kib"] / 1024}
            for e in tree.seen.values()
        ],
        "wall_s": wall_s,
        "verdict": verdict,
        "error_logs": errors,
        "leftovers": left,
        "ok": not problems,
        "problems": problems,
    }


class Series:
    """The job runs of one suite run. Each setup's run of the tiny model is the baseline of its
    larger models' memory growth: peak RSS minus the tiny run's, over the model's size."""

    def __init__(self, request_interval_s: float | None = None) -> None:
        self.request_interval_s = request_interval_s
        self._tiny: dict[str, dict[str, Any]] = {}

    def measure(self, setup: str, mib: float, rounds: int) -> dict[str, Any]:
        """One run (see `run`), with its growth when the setup's tiny run came first."""
        row = run(setup, mib, rounds, self.request_interval_s)
        if mib <= TINY_MIB:
            self._tiny[setup] = row
            return row
        tiny = self._tiny.get(setup)
        if tiny is not None:
            for role in ("client_job", "trainer"):
                if row[role] is not None and tiny[role] is not None:
                    grown = row[role]["peak_rss_mib"] - tiny[role]["peak_rss_mib"]
                    row[role]["growth_x"] = grown * 2**20 / row["model_bytes"]
        return row
