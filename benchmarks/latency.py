"""Small tasks one after another: what a task round trip costs, next to the floors.

Ours: a site runs small tasks on one agent (``run_task`` until the result is back), site and agent
each in a process of its own, over tcp, unix and tls; over ``memory://`` both live in one process.
The agent is an `AsyncFlareAgent`, or a `SyncFlareAgent` driven by a plain blocking loop.

The floors, measured in the same run: a 100-byte ping-pong between two processes over an anyio
TCP stream on the same event loop, the same over raw blocking sockets, and one bare
`BlockingPortal.call` (what a thread crossing costs: the sync facade's yardstick).

    python -m benchmarks --only latency floor
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from typing import Any

from benchmarks._harness import (
    Child,
    agent_options,
    anyio_backend,
    cpu_seconds,
    echo_trainer,
    emit,
    report_usage,
    role_arguments,
    run_on,
    site_and_agent,
    site_options,
    site_url,
    spread,
    usage,
)

TRANSPORTS = ("memory", "tcp", "unix", "tls")
PING = b"x" * 100


# -- ours -----------------------------------------------------------------------------------------


async def _time_tasks(site: Any, tasks: int, repeats: int) -> None:
    """Small tasks one after another on agent a1, after a warm-up; reports µs and site CPU."""
    await site.wait_for_agent("a1", timeout=60)
    for n in range(max(tasks // 10, 1)):
        await site.run_task("a1", "ping", {"n": n})
    per_task, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), cpu_seconds()
        for n in range(tasks):
            await site.run_task("a1", "ping", {"n": n})
        per_task.append((time.perf_counter() - started) / tasks * 1e6)
        cpu.append((cpu_seconds() - cpu_started) / tasks * 1e3)
    emit(task_us=per_task, site_cpu_ms_per_task=statistics.median(cpu))


async def _site(url: str, tasks: int, repeats: int, folder: str) -> None:
    from flare_agent_async import FlareSite

    async with FlareSite("bench") as site:
        emit(url=await site.listen(url, **site_options(url, folder)))
        await _time_tasks(site, tasks, repeats)


async def _async_agent(url: str, folder: str) -> None:
    from flare_agent_async import AsyncFlareAgent

    options = agent_options(url, folder)
    async with AsyncFlareAgent(url, agent_id="a1", site_name="bench", **options) as agent:
        cpu_started = cpu_seconds()
        tasks = await echo_trainer(agent)
    emit(agent_cpu_ms_per_task=(cpu_seconds() - cpu_started) / max(tasks, 1) * 1e3)


def _sync_agent(url: str, backend: str, folder: str) -> None:
    from flare_agent_async import SyncFlareAgent, TaskResult

    tasks = 0
    options = agent_options(url, folder)
    with SyncFlareAgent(url, agent_id="a1", site_name="bench", backend=backend, **options) as agent:
        cpu_started = cpu_seconds()
        for task in agent.tasks():
            agent.submit_result(TaskResult({}, task.data))
            tasks += 1
    emit(agent_cpu_ms_per_task=(cpu_seconds() - cpu_started) / max(tasks, 1) * 1e3)


async def _in_memory(tasks: int, repeats: int) -> None:
    """Site and agent in this one process over ``memory://``."""
    import anyio

    from flare_agent_async import AsyncFlareAgent, FlareSite

    async def trainer(url: str) -> None:
        async with AsyncFlareAgent(url, agent_id="a1", site_name="bench") as agent:
            await echo_trainer(agent)

    async with anyio.create_task_group() as group, FlareSite("bench") as site:
        group.start_soon(trainer, await site.listen("memory://"))
        await _time_tasks(site, tasks, repeats)


def ours(transport: str, backend: str, agent: str, tasks: int, repeats: int) -> dict[str, Any]:
    """Small-task round trips with our site and agent; one row of figures."""
    row: dict[str, Any] = {"transport": transport, "backend": backend, "agent_kind": agent}
    common = ("--backend", backend, "--tasks", str(tasks), "--repeats", str(repeats))
    if transport == "memory":
        if agent != "async":
            raise ValueError("memory:// joins a site and an agent on one event loop: async only")
        with Child("latency", "memory", *common) as both:
            records = both.finish()
        # One process: its CPU per task is both sides', counted as the site's.
        row.update(site=usage(records), agent=usage(records), agent_cpu_ms_per_task=None)
    else:
        with tempfile.TemporaryDirectory(prefix="flare-bench-") as folder:
            site_records, agent_records = site_and_agent(
                "latency",
                (*common, "--url", site_url(transport, folder), "--folder", folder),
                f"{agent}-agent",
                ("--backend", backend, "--folder", folder),
            )
        row.update(
            site=usage(site_records),
            agent=usage(agent_records),
            agent_cpu_ms_per_task=agent_records["agent_cpu_ms_per_task"],
        )
        records = site_records
    row["task_us"] = spread(records["task_us"])
    row["tasks_per_s"] = 1e6 / row["task_us"]["median"]
    row["site_cpu_ms_per_task"] = records["site_cpu_ms_per_task"]
    return row


