"""The benchmark suite: us, NVFlare's IPCAgent and the physical floor, measured in one run.

    python -m benchmarks                 # the full run (about 11 minutes on 2 cores)
    python -m benchmarks --quick         # every scenario, tiny sizes (under a minute)
    python -m benchmarks --large         # adds 1 GiB models and 10,000 agents
    python -m benchmarks --report        # also writes docs/benchmarks.md and docs/img/*.png
    python -m benchmarks --only latency floor --json figures.json

Scenarios: latency (small task round trips per transport, event loop and agent kind), throughput
(a model out and back per size and transport), scale (many agents on one site), floor (raw
sockets, anyio streams and a bare portal call on the same machine, in the same run), nvflare (the
same latency and throughput with NVFlare's IPCAgent; skipped when nvflare is not installed), job
(one FedAvg job in NVFlare's simulator, its trainer on NVFlare's Client API, in and out of
process, on our agent and on our Client API: time per task and round, each process's peak RSS;
skipped without nvflare).
Each figure is the median of repeated runs, with its spread, and every process reports its peak
RSS and CPU seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import job, latency, nvflare_ipc, report, scale, throughput
from benchmarks._harness import ROOT, ChildFailed, available_backends

SCENARIOS = ("latency", "throughput", "scale", "floor", "nvflare", "job")


@dataclass
class Plan:
    """What one run measures: sizes, counts and which combinations."""

    tasks: int = 3000
    repeats: int = 3
    transports: tuple[str, ...] = latency.TRANSPORTS
    sync_transports: tuple[str, ...] = ("tcp", "unix", "tls")  # a sync agent needs a wire
    backends: tuple[str, ...] = field(default_factory=lambda: tuple(available_backends()))
    sizes_mib: tuple[float, ...] = (1, 64, 512)
    throughput_transports: tuple[str, ...] = throughput.TRANSPORTS
    throughput_repeats: int = 5  # fresh memory is slow to touch here: more runs, a steadier median
    agents: tuple[int, ...] = (100, 1000)
    scale_backends: tuple[str, ...] = ("asyncio", "trio")
    idle_s: float = 10.0
    rounds: int = 3
    nvflare_tasks: int = 20
    nvflare_sizes_mib: tuple[float, ...] = (1, 64, 512)
    single_array_mib: float | None = None  # one array this large out and back (--large)
    single_array_repeats: int = 3
    job_setups: tuple[str, ...] = tuple(job.SETUPS)
    job_sizes: tuple[tuple[float, int], ...] = ((job.TINY_MIB, 6), (64, 4), (512, 3))
    """The job scenario's models, as (MiB, rounds); the tiny one first, the others' baseline."""
    job_request_interval_s: float | None = None  # None: NVFlare's default (2 s)

    @classmethod
    def quick(cls) -> Plan:
        """Every scenario at tiny sizes: a smoke test of the suite, not figures to quote."""
        return cls(
            tasks=100,
            repeats=1,
            transports=latency.TRANSPORTS,
            sync_transports=("tcp",),
            backends=("asyncio", "trio"),
            sizes_mib=(1, 4),
            throughput_transports=("tcp", "tls"),
            throughput_repeats=1,
            agents=(50,),
            scale_backends=("asyncio",),
            idle_s=1.0,
            rounds=1,
            nvflare_tasks=3,
            nvflare_sizes_mib=(1,),
            job_setups=("C", "D"),  # A and B, NVFlare's own, would add about 20 s each
            job_sizes=((job.TINY_MIB, 2),),
            job_request_interval_s=0.05,
        )

    def available(self) -> None:
        """Keep only the event loops installed here."""
        installed = available_backends()
        self.backends = tuple(b for b in self.backends if b in installed)
        self.scale_backends = tuple(b for b in self.scale_backends if b in installed)

    def enlarge(self) -> None:
        """``--large``: 1 GiB models, 10,000 agents."""
        self.sizes_mib = (*self.sizes_mib, 1024)
        self.nvflare_sizes_mib = (*self.nvflare_sizes_mib, 1024)
        self.single_array_mib = 2560  # past 2 GiB: no 2 GiB limit anywhere
        self.job_sizes = (*self.job_sizes, (1024, 3))
        self.agents = (*self.agents, 10_000)


Step = tuple[str, str, Callable[[], Any]]


def steps(plan: Plan, only: set[str]) -> Iterator[Step]:
    """Every measurement of the run, as (scenario, description, thunk)."""
    if "floor" in only:
        yield (
            "floor",
            "tcp ping-pong, raw sockets",
            lambda: latency.ping_pong("blocking", plan.tasks, plan.repeats),
        )
        for backend in plan.backends:
            yield (
                "floor",
                f"tcp ping-pong, anyio on {backend}",
                lambda b=backend: latency.ping_pong(b, plan.tasks, plan.repeats),
            )
            yield (
                "floor",
                f"portal.call on {backend}",
                lambda b=backend: latency.portal_call(b, plan.tasks, plan.repeats),
            )
        for transport in ("tcp", "unix", "tls"):
            if transport in plan.throughput_transports:
                for mib in plan.sizes_mib:
                    yield (
                        "floor",
                        f"{mib:g} MiB out and back over raw {transport} sockets",
                        lambda t=transport, m=mib: throughput.floor(t, m, plan.throughput_repeats),
                    )
                if plan.single_array_mib:
                    yield (
                        "floor",
                        f"{plan.single_array_mib:g} MiB out and back over raw {transport} sockets",
                        lambda t=transport, m=plan.single_array_mib: throughput.floor(
                            t, m, plan.single_array_repeats
                        ),
                    )
    if "latency" in only:
        for backend in plan.backends:
            for transport in plan.transports:
                kinds = ("async", "sync") if transport in plan.sync_transports else ("async",)
                for agent in kinds:
                    yield (
                        "latency",
                        f"small tasks, {transport}, {backend}, {agent} agent",
                        lambda t=transport, b=backend, a=agent: latency.ours(
                            t, b, a, plan.tasks, plan.repeats
                        ),
                    )
    if "throughput" in only:
        for transport in plan.throughput_transports:
            for backend in plan.backends:
                for mib in plan.sizes_mib:
                    yield (
                        "throughput",
                        f"{mib:g} MiB out and back, {transport}, {backend}",
                        lambda t=transport, b=backend, m=mib: throughput.ours(
                            t, b, m, plan.throughput_repeats
                        ),
                    )
                if plan.single_array_mib and backend in plan.scale_backends:
                    yield (
                        "throughput",
                        f"one {plan.single_array_mib:g} MiB array out and back, {transport}, "
                        f"{backend}",
                        lambda t=transport, b=backend, m=plan.single_array_mib: throughput.ours(
                            t, b, m, plan.single_array_repeats, arrays=1
                        ),
                    )
    if "scale" in only:
        for backend in plan.scale_backends:
            for count in plan.agents:
                yield (
                    "scale",
                    f"{count:,} agents, {backend}",
                    lambda n=count, b=backend: scale.measure(n, b, plan.idle_s, plan.rounds),
                )
                if count >= 10_000:
                    yield (
                        "scale",
                        f"{count:,} agents, {backend}, gc threshold {scale.GC_THRESHOLD:,}",
                        lambda n=count, b=backend: scale.measure(
                            n, b, plan.idle_s, plan.rounds, gc_threshold=scale.GC_THRESHOLD
                        ),
                    )
    if "nvflare" in only and nvflare_ipc.unavailable() is None:
        yield (
            "nvflare",
            "NVFlare IPCAgent, small tasks",
            lambda: {"kind": "latency", **nvflare_ipc.latency(plan.nvflare_tasks, plan.repeats)},
        )
        for mib in plan.nvflare_sizes_mib:
            yield (
                "nvflare",
                f"NVFlare IPCAgent, {mib:g} MiB out and back",
                lambda m=mib: {
                    "kind": "throughput",
                    "mib": m,
                    **nvflare_ipc.throughput(m, plan.throughput_repeats),
                },
            )
    if "job" in only and job.unavailable() is None:
        series = job.Series(plan.job_request_interval_s)
        for mib, rounds in plan.job_sizes:
            for setup in plan.job_setups:  # every setup at one size, then the next: noise spreads
                yield (
                    "job",
                    f"NVFlare job, {job.size_name(mib)}, {setup}: {job.SETUPS[setup]}",
                    lambda s=setup, m=mib, r=rounds: series.measure(s, m, r),
                )


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The machine and the versions a figure was measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    names = ("flare-agent-async", "anyio", "trio", "uvloop", "msgspec", "numpy", "nvflare")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "system": platform.platform(),
        },
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in names},
    }


def run(plan: Plan, only: set[str], console: Console) -> dict[str, Any]:
    """Measure every step of the plan, showing progress; the figures, by scenario."""
    figures: dict[str, Any] = {
        "environment": environment(),
        "plan": plan.__dict__.copy(),
        "errors": [],
    }
    for scenario in SCENARIOS:
        figures[scenario] = [] if scenario in only else None
    for scenario, unavailable in (("nvflare", nvflare_ipc.unavailable), ("job", job.unavailable)):
        if scenario in only and (reason := unavailable()) is not None:
            console.print(f"[yellow]{scenario} scenario skipped:[/] {reason}")
            figures[scenario] = {"skipped": reason}
    todo = list(steps(plan, only))
    started = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("benchmarks", total=len(todo))
        for scenario, description, measure in todo:
            progress.update(bar, description=description)
            try:
                row = measure()
            except ChildFailed as exc:  # one broken step does not cost the run
                figures["errors"].append(
                    {"scenario": scenario, "step": description, "error": str(exc)}
                )
                console.print(f"[red]{scenario:10} {description}: failed: {exc}[/]")
            else:
                figures[scenario].append(row)
                console.print(f"[dim]{scenario:10}[/] {description}: {summarise(scenario, row)}")
            progress.advance(bar)
    figures["seconds"] = time.perf_counter() - started
    return figures


def summarise(scenario: str, row: dict[str, Any]) -> str:
    """One row's headline figure, for the progress log."""
    if scenario == "latency":
        return f"{row['task_us']['median']:.1f} µs per task"
    if scenario == "floor":
        if "us" in row:
            return f"{row['us']['median']:.1f} µs"
        return f"{row['gbytes_per_s']:.2f} GB/s"
    if scenario == "throughput":
        return (
            f"{row['gbytes_per_s']:.2f} GB/s, RSS site {row['site_rss_x']:.2f}x, "
            f"agent {row['agent_rss_x']:.2f}x"
        )
    if scenario == "scale":
        return (
            f"connect {row['connect_s']:.2f} s, {row['site_kib_per_agent']:.1f} KiB/agent, "
            f"idle {row['idle_cpu_percent']:.2f}% CPU, "
            f"all tasks in {row['dispatch_s']['median']:.3f} s"
        )
    if scenario == "job":
        memory = f"CJ {_peak(row['client_job'])}, trainer {_peak(row['trainer'])}"
        return (
            f"dispatch to result {row['dispatch_to_result_ms']['median']:.0f} ms, "
            f"execute() {row['execute_ms']['median']:.0f} ms "
            f"(task in {row['task_in_ms']['median']:.0f} ms before it, "
            f"result out {row['result_out_ms']['median']:.0f} ms after it), {memory}, "
            f"{row['wall_s']:.0f} s, "
            + ("ok" if row["ok"] else "NOT OK: " + "; ".join(row["problems"]))
        )
    if row.get("kind") == "latency":
        return f"{row['task_us']['median'] / 1000:.1f} ms per task"
    return f"{row['gbytes_per_s']:.2f} GB/s, agent RSS {row['agent_rss_x']:.2f}x"


