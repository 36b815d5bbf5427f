"""Many agents on one site: connecting, idling with heartbeats, and one task to every agent.

One site process and a few agent processes (each hosting its share of the agents, all over
loopback TCP). Measured: how long the agents take to connect (every agent welcomed), the site's
and the agents' memory per connected agent, the site's CPU while every agent is idle with
heartbeats on (default heartbeat interval, 5 s), and the time to dispatch one small task to every
agent at once and collect every result.

    python -m benchmarks --only scale [--large]

With ``--large``, 10,000 agents run twice: with Python's cyclic garbage collector as it comes,
and with its first threshold raised to ``GC_THRESHOLD`` in every process (``gc.set_threshold``),
as docs/concepts.md advises for sites with thousands of agents.
"""

from __future__ import annotations

import gc
import time
from contextlib import ExitStack
from typing import Any

from benchmarks._harness import (
    Child,
    cpu_seconds,
    echo_trainer,
    emit,
    finish_together,
    raise_fd_limit,
    report_usage,
    role_arguments,
    rss_bytes,
    run_on,
    spread,
    usage,
)

AGENT_PROCESSES = 2
GC_THRESHOLD = 50_000
"""The collector's first threshold in the tuned run (Python's default is 700)."""


def _collector(threshold: int | None) -> None:
    if threshold:
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


async def _site(agents: int, idle_s: float, rounds: int) -> None:
    import anyio

    from flare_agent_async import FlareSite

    raise_fd_limit(agents + 64)
    async with FlareSite("bench") as site:
        url = await site.listen("tcp://127.0.0.1:0")
        before = rss_bytes()
        emit(url=url)
        started = time.perf_counter()
        for n in range(agents):
            await site.wait_for_agent(f"a{n}", timeout=300)
        connected_s = time.perf_counter() - started
        per_agent = (rss_bytes() - before) / agents
        cpu_before = cpu_seconds()
        await anyio.sleep(idle_s)  # the measurement: what an idle site costs
        idle_percent = (cpu_seconds() - cpu_before) / idle_s * 100
        dispatch = []
        for _ in range(rounds):
            results = 0
            started = time.perf_counter()

            async def one(agent_id: str) -> None:
                nonlocal results
                result = await site.run_task(agent_id, "ping", {"x": 1.0})
                results += result.data == {"x": 1.0}

            async with anyio.create_task_group() as group:
                for n in range(agents):
                    group.start_soon(one, f"a{n}")
            dispatch.append(time.perf_counter() - started)
            if results != agents:
                raise AssertionError(f"{results} results of {agents} came back intact")
        emit(
            gc_threshold=gc.get_threshold()[0],
            site_connected_s=connected_s,
            site_kib_per_agent=per_agent / 1024,
            idle_cpu_percent=idle_percent,
            dispatch_s=dispatch,
        )


async def _agents(url: str, first: int, count: int) -> None:
    import anyio

    from flare_agent_async import AsyncFlareAgent

    raise_fd_limit(count + 64)
    before = rss_bytes()
    connected = 0
    all_connected = anyio.Event()
    started = time.perf_counter()

    async def trainer(agent_id: str) -> None:
        nonlocal connected
        agent = AsyncFlareAgent(
            url, agent_id=agent_id, site_name="bench", connect_timeout=300, max_backoff=1.0
        )
        async with agent:
            connected += 1
            if connected == count:
                all_connected.set()
            await echo_trainer(agent)

    async with anyio.create_task_group() as group:
        for n in range(first, first + count):
            group.start_soon(trainer, f"a{n}")
        await all_connected.wait()
        emit(
            connect_s=time.perf_counter() - started,
            agent_kib_per_agent=(rss_bytes() - before) / count / 1024,
        )


def measure(
    agents: int, backend: str, idle_s: float, rounds: int, gc_threshold: int = 0
) -> dict[str, Any]:
    """One site and ``agents`` agents spread over a few processes; one row of figures.
    ``gc_threshold``: the collector's first threshold in every process (0: Python's own)."""
    common = ("--backend", backend, "--gc-threshold", str(gc_threshold))
    site_args = ("--agents", str(agents), "--idle-s", str(idle_s), "--rounds", str(rounds))
    timeout = 120 + agents / 50 + idle_s + rounds * 30
    with Child("scale", "site", *common, *site_args) as site_process, ExitStack() as stack:
        url = site_process.expect("url")
        shares = [
            agents // AGENT_PROCESSES + (n < agents % AGENT_PROCESSES)
            for n in range(AGENT_PROCESSES)
        ]
        firsts = [sum(shares[:n]) for n in range(len(shares))]

        def agents_from(first: int, count: int) -> Child:
            args = ("--url", url, "--first", str(first), "--count", str(count))
            return stack.enter_context(Child("scale", "agents", *common, *args))

        children = [agents_from(f, c) for f, c in zip(firsts, shares, strict=True) if c]
        site, *records = finish_together([site_process, *children], timeout)
    return {
        "agents": agents,
        "backend": backend,
        "gc_threshold": site["gc_threshold"],  # what the site ran with
        "connect_s": max(record["connect_s"] for record in records),
        "site_connected_s": site["site_connected_s"],
        "site_kib_per_agent": site["site_kib_per_agent"],
        "agent_kib_per_agent": max(record["agent_kib_per_agent"] for record in records),
        "idle_cpu_percent": site["idle_cpu_percent"],
        "idle_s": idle_s,
        "dispatch_s": spread(site["dispatch_s"]),
        "site": usage(site),
        "agents_processes": [usage(record) for record in records],
    }


def main(argv: list[str] | None = None) -> None:
    args = role_arguments(
        "scale",
        argv,
        url=str,
        backend=str,
        agents=int,
        idle_s=float,
        rounds=int,
        first=int,
        count=int,
        gc_threshold=int,
    )
    _collector(args.gc_threshold)
    if args.role == "site":
        run_on(args.backend, _site, args.agents, args.idle_s, args.rounds)
    elif args.role == "agents":
        run_on(args.backend, _agents, args.url, args.first, args.count)
    else:
        raise SystemExit(f"unknown role {args.role!r}")
    report_usage()


if __name__ == "__main__":
    main()
