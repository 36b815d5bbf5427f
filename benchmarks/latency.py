"""Small-task round trips over TCP, agent and site in separate processes, next to the floor: an
anyio TCP stream ping-pong of 100 bytes between two processes on the same backend.

    python -m benchmarks.latency [--tasks 3000] [--repeats 3] [--backends asyncio trio]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio

_CWD = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.latency", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=_CWD,
    )


def run_echo(backend: str) -> None:
    """The floor's far end: an anyio TCP echo server; prints its port."""

    async def main() -> None:
        async def echo(stream: Any) -> None:
            async with stream:
                async for data in stream:
                    await stream.send(data)

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        print(
            json.dumps({"port": listener.extra(anyio.abc.SocketAttribute.local_port)}), flush=True
        )
        async with listener:
            with anyio.move_on_after(300):
                await listener.serve(echo)

    anyio.run(main, backend=backend)


def run_agent(url: str, backend: str) -> None:
    from flare_agent_async import AsyncFlareAgent, TaskResult

    async def main() -> None:
        async with AsyncFlareAgent(url, agent_id="a1", site_name="bench") as agent:
            async for task in agent.tasks():
                await agent.submit_result(TaskResult({}, task.data))

    anyio.run(main, backend=backend)


async def floor(backend: str, count: int) -> float:
    echo = _spawn("--role", "echo", "--backend", backend)
    assert echo.stdout is not None
    port = json.loads(echo.stdout.readline())["port"]
    try:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            for _ in range(count // 10):
                await stream.send(b"x" * 100)
                await stream.receive()
            started = time.perf_counter()
            for _ in range(count):
                await stream.send(b"x" * 100)
                await stream.receive()
            return (time.perf_counter() - started) / count * 1e6
    finally:
        echo.kill()
        echo.wait()


async def task_round_trip(backend: str, count: int) -> float:
    from flare_agent_async import FlareSite

    async with FlareSite("bench") as site:
        url = await site.listen("tcp://127.0.0.1:0")
        agent = _spawn("--role", "agent", "--url", url, "--backend", backend)
        await site.wait_for_agent("a1", timeout=30)
        for n in range(count // 10):
            await site.run_task("a1", "ping", n)
        started = time.perf_counter()
        for n in range(count):
            await site.run_task("a1", "ping", n)
        elapsed = time.perf_counter() - started
    agent.wait(30)
    return elapsed / count * 1e6


def measure(backend: str, count: int, repeats: int) -> dict[str, Any]:
    floors = [anyio.run(floor, backend, count, backend=backend) for _ in range(repeats)]
    tasks = [anyio.run(task_round_trip, backend, count, backend=backend) for _ in range(repeats)]
    return {
        "backend": backend,
        "anyio_ping_pong_us": statistics.median(floors),
        "task_round_trip_us": statistics.median(tasks),
        "tasks_per_s": 1e6 / statistics.median(tasks),
        "ratio": statistics.median(tasks) / statistics.median(floors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["asyncio", "trio"])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="asyncio", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "echo":
        return run_echo(args.backend)
    if args.role == "agent":
        return run_agent(args.url, args.backend)
    rows = [measure(backend, args.tasks, args.repeats) for backend in args.backends]
    print(f"tcp, separate processes, {args.tasks} round trips, median of {args.repeats}, µs")
    print(
        "{:8} {:>15} {:>16} {:>8} {:>7}".format(
            "backend", "anyio ping-pong", "task round trip", "tasks/s", "ratio"
        )
    )
    for row in rows:
        print(
            f"{row['backend']:8} {row['anyio_ping_pong_us']:15.1f} "
            f"{row['task_round_trip_us']:16.1f} {row['tasks_per_s']:8.0f} {row['ratio']:6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return None


if __name__ == "__main__":
    main()
