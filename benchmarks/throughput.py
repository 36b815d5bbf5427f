"""A large model out and back: the site sends N MiB of float32 arrays to an agent, which returns
them; next to the floor, the same bytes out and back over raw blocking sockets.

Every side runs in its own process, so each process's peak RSS is its own. Memory is reported as
peak RSS above the process's RSS just before the transfer (the site's payload already built), in
multiples of the payload: 1.0x is the data received, which has to exist somewhere.

    python -m benchmarks.throughput [--mib 512] [--repeats 3] [--transports tcp unix]
                                    [--backends asyncio trio] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def payload(mib: int) -> dict[str, np.ndarray]:
    arrays = 8
    count = mib * 2**20 // 4 // arrays
    return {f"layer{n}": np.full(count, n, dtype=np.float32) for n in range(arrays)}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# -- flare_agent_async, one process per side ----------------------------------------------------


def run_site(url: str, mib: int, repeats: int, backend: str) -> None:
    import anyio

    from flare_agent_async import FlareSite

    async def main() -> None:
        async with FlareSite("bench", heartbeat_interval=5, heartbeat_timeout=120) as site:
            emit({"url": await site.listen(url)})
            await site.wait_for_agent("agent", timeout=60)
            data = payload(mib)
            seconds, growth = [], []
            for _ in range(repeats):
                before = rss_bytes()
                started = time.perf_counter()
                result = await site.run_task("agent", "echo", data)
                seconds.append(time.perf_counter() - started)
                growth.append(peak_rss_bytes() - before)
                assert np.array_equal(result.data["layer7"][:10], data["layer7"][:10])
                del result
        emit({"seconds": seconds, "site_peak_growth": max(growth)})

    anyio.run(main, backend=backend)


def run_agent(url: str, backend: str) -> None:
    import anyio

    from flare_agent_async import AsyncFlareAgent, TaskResult

    async def main() -> None:
        before = rss_bytes()
        agent = AsyncFlareAgent(url, agent_id="agent", site_name="bench", connect_timeout=60)
        async with agent:
            async for task in agent.tasks():
                await agent.submit_result(TaskResult({}, task.data))
                del task
        emit({"agent_peak_growth": peak_rss_bytes() - before})

    anyio.run(main, backend=backend)


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


def run_floor_echo(address: str) -> None:
    family = socket.AF_UNIX if address.startswith("/") else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(address if family == socket.AF_UNIX else ("127.0.0.1", 0))
    server.listen(1)
    emit({"address": address if family == socket.AF_UNIX else server.getsockname()[1]})
    connection, _ = server.accept()
    before = rss_bytes()
    while header := connection.recv(8):
        (size,) = struct.unpack("<Q", header)
        data = _receive_exactly(connection, size)
        connection.sendall(memoryview(data))
        del data
    emit({"agent_peak_growth": peak_rss_bytes() - before})


def run_floor_client(address: str | int, mib: int, repeats: int) -> None:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address if isinstance(address, str) else ("127.0.0.1", address))
    data = np.concatenate([array.view(np.uint8) for array in payload(mib).values()])
    seconds, growth = [], []
    for _ in range(repeats):
        before = rss_bytes()
        started = time.perf_counter()
        sock.sendall(struct.pack("<Q", data.nbytes) + b"")
        sock.sendall(memoryview(data))
        back = _receive_exactly(sock, data.nbytes)
        seconds.append(time.perf_counter() - started)
        growth.append(peak_rss_bytes() - before)
        del back
    sock.close()
    emit({"seconds": seconds, "site_peak_growth": max(growth)})


# -- the runner -----------------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.throughput", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def _records(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=600)
    if process.returncode:
        raise RuntimeError(f"{process.args} failed with exit status {process.returncode}")
    merged: dict[str, Any] = {}
    for line in out.splitlines():
        merged.update(json.loads(line))
    return merged


def measure(scenario: str, transport: str, backend: str, mib: int, repeats: int) -> dict[str, Any]:
    """One scenario, site and agent in two fresh processes; the figures as a dict."""
    folder = tempfile.mkdtemp(dir="/tmp")
    if scenario == "floor":
        address = os.path.join(folder, "floor.sock") if transport == "unix" else "tcp"
        echo = _spawn("--role", "floor-echo", "--address", address)
        assert echo.stdout is not None
        bound = json.loads(echo.stdout.readline())["address"]
        client = _spawn(
            "--role",
            "floor-client",
            "--address",
            str(bound),
            "--mib",
            str(mib),
            "--repeats",
            str(repeats),
        )
        site_record, agent_record = _records(client), _records(echo)
    else:
        url = f"unix://{folder}/site.sock" if transport == "unix" else "tcp://127.0.0.1:0"
        site = _spawn(
            "--role",
            "site",
            "--url",
            url,
            "--mib",
            str(mib),
            "--repeats",
            str(repeats),
            "--backend",
            backend,
        )
        assert site.stdout is not None
        bound_url = json.loads(site.stdout.readline())["url"]
        agent = _spawn("--role", "agent", "--url", bound_url, "--backend", backend)
        site_record, agent_record = _records(site), _records(agent)
    payload_bytes = mib * 2**20
    seconds = statistics.median(site_record["seconds"])
    return {
        "scenario": scenario,
        "transport": transport,
        "backend": backend if scenario != "floor" else "blocking",
        "mib": mib,
        "seconds": seconds,
        "seconds_all": site_record["seconds"],
        "gbytes_per_s": 2 * payload_bytes / seconds / 1e9,
        "site_rss_x": site_record["site_peak_growth"] / payload_bytes,
        "agent_rss_x": agent_record["agent_peak_growth"] / payload_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", nargs="+", default=["tcp", "unix"])
    parser.add_argument("--backends", nargs="+", default=["asyncio", "trio"])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="asyncio", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "site":
        run_site(args.url, args.mib, args.repeats, args.backend)
    elif args.role == "agent":
        run_agent(args.url, args.backend)
    elif args.role == "floor-echo":
        run_floor_echo(args.address)
    elif args.role == "floor-client":
        address = args.address if args.address.startswith("/") else int(args.address)
        run_floor_client(address, args.mib, args.repeats)
    else:
        report(args)


def report(args: argparse.Namespace) -> None:
    rows = []
    for transport in args.transports:
        rows.append(measure("floor", transport, "", args.mib, args.repeats))
        for backend in args.backends:
            rows.append(measure("flare_agent_async", transport, backend, args.mib, args.repeats))
    print(f"{args.mib} MiB out and back, median of {args.repeats}; RSS: peak growth / payload")
    columns = ("scenario", "transport", "backend", "GB/s", "s", "site", "agent")
    print("{:18} {:9} {:9} {:>6} {:>6} {:>6} {:>6}".format(*columns))
    for row in rows:
        print(
            f"{row['scenario']:18} {row['transport']:9} {row['backend']:9} "
            f"{row['gbytes_per_s']:6.2f} {row['seconds']:6.2f} "
            f"{row['site_rss_x']:5.2f}x {row['agent_rss_x']:5.2f}x"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