def _peak(process: dict[str, Any] | None) -> str:
    """A job process's peak RSS, and its growth over the model when known."""
    if process is None:
        return "none"
    growth = process["growth_x"]
    return f"{process['peak_rss_mib']:.0f} MiB" + ("" if growth is None else f" ({growth:.2f}x)")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="every scenario at tiny sizes")
    parser.add_argument("--large", action="store_true", help="add 1 GiB models, 10,000 agents")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--repeats", type=int, help="runs per figure (default 3; quick: 1)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument(
        "--job-setups",
        nargs="+",
        choices=tuple(job.SETUPS),
        help="the job scenario's setups (default: all)",
    )
    parser.add_argument(
        "--job-rounds",
        type=int,
        help="rounds of each job with a model of 1 MiB and more (the tiny baseline keeps its own)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write docs/benchmarks.md and docs/img/*.png from this run",
    )
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: report the figures of an earlier run's --json file",
    )
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    default_docs = os.path.join(ROOT, "docs")
    if args.report and args.quick and os.path.abspath(args.docs) == default_docs:
        parser.error("--quick figures are a smoke test: --report them elsewhere with --docs DIR")
    signal.signal(signal.SIGTERM, _terminate)  # unwind, so that no benchmark process is left
    if args.from_json:
        with open(args.from_json) as saved:
            figures = json.load(saved)
    else:
        plan = Plan.quick() if args.quick else Plan()
        plan.available()
        if args.large:
            plan.enlarge()
        if args.repeats:
            plan.repeats = plan.throughput_repeats = args.repeats
        if args.job_setups:
            plan.job_setups = tuple(args.job_setups)
        if args.job_rounds is not None:
            if args.job_rounds < 2:
                parser.error("--job-rounds: at least 2 (the first round is not measured)")
            plan.job_sizes = tuple(
                (mib, rounds if mib < 1 else args.job_rounds) for mib, rounds in plan.job_sizes
            )
        figures = run(plan, set(args.only), console)
        command = sys.argv[1:] if argv is None else argv
        figures["command"] = " ".join(["python -m benchmarks", *command])
    report.check_targets(figures)
    print(report.markdown_tables(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    if args.report:
        written = report.write(figures, args.docs)
        console.print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
