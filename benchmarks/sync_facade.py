"""What the synchronous facade adds per task, next to one bare blocking-portal call.

A site in another process runs small tasks one after another on one agent over a Unix socket:
first an `AsyncFlareAgent`, then a `SyncFlareAgent` driven by a plain blocking loop. The
difference per task is the facade's cost; it makes two portal crossings per task (`get_task`,
`submit_result`), so the target is at most two bare `portal.call`s.

    python -m benchmarks.sync_facade [--tasks 2000] [--repeats 5] [--backends asyncio trio]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
import anyio.from_thread

from flare_agent_async import AsyncFlareAgent, FlareSite, SyncFlareAgent, TaskResult

RESULT = TaskResult({}, {"ok": 1})


def bare_portal_call(backend: str, calls: int) -> float:
    """Microseconds per `portal.call` of a coroutine that does nothing."""

    async def nothing() -> None:
        return None

    with anyio.from_thread.start_blocking_portal(backend) as portal:
        for _ in range(calls // 10):
            portal.call(nothing)
        started = time.perf_counter()
        for _ in range(calls):
            portal.call(nothing)
        return (time.perf_counter() - started) / calls * 1e6


def _async_agent(url: str, backend: str) -> None:
    async def main() -> None:
        async with AsyncFlareAgent(url, agent_id="a1", site_name="bench") as agent:
            async for _ in agent.tasks():
                await agent.submit_result(RESULT)

    anyio.run(main, backend=backend)


def _sync_agent(url: str, backend: str) -> None:
    with SyncFlareAgent(url, agent_id="a1", site_name="bench", backend=backend) as agent:
        for _ in agent.tasks():
            agent.submit_result(RESULT)


def run_site(url: str, tasks: int, backend: str) -> None:
    """The site, in a process of its own: prints its URL, then µs per task as JSON."""

    async def main() -> None:
        async with FlareSite("bench") as site:
            print(json.dumps({"url": await site.listen(url)}), flush=True)
            await site.wait_for_agent("a1", timeout=30)
            for n in range(tasks // 10):
                await site.run_task("a1", "ping", n)
            started = time.perf_counter()
            for n in range(tasks):
                await site.run_task("a1", "ping", n)
            elapsed = time.perf_counter() - started
        print(json.dumps({"task_us": elapsed / tasks * 1e6}), flush=True)

    anyio.run(main, backend=backend)


def per_task(agent: str, backend: str, tasks: int) -> float:
    """Microseconds per small task, site `run_task` to result, with the given agent here and
    the site in another process (so the agent's process holds only the agent's threads)."""
    folder = tempfile.mkdtemp(dir="/tmp")
    site = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.sync_facade",
            "--role",
            "site",
            "--url",
            f"unix://{folder}/site.sock",
            "--tasks",
            str(tasks),
            "--backend",
            backend,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert site.stdout is not None
    url = json.loads(site.stdout.readline())["url"]
    (_async_agent if agent == "async" else _sync_agent)(url, backend)
    out, _ = site.communicate(timeout=120)
    return float(json.loads(out.splitlines()[-1])["task_us"])


def measure(backend: str, tasks: int, repeats: int) -> dict[str, Any]:
    portal = [bare_portal_call(backend, tasks) for _ in range(repeats)]
    async_agent = [per_task("async", backend, tasks) for _ in range(repeats)]
    sync_agent = [per_task("sync", backend, tasks) for _ in range(repeats)]
    added = statistics.median(sync_agent) - statistics.median(async_agent)
    return {
        "backend": backend,
        "portal_call_us": statistics.median(portal),
        "async_agent_task_us": statistics.median(async_agent),
        "sync_agent_task_us": statistics.median(sync_agent),
        "facade_added_us": added,
        "added_in_portal_calls": added / statistics.median(portal),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync_facade", description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["asyncio", "trio"])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="asyncio", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "site":
        run_site(args.url, args.tasks, args.backend)
        return
    rows = [measure(backend, args.tasks, args.repeats) for backend in args.backends]
    print(f"sync facade, {args.tasks} tasks, median of {args.repeats}, µs")
    columns = ("backend", "portal.call", "async task", "sync task", "added", "calls")
    print("{:8} {:>11} {:>10} {:>10} {:>7} {:>6}".format(*columns))
    for row in rows:
        print(
            f"{row['backend']:8} {row['portal_call_us']:11.1f} {row['async_agent_task_us']:10.1f}"
            f" {row['sync_agent_task_us']:10.1f} {row['facade_added_us']:7.1f}"
            f" {row['added_in_portal_calls']:5.2f}x"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
