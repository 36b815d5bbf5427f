"""NVFlare's POC mode for the deployment tests: a server, two clients and an admin on this
machine, on a free port, with the workspace in a temporary folder; jobs go through the admin API.

Every process of the deployment is found by what points into its workspace (its command line,
its working directory, or the job id in its environment), so that the tests can count what a job
left behind and stop can kill whatever outlived ``nvflare poc stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nvflare

from flare_agent_async._processes import processes_with

ADMIN = "admin@nvidia.com"
CLIENTS = ("site-1", "site-2")
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_project(path: Path) -> Path:
    """NVFlare's sample project (server1, site-1, site-2, admins) with a free port."""
    template = Path(nvflare.__file__).parent / "lighter" / "dummy_project.yml"
    path.write_text(
        template.read_text().replace("fed_learn_port: 8002", f"fed_learn_port: {free_port()}")
    )
    return path


def services_env(workspace: Path) -> dict[str, str]:
    """The environment for NVFlare's POC commands: the workspace, and this interpreter first on
    ``PATH``, as the services run ``python3``, where this library must be installed."""
    return {
        **os.environ,
        "NVFLARE_POC_WORKSPACE": str(workspace),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }


class Poc:
    """One POC deployment, started with NVFlare's own command line."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.workspace = folder / "poc"
        self.prod = self.workspace / "example_project" / "prod_00"
        self.env = services_env(self.workspace)
        self._session: Any = None

    def _nvflare(self, *args: str, timeout: float) -> str:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "nvflare"), *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,  # the services it starts live in a session of their own
        )
        assert done.returncode == 0, f"nvflare {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
        return done.stdout

    def start(self) -> None:
        project = write_project(self.folder / "project.yml")
        self._nvflare("poc", "prepare", "-i", str(project), "--force", timeout=60)
        for participant in ("server1", *CLIENTS):
            allow_this_library(self.prod / participant / "local")
        self._nvflare("poc", "start", "-ex", ADMIN, timeout=START_TIMEOUT)
        self.session()  # logs in, once the server answers

    def session(self) -> Any:
        """The admin API's session (logged in as the project admin)."""
        if self._session is None:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    self._session = new_secure_session(ADMIN, str(self.prod / ADMIN), timeout=10)
                    break
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no admin session within {START_TIMEOUT} s") from exc
                    time.sleep(1)
            self._wait_for_clients()
        return self._session

    def _wait_for_clients(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            info = self._session.get_system_info()
            names = {client.name for client in info.client_info}
            if set(CLIENTS) <= names:
                return
            assert time.monotonic() < deadline, f"clients {names} after {START_TIMEOUT} s"
            time.sleep(1)

    def stop(self) -> list[str]:
        """Stop POC; kill what outlived the stop; the command lines of what had to be killed."""
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.close()
            self._session = None
        with contextlib.suppress(Exception):
            self._nvflare("poc", "stop", timeout=STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while processes_under(self.workspace) and time.monotonic() < deadline:
            time.sleep(0.2)
        return kill_all(processes_under(self.workspace))

    def client_log(self, site: str, job_id: str) -> str:
        path = self.prod / site / job_id / "log.txt"
        return path.read_text() if path.exists() else ""

    def job_folders(self, job_id: str) -> list[Path]:
        return [path for path in self.prod.glob(f"*/{job_id}") if path.is_dir()]

    def remove(self) -> None:
        shutil.rmtree(self.workspace, ignore_errors=True)


def allow_this_library(local: Path) -> None:
    """What a site's admin does to run jobs that name this library's classes: add its prefix to
    the class allow-list in the site's ``local/resources.json``."""
    target = local / "resources.json"
    source = target if target.exists() else local / "resources.json.default"
    resources = json.loads(source.read_text())
    resources["class_allow_list"] = [*resources["class_allow_list"], "flare_agent_async."]
    target.write_text(json.dumps(resources, indent=2))


# -- processes ------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_under(workspace: Path, job_id: str | None = None) -> dict[int, str]:
    """Live processes of the deployment (or of one job): pid -> command line. A process belongs
    to it when its command line or working directory is in the workspace (and names the job), or
    its environment names the job (a launched trainer's ``FLARE_AGENT_JOB_ID``)."""
    found: dict[int, str] = {}
    root = str(workspace)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        command = _read(f"/proc/{entry}/cmdline").strip()
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        mine = command and (root in command or cwd.startswith(root))  # a zombie has no command
        if mine and (job_id is None or job_id in command or job_id in cwd):
            found[int(entry)] = command
    if job_id is not None:
        found.update(processes_with(f"FLARE_AGENT_JOB_ID={job_id}".encode()))
    return found


def kill_all(processes: dict[int, str]) -> list[str]:
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return list(processes.values())


def wait_until_gone(workspace: Path, job_id: str, timeout: float) -> dict[int, str]:
    """Bounded polling until no process of the job is left; what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := processes_under(workspace, job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
