"""Measure the async core: small-task round trips over the memory transport, next to the floor.

The floor is a bare ping-pong over a pair of anyio memory object streams on the same backend: the
least any in-process request/response can cost. Each figure is the median (and min-max spread)
of ``--repeats`` runs of ``--tasks`` tasks, in microseconds per task.

    python -m benchmarks [--tasks 2000] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import date

import anyio

from flare_agent_async import AsyncFlareAgent, FlareSite, TaskResult

Scenario = Callable[[int], Awaitable[float]]


async def floor_ping_pong(count: int) -> float:
    """Seconds for ``count`` round trips over two anyio memory object streams."""
    to_server, server_inbox = anyio.create_memory_object_stream[int](1)
    to_client, client_inbox = anyio.create_memory_object_stream[int](1)

    async def server() -> None:
        async for item in server_inbox:
            await to_client.send(item)

    async with anyio.create_task_group() as group, to_server, to_client:
        group.start_soon(server)
        started = time.perf_counter()
        for n in range(count):
            await to_server.send(n)
            await client_inbox.receive()
        elapsed = time.perf_counter() - started
        await to_server.aclose()
    return elapsed


async def task_round_trip(count: int) -> float:
    """Seconds for ``count`` small tasks, site ``run_task`` to result, over ``memory://``."""
    async with anyio.create_task_group() as group, FlareSite("bench") as site:
        url = await site.listen("memory://")

        async def trainer() -> None:
            async with AsyncFlareAgent(url, agent_id="a1", site_name="bench") as agent:
                async for task in agent.tasks():
                    await agent.submit_result(TaskResult({}, task.data))

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=10)
        started = time.perf_counter()
        for n in range(count):
            await site.run_task("a1", "ping", n)
        return time.perf_counter() - started


SCENARIOS: dict[str, Scenario] = {
    "floor: memory stream ping-pong": floor_ping_pong,
    "small task round trip (memory://)": task_round_trip,
}


def measure(scenario: Scenario, backend: str, tasks: int, repeats: int) -> list[float]:
    """Microseconds per task, one figure per repeat."""
    anyio.run(scenario, max(tasks // 10, 1), backend=backend)  # warm up
    return [anyio.run(scenario, tasks, backend=backend) / tasks * 1e6 for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    rows = []
    for backend in ("asyncio", "trio"):
        for name, scenario in SCENARIOS.items():
            per_task = measure(scenario, backend, args.tasks, args.repeats)
            rows.append(
                {
                    "scenario": name,
                    "backend": backend,
                    "median_us": statistics.median(per_task),
                    "min_us": min(per_task),
                    "max_us": max(per_task),
                }
            )
    print(
        f"{platform.node()} · Python {platform.python_version()} · anyio {anyio.__version__}"
        if hasattr(anyio, "__version__")
        else f"Python {platform.python_version()}"
    )
    print(f"{date.today()} · {args.tasks} tasks x {args.repeats} repeats, µs per task")
    print(f"{'scenario':40} {'backend':8} {'median':>8} {'min':>8} {'max':>8}")
    for row in rows:
        print(
            f"{row['scenario']:40} {row['backend']:8} {row['median_us']:8.1f}"
            f" {row['min_us']:8.1f} {row['max_us']:8.1f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