# -- floors ---------------------------------------------------------------------------------------


async def _anyio_echo() -> None:
    import anyio
    import anyio.abc

    async def echo(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send(data)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    emit(port=listener.extra(anyio.abc.SocketAttribute.local_port))
    async with listener:
        with anyio.move_on_after(600):
            await listener.serve(echo)


async def _anyio_ping(port: int, count: int, repeats: int) -> None:
    import anyio

    async def exchange(stream: Any) -> None:
        await stream.send(PING)
        got = len(await stream.receive())
        while got < len(PING):
            got += len(await stream.receive())

    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        for _ in range(max(count // 10, 1)):
            await exchange(stream)
        per_trip = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(count):
                await exchange(stream)
            per_trip.append((time.perf_counter() - started) / count * 1e6)
    emit(trip_us=per_trip)


def _raw_echo() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    emit(port=server.getsockname()[1])
    connection, _ = server.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := connection.recv(65536):
        connection.sendall(data)


def _raw_ping(port: int, count: int, repeats: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(len(PING))

    def exchange() -> None:
        sock.sendall(PING)
        got = 0
        while got < len(PING):
            got += sock.recv_into(memoryview(buffer)[got:])

    for _ in range(max(count // 10, 1)):
        exchange()
    per_trip = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(count):
            exchange()
        per_trip.append((time.perf_counter() - started) / count * 1e6)
    sock.close()
    emit(trip_us=per_trip)


def _portal_calls(backend: str, count: int, repeats: int) -> None:
    import anyio.from_thread

    async def nothing() -> None:
        return None

    with anyio.from_thread.start_blocking_portal(*anyio_backend(backend)) as portal:
        for _ in range(max(count // 10, 1)):
            portal.call(nothing)
        per_call = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(count):
                portal.call(nothing)
            per_call.append((time.perf_counter() - started) / count * 1e6)
    emit(call_us=per_call)


def ping_pong(backend: str, count: int, repeats: int) -> dict[str, Any]:
    """A 100-byte TCP ping-pong between two processes: anyio streams on ``backend``, or raw
    blocking sockets when ``backend`` is ``"blocking"``."""
    prefix = "raw" if backend == "blocking" else "anyio"
    with Child("latency", f"{prefix}-echo", "--backend", backend) as echo:
        port = echo.expect("port")
        with Child(
            "latency",
            f"{prefix}-ping",
            "--backend",
            backend,
            "--port",
            str(port),
            "--tasks",
            str(count),
            "--repeats",
            str(repeats),
        ) as ping:
            records = ping.finish()
    return {"floor": "tcp ping-pong", "backend": backend, "us": spread(records["trip_us"])}


def portal_call(backend: str, count: int, repeats: int) -> dict[str, Any]:
    """One bare `BlockingPortal.call` of a coroutine that does nothing."""
    common = ("--tasks", str(count), "--repeats", str(repeats))
    with Child("latency", "portal", "--backend", backend, *common) as child:
        records = child.finish()
    return {"floor": "portal.call", "backend": backend, "us": spread(records["call_us"])}


# -- entry points ---------------------------------------------------------------------------------


def role(args: argparse.Namespace) -> None:
    """Run one process's part, then report its resource usage."""
    if args.role == "site":
        run_on(args.backend, _site, args.url, args.tasks, args.repeats, args.folder)
    elif args.role == "async-agent":
        run_on(args.backend, _async_agent, args.url, args.folder)
    elif args.role == "sync-agent":
        _sync_agent(args.url, args.backend, args.folder)
    elif args.role == "memory":
        run_on(args.backend, _in_memory, args.tasks, args.repeats)
    elif args.role == "anyio-echo":
        run_on(args.backend, _anyio_echo)
    elif args.role == "anyio-ping":
        run_on(args.backend, _anyio_ping, args.port, args.tasks, args.repeats)
    elif args.role == "raw-echo":
        _raw_echo()
    elif args.role == "raw-ping":
        _raw_ping(args.port, args.tasks, args.repeats)
    elif args.role == "portal":
        _portal_calls(args.backend, args.tasks, args.repeats)
    else:
        raise SystemExit(f"unknown role {args.role!r}")
    report_usage()


def main(argv: list[str] | None = None) -> None:
    role(
        role_arguments(
            "latency", argv, url=str, folder=str, port=int, backend=str, tasks=int, repeats=int
        )
    )


if __name__ == "__main__":
    main()
