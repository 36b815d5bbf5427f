"""What every benchmark shares: processes that report JSON lines, their own resource usage,
payloads, and medians.

A scenario runs each side (site, agent, floor peer) in a fresh process started with
``python -m benchmarks.<module> --role <role> ...``. A role prints JSON objects, one per line, on
stdout; `Child` reads them. Every role ends with `report_usage`, so the runner knows each
process's peak RSS and CPU seconds, measured by the process itself.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import threading
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
    """This process's peak resident set size since it started, or since `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start counting the peak RSS afresh (Linux), so a measurement sees only its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak


def cpu_seconds() -> float:
    """User and system CPU seconds this process has used so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report_usage() -> None:
    """The last line of every role: its peak RSS and CPU seconds."""
    emit(peak_rss_mib=peak_rss_bytes() / 2**20, cpu_s=cpu_seconds())


def raise_fd_limit(needed: int) -> None:
    """Raise this process's open-file limit to its hard limit; a clear error if that is less
    than ``needed`` (a scale run holds a socket per agent)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"{needed} open files needed, the limit is {hard}: raise it (ulimit -Hn)")


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


def _parent_death_signal() -> Any:
    """Linux's prctl, looked up before any fork (a forked child must not import)."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _parent_death_signal()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The child is killed when the runner dies, however it dies (PR_SET_PDEATHSIG)."""
    _PRCTL(1, signal.SIGKILL)


def start_process(command: Sequence[str], **options: Any) -> subprocess.Popen[Any]:
    """Start ``command`` in a session and process group of its own (so that killing the group
    takes its children with it) that is killed when the runner dies; ``options`` go to Popen."""
    return subprocess.Popen(
        command,
        start_new_session=True,
        preexec_fn=_die_with_parent if _PRCTL is not None else None,
        **options,
    )


class Child:
    """One benchmark process: its JSON records as they arrive, its exit checked.

    ``python -m benchmarks.<module> --role <role> <args>`` is started in its own process group,
    so that `kill` takes its children with it, and dies with the runner. A thread reads its
    stdout, so no record is ever stuck in a buffer; stderr passes through to the runner's.
    """

    def __init__(self, module: str, role: str, *args: str, env: dict[str, str] | None = None):
        self.name = f"{module} {role}"
        self.process = start_process(
            [sys.executable, "-m", f"benchmarks.{module}", "--role", role, *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.records: dict[str, Any] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=self.name, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output

    def _take(self, line: str | None) -> bool:
        """Keep one line's record; False at the end of the output."""
        if line is None:
            return False
        try:
            self.records.update(json.loads(line))
        except json.JSONDecodeError:
            self.kill()
            raise ChildFailed(f"{self.name} printed something not a record: {line!r}") from None
        return True

    def expect(self, key: str, timeout: float = 120) -> Any:
        """Read records until one has ``key``; its value.

        :raises ChildFailed: the process ended first, or nothing came within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while key not in self.records:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.kill()
                raise ChildFailed(f"{self.name}: no {key!r} within {timeout} s") from None
            if not self._take(line):
                self._lines.put(None)
                status = self.process.wait(timeout=10)
                raise ChildFailed(f"{self.name} exited with status {status} before {key!r}")
        return self.records[key]

    def poll(self) -> int | None:
        """The exit status, or None while the process runs."""
        return self.process.poll()

    def finish(self, timeout: float = 300) -> dict[str, Any]:
        """Wait for the process to exit cleanly; every record it sent.

        :raises ChildFailed: it failed, or did not end within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.kill()
                raise ChildFailed(f"{self.name} did not finish within {timeout} s") from None
            if not self._take(line):
                self._lines.put(None)
                break
        status = self.process.wait(timeout=max(deadline - time.monotonic(), 1))
        if status:
            raise ChildFailed(f"{self.name} failed with exit status {status}")
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
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def finish_together(children: Sequence[Child], timeout: float = 300) -> list[dict[str, Any]]:
    """Wait for all of ``children`` to exit; their records. The first to fail is the one named,
    and the others are killed at once rather than left waiting for it.

    :raises ChildFailed: one failed, or they did not all end within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    pending = list(children)
    while pending:
        for child in pending:
            status = child.poll()
            if status is not None:
                pending.remove(child)
                if status:
                    for other in children:
                        other.kill()
                    child.finish(timeout=10)  # raises, naming it
                break
        else:
            if time.monotonic() > deadline:
                for child in children:
                    child.kill()
                raise ChildFailed(f"{pending[0].name} did not finish within {timeout} s")
            try:  # nothing to do but wait a little for the first
                pending[0].process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
    return [child.finish(timeout=max(deadline - time.monotonic(), 10)) for child in children]


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


def anyio_backend(backend: str) -> tuple[str, dict[str, Any]]:
    """anyio's backend name and options for asyncio, asyncio with uvloop, or trio."""
    return ("asyncio", {"use_uvloop": True}) if backend == "uvloop" else (backend, {})


def run_on(backend: str, function: Any, *args: Any) -> Any:
    """``anyio.run`` on asyncio, asyncio with uvloop, or trio."""
    import anyio

    name, options = anyio_backend(backend)
    return anyio.run(function, *args, backend=name, backend_options=options)


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
            site_records, agent_records = finish_together([site, agent])
    return site_records, agent_records


def tls_site_context(folder: str) -> ssl.SSLContext:
    """A throwaway CA and a certificate for 127.0.0.1; the CA lands in ``folder/ca.pem``."""
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(os.path.join(folder, "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def site_options(url: str, folder: str) -> dict[str, Any]:
    """What a benchmark site's ``listen`` needs for ``url``: a server context for tls."""
    return {"ssl_context": tls_site_context(folder)} if url.startswith("tls:") else {}


def agent_options(url: str, folder: str) -> dict[str, Any]:
    """What a benchmark agent needs for ``url``: trust in the site's throwaway CA for tls."""
    if not url.startswith("tls:"):
        return {}
    from flare_agent_async.tls import client_context

    return {"ssl_context": client_context(os.path.join(folder, "ca.pem"))}


async def echo_trainer(agent: Any) -> int:
    """An async trainer that returns each task's data as its result; how many tasks it ran."""
    from flare_agent_async import TaskResult

    count = 0
    async for task in agent.tasks():
        await agent.submit_result(TaskResult({}, task.data))
        del task  # a model is held by the agent only until it is sent
        count += 1
    return count


def role_arguments(module: str, argv: list[str] | None, **options: type) -> argparse.Namespace:
    """The arguments the runner gives one process of a scenario (``--role`` and ``options``,
    each with its type). These modules are not run by hand: ``python -m benchmarks --only``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{module}",
        description=f"One process of the {module} benchmarks, started by the runner: measure "
        f"them with `python -m benchmarks --only {module}`.",
    )
    parser.add_argument("--role", required=True)
    for name, kind in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind)
    return parser.parse_args(argv)
