"""What every benchmark shares: processes that report JSON lines, their own resource usage,
payloads, and medians.

A scenario runs each side (site, agent, floor peer) in a fresh process started with
``python -m benchmarks.<module> --role <role> ...``. A role prints JSON objects, one per line, on
stdout; `Child` reads them. Every role ends with `report_usage`, so the runner knows each
process's peak RSS and CPU seconds, measured by the process itself.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def emit(**record: Any) -> None:
    """Tell the runner something: one JSON object on one line of stdout."""
    print(json.dumps(record), flush=True)


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User and system CPU seconds this process has used so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report_usage() -> None:
    """The last line of every role: its peak RSS and CPU seconds."""
    emit(peak_rss_mib=peak_rss_bytes() / 2**20, cpu_s=cpu_seconds())


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (scale runs need thousands)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def payload(mib: float, arrays: int = 8) -> dict[str, np.ndarray]:
    """A model of ``mib`` MiB: ``arrays`` float32 arrays, each filled with its index."""
    count = max(int(mib * 2**20) // 4 // arrays, 1)
    return {f"layer{n}": np.full(count, n, dtype=np.float32) for n in range(arrays)}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of repeated measurements, and the measurements themselves."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "all": list(values),
    }


class ChildFailed(RuntimeError):
    """A benchmark process exited with an error, or did not answer in time."""


class Child:
    """One benchmark process: its JSON records as they arrive, its exit checked.

    ``python -m benchmarks.<module> --role <role> <args>`` is started in its own process group,
    so that `kill` takes its children with it. Stderr passes through to the runner's.
    """

    def __init__(self, module: str, role: str, *args: str, env: dict[str, str] | None = None):
        self.name = f"{module} {role}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{module}", "--role", role, *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.records: dict[str, Any] = {}

    def expect(self, key: str, timeout: float = 120) -> Any:
        """Read records until one has ``key``; its value."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while key not in self.records:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.kill()
                    raise ChildFailed(f"{self.name}: no {key!r} within {timeout} s")
                line = self.process.stdout.readline()
                if not line:
                    self.process.wait()
                    raise ChildFailed(
                        f"{self.name} exited with status {self.process.returncode} "
                        f"before reporting {key!r}"
                    )
                self.records.update(json.loads(line))
        return self.records[key]

    def finish(self, timeout: float = 300) -> dict[str, Any]:
        """Wait for the process to exit cleanly; every record it sent."""
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ChildFailed(f"{self.name} did not finish within {timeout} s") from None
        for line in out.splitlines():
            self.records.update(json.loads(line))
        if self.process.returncode:
            raise ChildFailed(f"{self.name} failed with exit status {self.process.returncode}")
        return self.records

    def kill(self) -> None:
        """Kill the process and its group, if still running."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


def usage(records: dict[str, Any]) -> dict[str, float]:
    """A process's peak RSS and CPU seconds from its records."""
    return {"peak_rss_mib": records["peak_rss_mib"], "cpu_s": records["cpu_s"]}


BACKENDS = ("asyncio", "uvloop", "trio")


def available_backends() -> list[str]:
    """The event loops installed here, of asyncio, uvloop and trio."""
    found = []
    for backend, module in zip(BACKENDS, ("asyncio", "uvloop", "trio"), strict=True):
        try:
            __import__(module)
        except ImportError:
            continue
        found.append(backend)
    return found


def run_on(backend: str, function: Any, *args: Any) -> Any:
    """``anyio.run`` on asyncio, asyncio with uvloop, or trio."""
    import anyio

    if backend == "uvloop":
        return anyio.run(function, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(function, *args, backend=backend)


def site_url(transport: str, folder: str) -> str:
    """Where a benchmark site listens: a free loopback port, or a socket file in ``folder``."""
    if transport == "unix":
        return f"unix://{folder}/site.sock"
    return f"{transport}://127.0.0.1:0"


def site_and_agent(
    module: str, site_args: Sequence[str], agent_role: str, agent_args: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A site process and an agent process given the site's bound URL; both one's records."""
    with Child(module, "site", *site_args) as site:
        url = site.expect("url")
        with Child(module, agent_role, "--url", url, *agent_args) as agent:
            return site.finish(), agent.finish()
