"""A large model out and back: the site sends N MiB of float32 arrays to an agent, which returns
them; next to the floor, the same bytes out and back over raw blocking sockets (plain, or the
standard library's ssl for tls).

Every side runs in a process of its own, so each process's peak RSS is its own. One transfer
warms up before the measured ones, on both sides of the comparison. Memory is the
peak RSS growth during the transfers over the payload size: the site's model is built before it is
measured, so 1.0x at either end is the received copy, which has to exist somewhere.

    python -m benchmarks --only throughput floor
"""

from __future__ import annotations

import os
import socket
import ssl
import statistics
import struct
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks._harness import (
    Child,
    agent_options,
    emit,
    finish_together,
    payload,
    peak_rss_bytes,
    report_usage,
    reset_peak_rss,
    role_arguments,
    rss_bytes,
    run_on,
    site_and_agent,
    site_options,
    site_url,
    spread,
    tls_site_context,
    usage,
)

TRANSPORTS = ("tcp", "unix", "tls")

# -- ours, one process per side -------------------------------------------------------------------


async def _site(url: str, mib: float, repeats: int, folder: str, arrays: int) -> None:
    from flare_agent_async import FlareSite

    async with FlareSite("bench", heartbeat_interval=5, heartbeat_timeout=120) as site:
        emit(url=await site.listen(url, **site_options(url, folder)))
        await site.wait_for_agent("agent", timeout=60)
        data = payload(mib, arrays)
        last = f"layer{arrays - 1}"
        await site.run_task("agent", "echo", data)  # a warm-up, as the floor has one
        seconds, growth = [], []
        for _ in range(repeats):
            reset_peak_rss()
            before = rss_bytes()
            started = time.perf_counter()
            result = await site.run_task("agent", "echo", data)
            seconds.append(time.perf_counter() - started)
            growth.append(peak_rss_bytes() - before)
            if not np.array_equal(result.data[last][-10:], data[last][-10:]):
                raise AssertionError("the model came back changed")
            del result
    emit(seconds=seconds, rss_growth=statistics.median(growth))


async def _agent(url: str, folder: str) -> None:
    from flare_agent_async import AsyncFlareAgent, TaskResult

    options = agent_options(url, folder)
    async with AsyncFlareAgent(
        url, agent_id="agent", site_name="bench", connect_timeout=60, **options
    ) as agent:
        # From here on the agent holds nothing but the models it is sent: its peak over all
        # repeats is what one model costs it (it never has to hold two).
        reset_peak_rss()
        before = rss_bytes()
        async for task in agent.tasks():
            await agent.submit_result(TaskResult({}, task.data))
            del task
    emit(rss_growth=peak_rss_bytes() - before)


# -- the floor: raw blocking sockets, the same bytes ----------------------------------------------


def _receive_exactly(sock: socket.socket, size: int) -> np.ndarray:
    buffer = np.empty(size, dtype=np.uint8)
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if not count:
            raise ConnectionError("the peer closed")
        got += count
    return buffer


def _floor_echo(address: str, folder: str) -> None:
    family = socket.AF_UNIX if address.startswith("/") else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(address if family == socket.AF_UNIX else ("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(120)  # the client comes at once, or never
    context = tls_site_context(folder) if address == "tls" else None
    emit(address=address if family == socket.AF_UNIX else server.getsockname()[1])
    connection, _ = server.accept()
    if context is not None:
        connection = context.wrap_socket(connection, server_side=True)
    connection.settimeout(600)
    growth = []
    while True:
        reset_peak_rss()
        before = rss_bytes()
        try:
            header = _receive_exactly(connection, 8)
        except ConnectionError:
            break  # the client is done
        (size,) = struct.unpack("<Q", header)
        data = _receive_exactly(connection, size)
        connection.sendall(memoryview(data))
        del data
        growth.append(peak_rss_bytes() - before)
    emit(rss_growth=statistics.median(growth))


def _floor_client(address: str, mib: float, repeats: int, folder: str) -> None:
    family = socket.AF_UNIX if address.startswith("/") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(600)
    sock.connect(address if family == socket.AF_UNIX else ("127.0.0.1", int(address)))
    ca = os.path.join(folder, "ca.pem")
    if os.path.exists(ca):  # the echo made a CA: blocking ssl sockets, the tls floor
        context = ssl.create_default_context(cafile=ca)
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    data = np.ones(int(mib * 2**20), dtype=np.uint8)  # the model's bytes, in one piece
    seconds, growth = [], []
    for repeat in range(-1, repeats):  # -1: a warm-up, not counted
        reset_peak_rss()
        before = rss_bytes()
        started = time.perf_counter()
        sock.sendall(struct.pack("<Q", data.nbytes))
        sock.sendall(memoryview(data))
        back = _receive_exactly(sock, data.nbytes)
        if repeat >= 0:
            seconds.append(time.perf_counter() - started)
            growth.append(peak_rss_bytes() - before)
        del back
    sock.close()
    emit(seconds=seconds, rss_growth=statistics.median(growth))


# -- the runner -----------------------------------------------------------------------------------


def _row(
    scenario: str,
    transport: str,
    backend: str,
    mib: float,
    site: dict[str, Any],
    agent: dict[str, Any],
    arrays: int,
) -> dict[str, Any]:
    payload_bytes = mib * 2**20
    seconds = spread(site["seconds"])
    return {
        "scenario": scenario,
        "transport": transport,
        "backend": backend,
        "mib": mib,
        "arrays": arrays,
        "seconds": seconds,
        "gbytes_per_s": 2 * payload_bytes / seconds["median"] / 1e9,
        "site_rss_x": site["rss_growth"] / payload_bytes,
        "agent_rss_x": agent["rss_growth"] / payload_bytes,
        "site": usage(site),
        "agent": usage(agent),
    }


def floor(transport: str, mib: float, repeats: int) -> dict[str, Any]:
    """The same bytes out and back over raw blocking sockets: tcp, unix, or tcp wrapped in the
    standard library's ssl (the tls floor)."""
    with tempfile.TemporaryDirectory(prefix="flare-bench-") as folder:
        address = os.path.join(folder, "floor.sock") if transport == "unix" else transport
        with Child("throughput", "floor-echo", "--address", address, "--folder", folder) as echo:
            bound = echo.expect("address")
            common = ("--mib", str(mib), "--repeats", str(repeats), "--folder", folder)
            with Child("throughput", "floor-client", "--address", str(bound), *common) as client:
                site, agent = finish_together([client, echo])
    return _row("floor", transport, "blocking", mib, site, agent, 1)


def ours(transport: str, backend: str, mib: float, repeats: int, arrays: int = 8) -> dict[str, Any]:
    """Our site and agent, one process each, one model of ``arrays`` arrays out and back
    ``repeats`` times."""
    with tempfile.TemporaryDirectory(prefix="flare-bench-") as folder:
        common = ("--backend", backend, "--folder", folder)
        sizes = ("--mib", str(mib), "--repeats", str(repeats), "--arrays", str(arrays))
        site, agent = site_and_agent(
            "throughput", ("--url", site_url(transport, folder), *common, *sizes), "agent", common
        )
    return _row("flare_agent_async", transport, backend, mib, site, agent, arrays)


def main(argv: list[str] | None = None) -> None:
    args = role_arguments(
        "throughput",
        argv,
        url=str,
        address=str,
        folder=str,
        backend=str,
        mib=float,
        repeats=int,
        arrays=int,
    )
    if args.role == "site":
        run_on(args.backend, _site, args.url, args.mib, args.repeats, args.folder, args.arrays)
    elif args.role == "agent":
        run_on(args.backend, _agent, args.url, args.folder)
    elif args.role == "floor-echo":
        _floor_echo(args.address, args.folder)
    elif args.role == "floor-client":
        _floor_client(args.address, args.mib, args.repeats, args.folder)
    else:
        raise SystemExit(f"unknown role {args.role!r}")
    report_usage()


if __name__ == "__main__":
    main()
