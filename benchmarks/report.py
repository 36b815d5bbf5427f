"""The report of a benchmark run: targets checked, Markdown tables, plots, the docs page."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.job import size_name

PAGE = "benchmarks.md"
IMAGES = "img"
TARGET_MIB = 512  # the model size the throughput and memory targets speak of
JOB_TARGET_MIB = 64  # the job's targets speak of models this size and larger


# -- targets --------------------------------------------------------------------------------------


def _target(figures: dict[str, Any], name: str, measured: str, met: bool) -> None:
    figures.setdefault("targets", []).append({"target": name, "measured": measured, "met": met})


def _floor_us(figures: dict[str, Any], kind: str, backend: str) -> float | None:
    for row in figures.get("floor") or []:
        if row.get("floor") == kind and row["backend"] == backend:
            return float(row["us"]["median"])
    return None


def _latency(figures: dict[str, Any], transport: str, backend: str, agent: str) -> float | None:
    for row in figures.get("latency") or []:
        if (row["transport"], row["backend"], row["agent_kind"]) == (transport, backend, agent):
            return float(row["task_us"]["median"])
    return None


def _nvflare_rows(figures: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    rows = figures.get("nvflare")
    return [row for row in rows if row["kind"] == kind] if isinstance(rows, list) else []


def nvflare_task_us(figures: dict[str, Any]) -> float | None:
    """NVFlare's small-task round trip in this run, if measured."""
    rows = _nvflare_rows(figures, "latency")
    return float(rows[0]["task_us"]["median"]) if rows else None


def _throughput_floor(figures: dict[str, Any], transport: str, mib: float) -> float | None:
    for row in figures.get("floor") or []:
        if row.get("scenario") == "floor" and (row["transport"], row["mib"]) == (transport, mib):
            return float(row["gbytes_per_s"])
    return None


def _job_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    rows = figures.get("job")
    return rows if isinstance(rows, list) else []


def _job_row(figures: dict[str, Any], setup: str, mib: float) -> dict[str, Any] | None:
    for row in _job_rows(figures):
        if (row["setup"], row["mib"]) == (setup, mib):
            return row
    return None


def _whole_client_mib(row: dict[str, Any]) -> float:
    """The client's peak RSS in a job: its client job's and its trainer's, added."""
    trainer = row["trainer"]["peak_rss_mib"] if row["trainer"] else 0.0
    return float(row["client_job"]["peak_rss_mib"] + trainer)


def _check_job(figures: dict[str, Any]) -> None:
    """Ours (C and D) in a job against NVFlare's Client API in an external process (A)."""
    for row in _job_rows(figures):
        if row["setup"] not in ("C", "D"):
            continue
        where = f"job, {size_name(row['mib'])}, {row['setup']}"
        ours_ms = row["dispatch_to_result_ms"]["median"]
        theirs = _job_row(figures, "A", row["mib"])
        theirs_ms = theirs["dispatch_to_result_ms"]["median"] if theirs else 0.0
        if row["mib"] < 1:  # the tiny model: what a task costs, not what it carries
            if theirs is not None:
                _target(
                    figures,
                    f"dispatch to result no worse than A's ({where})",
                    f"{ours_ms:.1f} ms, A's {theirs_ms:.1f} ms",
                    ours_ms <= theirs_ms,
                )
            continue
        if row["mib"] < JOB_TARGET_MIB:
            continue
        for role, name, limit in (
            ("client_job", "CJ", 2.0),
            ("trainer", "echo trainer's", 1.3),
        ):
            process = row[role]
            if process and process["growth_x"] is not None:
                _target(
                    figures,
                    f"{name} peak RSS growth at most {limit:g}x the model ({where})",
                    f"{process['growth_x']:.2f}x (peak {process['peak_rss_mib']:,.0f} MiB)",
                    process["growth_x"] <= limit,
                )
        if theirs is None:
            continue
        if row["client_job"] and theirs["client_job"]:
            ours_mib, theirs_mib = _whole_client_mib(row), _whole_client_mib(theirs)
            _target(
                figures,
                f"the whole client (CJ + trainer peaks) below NVFlare's external process (A) "
                f"({where})",
                f"{ours_mib:,.0f} MiB, A's {theirs_mib:,.0f} MiB",
                ours_mib < theirs_mib,
            )
        _target(
            figures,
            f"dispatch to result at most 0.8x A's ({where})",
            f"{ours_ms:,.0f} ms = {ours_ms / theirs_ms:.2f}x of A's {theirs_ms:,.0f} ms",
            ours_ms <= 0.8 * theirs_ms,
        )


def check_targets(figures: dict[str, Any]) -> None:
    """Compare the run with the project's targets; the verdicts go to ``figures["targets"]``."""
    figures["targets"] = []
    nvflare_us = nvflare_task_us(figures)
    for backend in figures["plan"]["backends"]:
        ours = _latency(figures, "tcp", backend, "async")
        floor = _floor_us(figures, "tcp ping-pong", backend)
        if ours is not None and floor is not None:
            bound = 2.0 if backend == "asyncio" else 2.5  # uvloop's and trio's floors are lower
            _target(
                figures,
                f"small task over tcp within {bound:g}x an anyio ping-pong ({backend})",
                f"{ours:.0f} µs = {ours / floor:.2f}x of {floor:.0f} µs",
                ours <= bound * floor,
            )
        if ours is not None and nvflare_us is not None:
            _target(
                figures,
                f"small task over tcp at least 1,000x faster than NVFlare's IPCAgent ({backend})",
                f"{nvflare_us / 1000:.0f} ms / {ours:.0f} µs = {nvflare_us / ours:,.0f}x",
                nvflare_us / ours >= 1000,
            )
        sync = _latency(figures, "tcp", backend, "sync")
        portal = _floor_us(figures, "portal.call", backend)
        if ours is not None and sync is not None and portal is not None:
            added = sync - ours
            _target(
                figures,
                f"sync facade adds at most 2 portal.calls per task, +10% ({backend})",
                f"{added:.0f} µs = {added / portal:.1f} x {portal:.0f} µs",
                added <= 2.2 * portal,
            )
    for row in figures.get("throughput") or []:
        if row.get("arrays") == 1:
            _check_single_array(figures, row)
        if row["mib"] != TARGET_MIB:
            continue
        where = f"{row['transport']}, {row['backend']}"
        floor_rate = _throughput_floor(figures, row["transport"], TARGET_MIB)
        if floor_rate is not None:
            _target(
                figures,
                f"{TARGET_MIB} MiB out and back at least half the raw-socket floor ({where})",
                f"{row['gbytes_per_s']:.2f} GB/s = {row['gbytes_per_s'] / floor_rate:.0%} "
                f"of {floor_rate:.2f}",
                row["gbytes_per_s"] >= floor_rate / 2,
            )
        worst = max(row["site_rss_x"], row["agent_rss_x"])
        _target(
            figures,
            f"{TARGET_MIB} MiB: peak RSS growth at most 1.3x the model per process ({where})",
            f"site {row['site_rss_x']:.2f}x, agent {row['agent_rss_x']:.2f}x",
            worst <= 1.3,
        )
    for row in figures.get("scale") or []:
        where = f"{row['agents']:,} agents, {row['backend']}{_collector(row)}"
        dispatch = row["dispatch_s"]["median"]
        if row["agents"] == 1000:
            _target(
                figures,
                f"idle site under 5% of a core with heartbeats on ({where})",
                f"{row['idle_cpu_percent']:.2f}%",
                row["idle_cpu_percent"] < 5,
            )
            _target(
                figures,
                f"one task to every agent and every result back under 0.5 s ({where})",
                f"{dispatch:.3f} s",
                dispatch < 0.5,
            )
        if row["agents"] == 10_000:
            _target(
                figures,
                f"one task to every agent and every result back under 2 s ({where})",
                f"{dispatch:.3f} s",
                dispatch < 2,
            )
            _target(
                figures,
                f"under 50 KiB of site RSS per connected agent ({where})",
                f"{row['site_kib_per_agent']:.1f} KiB",
                row["site_kib_per_agent"] < 50,
            )
    _check_job(figures)


# -- tables ---------------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu(row: dict[str, Any]) -> str:
    site = f"{row['site_cpu_ms_per_task'] * 1e3:.0f}"
    if row["agent_cpu_ms_per_task"] is None:  # one process: both sides' CPU is the site's
        return f"{site} (both, one process)"
    return f"{site} / {row['agent_cpu_ms_per_task'] * 1e3:.0f}"


def _us(spread: dict[str, Any]) -> str:
    return f"{spread['median']:,.1f} ({spread['min']:,.1f}-{spread['max']:,.1f})"


def targets_table(figures: dict[str, Any]) -> str:
    """The targets checked, what was measured, and whether each is met."""
    return table(
        ("target", "measured", "met"),
        ((t["target"], t["measured"], "yes" if t["met"] else "**no**") for t in figures["targets"]),
    )


def latency_table(figures: dict[str, Any]) -> str:
    """Small tasks: ours per transport, event loop and agent, against the floor and NVFlare."""
    nvflare_us = nvflare_task_us(figures)
    rows = []
    for row in figures.get("latency") or []:
        floor = _floor_us(figures, "tcp ping-pong", row["backend"])
        median = row["task_us"]["median"]
        rows.append(
            (
                row["transport"],
                row["backend"],
                row["agent_kind"],
                _us(row["task_us"]),
                f"{row['tasks_per_s']:,.0f}",
                _cpu(row),
                f"{median / floor:.1f}x" if floor else "",
                f"{nvflare_us / median:,.0f}x" if nvflare_us else "",
            )
        )
    header = (
        "transport",
        "event loop",
        "agent",
        "µs per task, median (min-max)",
        "tasks/s",
        "CPU µs per task, site / agent",
        "/ anyio ping-pong",
        "faster than NVFlare",
    )
    return table(header, rows)


def floor_table(figures: dict[str, Any]) -> str:
    """The machine without us: ping-pongs, a portal call, bulk copies."""
    rows = []
    for row in figures.get("floor") or []:
        if "us" in row:
            rows.append((row["floor"], row["backend"], f"{_us(row['us'])} µs"))
        else:
            rows.append(
                (
                    f"{row['mib']:g} MiB out and back, raw {row['transport']} sockets",
                    "blocking",
                    f"{_gbytes(row)} GB/s",
                )
            )
    return table(("floor", "event loop", "median (min-max)"), rows)


def _gbytes(row: dict[str, Any]) -> str:
    """GB/s of the median run, and of the slowest and fastest."""
    model = 2 * row["mib"] * 2**20 / 1e9  # out and back
    seconds = row["seconds"]
    return f"{row['gbytes_per_s']:.2f} ({model / seconds['max']:.2f}-{model / seconds['min']:.2f})"


def _check_single_array(figures: dict[str, Any], row: dict[str, Any]) -> None:
    """One array past 2 GiB: it went out and back intact (the run checks), at half the floor."""
    floor_rate = _throughput_floor(figures, row["transport"], row["mib"])
    if floor_rate is not None:
        _target(
            figures,
            f"one {row['mib']:g} MiB array out and back at least half the raw-socket floor "
            f"({row['transport']}, {row['backend']})",
            f"{row['gbytes_per_s']:.2f} GB/s = {row['gbytes_per_s'] / floor_rate:.0%} "
            f"of {floor_rate:.2f}",
            row["gbytes_per_s"] >= floor_rate / 2,
        )


def throughput_table(figures: dict[str, Any]) -> str:
    """Models out and back: ours per size, transport and event loop, against the floor and
    NVFlare's agent measured in the same run."""
    nvflare = {row["mib"]: row for row in _nvflare_rows(figures, "throughput")}
    rows = []
    for row in figures.get("throughput") or []:
        floor_rate = _throughput_floor(figures, row["transport"], row["mib"])
        theirs = nvflare.get(row["mib"])
        rows.append(
            (
                f"{row['mib']:g} MiB" + (", one array" if row.get("arrays") == 1 else ""),
                row["transport"],
                row["backend"],
                _gbytes(row),
                f"{row['gbytes_per_s'] / floor_rate:.0%}" if floor_rate else "",
                f"{row['gbytes_per_s'] / theirs['gbytes_per_s']:.1f}x" if theirs else "",
                f"{row['site_rss_x']:.2f}x / {row['agent_rss_x']:.2f}x",
                f"{theirs['agent_rss_x']:.2f}x" if theirs else "",
                f"{row['site']['peak_rss_mib']:,.0f} / {row['agent']['peak_rss_mib']:,.0f}",
                f"{row['site']['cpu_s']:.1f} / {row['agent']['cpu_s']:.1f}",
            )
        )
    header = (
        "model",
        "transport",
        "event loop",
        "GB/s, median (min-max)",
        "of the floor",
        "NVFlare's speed",
        "RSS growth / model, site / agent",
        "NVFlare's agent",
        "peak RSS MiB, site / agent",
        "CPU s, site / agent",
    )
    return table(header, rows)


def _collector(row: dict[str, Any]) -> str:
    """A scale row's collector, when not Python's default."""
    threshold = row.get("gc_threshold") or 700
    return f", gc threshold {threshold:,}" if threshold != 700 else ""


def scale_table(figures: dict[str, Any]) -> str:
    """Many agents on one site."""
    rows = [
        (
            f"{row['agents']:,}",
            row["backend"] + _collector(row),
            f"{row['connect_s']:.2f}",
            f"{row['site_kib_per_agent']:.1f} / {row['agent_kib_per_agent']:.1f}",
            f"{row['idle_cpu_percent']:.2f}%",
            f"{row['dispatch_s']['median']:.3f} ({row['dispatch_s']['min']:.3f}-"
            f"{row['dispatch_s']['max']:.3f})",
        )
        for row in figures.get("scale") or []
    ]
    header = (
        "agents",
        "event loop",
        "connect s",
        "KiB per agent, site / agent process",
        f"idle site CPU ({(figures.get('scale') or [{}])[0].get('idle_s', 0):g} s)",
        "one task to all, s",
    )
    return table(header, rows)


def nvflare_table(figures: dict[str, Any]) -> str:
    """NVFlare's IPCAgent, or why it was not measured."""
    if isinstance(figures.get("nvflare"), dict):
        return f"Not measured: {figures['nvflare']['skipped']}"
    rows = []
    for row in _nvflare_rows(figures, "latency"):
        rows.append(
            (
                "small task round trip",
                f"{row['task_us']['median'] / 1000:.1f} ms "
                f"({row['task_us']['min'] / 1000:.1f}-{row['task_us']['max'] / 1000:.1f})",
                f"{row['tasks_per_s']:.1f} tasks/s",
                f"CPU {row['cpu_ms_per_task']['site']:.1f} / "
                f"{row['cpu_ms_per_task']['agent']:.1f} ms per task",
            )
        )
    for row in _nvflare_rows(figures, "throughput"):
        rows.append(
            (
                f"{row['mib']:g} MiB out and back",
                f"{row['seconds']['median']:.2f} s",
                f"{row['gbytes_per_s']:.2f} GB/s",
                f"RSS growth {row['site_rss_x']:.2f}x / {row['agent_rss_x']:.2f}x, "
                f"peak {row['site']['peak_rss_mib']:,.0f} / "
                f"{row['agent']['peak_rss_mib']:,.0f} MiB",
            )
        )
    return table(("NVFlare 2.9 IPCAgent", "median (min-max)", "rate", "site / agent"), rows)


def _ms(spread: dict[str, Any]) -> str:
    digits = 1 if spread["max"] < 100 else 0
    return (
        f"{spread['median']:,.{digits}f} ({spread['min']:,.{digits}f}-{spread['max']:,.{digits}f})"
    )


def _job_peak(process: dict[str, Any] | None, missing: str) -> str:
    if process is None:
        return missing
    growth = process["growth_x"]
    peak = f"{process['peak_rss_mib']:,.0f}"
    return peak if growth is None else f"{peak} ({growth:.2f}x)"


def job_table(figures: dict[str, Any]) -> str:
    """One job in NVFlare's simulator, per model size and setup, or why it was not measured."""
    if isinstance(figures.get("job"), dict):
        return f"Not measured: {figures['job']['skipped']}"
    rows = [
        (
            size_name(row["mib"]),
            f"{row['setup']}: {row['setup_name']}",
            _ms(row["dispatch_to_result_ms"]),
            _ms(row["execute_ms"]),
            _ms(row["round_ms"]),
            _job_peak(row["client_job"], "not seen"),
            _job_peak(row["trainer"], "in the CJ"),
            f"{row['wall_s']:.0f}",
            "yes" if row["ok"] else "**no**: " + "; ".join(row["problems"]),
        )
        for row in _job_rows(figures)
    ]
    header = (
        "model",
        "setup",
        "dispatch to result, ms",
        "execute(), ms",
        "round, ms",
        "CJ peak RSS MiB (growth / model)",
        "trainer peak RSS MiB (growth / model)",
        "run, s",
        "ok",
    )
    return table(header, rows)


def job_phase_table(figures: dict[str, Any]) -> str:
    """Where dispatch to result goes, per setup, for the models the job's targets speak of:
    the task's hop to execute(), execute(), and the result's hop back to the server."""
    rows = [
        (
            size_name(row["mib"]),
            row["setup"],
            _ms(row["task_in_ms"]),
            _ms(row["execute_ms"]),
            _ms(row["result_out_ms"]),
            _ms(row["dispatch_to_result_ms"]),
        )
        for row in _job_rows(figures)
        if row["mib"] >= JOB_TARGET_MIB and "task_in_ms" in row
    ]
    if not rows:
        return "Not measured in this run."
    header = (
        "model",
        "setup",
        "dispatch to execute(), ms",
        "execute(), ms",
        "execute() to result, ms",
        "dispatch to result, ms",
    )
    return table(header, rows)


def markdown_tables(figures: dict[str, Any]) -> str:
    """Every table of the run, headed."""
    parts = [("Targets", targets_table(figures))] if figures.get("targets") else []
    for name, title, make in (
        ("latency", "Small tasks", latency_table),
        ("floor", "Floors", floor_table),
        ("throughput", "Models out and back", throughput_table),
        ("scale", "Many agents", scale_table),
        ("nvflare", "NVFlare's IPCAgent", nvflare_table),
        ("job", "Inside an NVFlare job", job_table),
        ("job", "Where a job's time goes", job_phase_table),
    ):
        if figures.get(name):
            parts.append((title, make(figures)))
    if figures.get("errors"):
        parts.append(
            (
                "Failed steps",
                table(
                    ("scenario", "step", "error"),
                    ((e["scenario"], e["step"], e["error"]) for e in figures["errors"]),
                ),
            )
        )
    return "\n\n".join(f"### {title}\n\n{body}" for title, body in parts)


# -- plots ----------------------------------------------------------------------------------------


def _stamp(figures: dict[str, Any]) -> str:
    env = figures["environment"]
    versions = env["versions"]
    return (
        f"{env['date']} · {env['machine']['cores']} cores, {env['machine']['cpu']} · "
        f"Python {env['python']}, flare-agent-async {versions['flare-agent-async']}, "
        f"anyio {versions['anyio']}, trio {versions['trio']}, nvflare {versions['nvflare']}"
    )


def plots(figures: dict[str, Any], folder: str) -> list[str]:
    """PNG plots of the run into ``folder``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.text(0.01, 0.005, _stamp(figures), fontsize=6, color="gray")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        written.append(name)

    rows = [r for r in figures.get("latency") or [] if r["agent_kind"] == "async"]
    if rows:
        transports = list(dict.fromkeys(r["transport"] for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            values = [_latency(figures, t, backend, "async") or 0 for t in transports]
            xs = [x + i * width for x in range(len(transports))]
            ax.bar(xs, values, width, label=backend)
            floor = _floor_us(figures, "tcp ping-pong", backend)
            if floor:
                ax.hlines(floor, -0.4, len(transports), linestyles=":", colors=f"C{i}")
        ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(transports))])
        ax.set_xticklabels(transports)
        ax.set_ylabel("µs per small task (dotted: anyio tcp ping-pong)")
        ax.set_title("Small task round trip, site to result")
        ax.legend()
        save(fig, "latency.png")

    rows = [r for r in figures.get("throughput") or [] if r.get("arrays") != 1]  # models only
    floors = [r for r in figures.get("floor") or [] if "mib" in r]
    nvflare = _nvflare_rows(figures, "throughput")
    if rows:
        for metric, name, label in (
            ("gbytes_per_s", "throughput.png", "GB/s, model out and back"),
            ("agent_rss_x", "memory.png", "agent peak RSS growth / model size"),
        ):
            fig, ax = plt.subplots(figsize=(7, 3.6))
            series: dict[str, list[tuple[float, float]]] = {}
            for row in rows:
                series.setdefault(f"{row['transport']}, {row['backend']}", []).append(
                    (row["mib"], row[metric])
                )
            for row in floors if metric == "gbytes_per_s" else []:
                series.setdefault(f"raw {row['transport']} sockets", []).append(
                    (row["mib"], row[metric])
                )
            for row in nvflare:
                series.setdefault("NVFlare IPCAgent", []).append((row["mib"], row[metric]))
            colours = {"tcp": "C0", "unix": "C1", "tls": "C2"}  # by transport
            markers = {"asyncio": "o", "uvloop": "s", "trio": "^"}  # by event loop
            for key, points in series.items():
                points.sort()
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                if key.startswith("NV"):
                    ax.plot(xs, ys, ":", color="black", marker="x", label=key)
                elif key.startswith("raw"):
                    ax.plot(xs, ys, "--", color=colours[key.split()[1]], label=key)
                else:
                    transport, backend = key.split(", ")
                    colour, marker = colours[transport], markers.get(backend, "o")
                    ax.plot(xs, ys, "-", color=colour, marker=marker, label=key)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("model size, MiB")
            ax.set_ylabel(label)
            ax.legend(fontsize=7, ncol=2)
            save(fig, name)

    rows = figures.get("scale") or []
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for backend in dict.fromkeys(r["backend"] for r in rows):
            points = sorted(
                (r["agents"], r["dispatch_s"]["median"])
                for r in rows
                if r["backend"] == backend and not _collector(r)
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
        ax.set_xscale("log")
        ax.set_xlabel("connected agents")
        ax.set_ylabel("s to send one task to every agent\nand collect every result")
        ax.legend()
        save(fig, "scale.png")
    return written


# -- the docs page --------------------------------------------------------------------------------

_INTRO = """\
# Benchmarks

What the library costs, next to what the machine can do and next to NVFlare's own agent, all
measured in one run of one command:

```sh
python -m pip install -e '.[bench,nvflare]'
{command}
```

Timings on shared machines drift from run to run: compare the ratios within a table, which come
from the same run. `python -m benchmarks --quick` runs every scenario at tiny sizes in under a
minute; `--large` adds 1 GiB models and 10,000 agents; `--json` keeps the figures.

This page was written by `--report` from the run of {date} on {cores} cores ({cpu}, {memory} GiB),
Python {python}; versions: {versions}. The run took {minutes:.0f} minutes.
"""

_SECTIONS = """\
## Targets

{targets}

## Small tasks

A site runs small tasks one after another on one agent (`run_task` until the result is back);
site and agent each in a process of their own over tcp, unix and tls, in one process over
`memory://`. The sync agent is a `SyncFlareAgent` driven by a plain blocking loop. "/ anyio
ping-pong" compares with a 100-byte ping-pong between two processes over an anyio TCP stream on
the same event loop; "faster than NVFlare" divides NVFlare's small-task round trip, measured in
the same run, by ours.

{latency}

![Small task round trip](img/latency.png)

## Floors

The same machine without us: a 100-byte TCP ping-pong over raw blocking sockets and over anyio
streams, one bare `BlockingPortal.call` (the sync facade's yardstick: its budget is two portal
calls per task), and models out and back over raw blocking sockets (`sendall`, `recv_into` a new
buffer).

{floor}

## A model out and back

The site sends a model (8 float32 arrays) to an agent, which returns it as its result; site and
agent each in a process of their own. Memory is each process's peak RSS growth during the
transfers over the model size: 1.00x is the received model itself, which has to exist somewhere.

{throughput}

![Throughput](img/throughput.png)

![Memory](img/memory.png)

## Many agents

One site process and two agent processes sharing the agents, over loopback TCP, default
heartbeats (every 5 s). Connect: until every agent is welcomed. Memory: RSS growth per connected
agent, in the site and in an agent process. Idle: the site's CPU while every agent idles.
One task to all: one small task to every agent at once, until every result is back. The rows
marked "gc threshold" ran with the cyclic garbage collector's first threshold raised to the
figure given, in every process (`gc.set_threshold`, see
[Concepts](concepts.md#thousands-of-agents)); the others with Python's default (700).

{scale}

![Scale](img/scale.png)

## NVFlare's IPCAgent

NVFlare 2.9's real `IPCAgent` in a process of its own, against a site process that sends tasks
over NVFlare's cell network the way its `IPCExchanger` does (same channel, topics, headers and
payload); the models are the same as ours. Its small tasks are timed over the whole loop with a
50 ms pause between a result and the next task, as a job's trip to its server makes: sent back
to back, the next task races the agent's own bookkeeping and the figures become a lottery
(`benchmarks/nvflare_ipc.py` says more). Either way its agent picks a task up at its next
200 ms poll.

{nvflare}

## Inside an NVFlare job

What users feel: one FedAvg-style job in NVFlare's simulator with one client (`-n 1 -t 1`), its
trainer run four ways. **A**: NVFlare's Client API, the script in an external process
(`ScriptRunner(launch_external_process=True)`); **B**: the same script in the client job's
process; **C**: our `AgentExecutor` launching a `SyncFlareAgent` echo loop; **D**: A's job
converted to our `AgentExecutor` by `use_agent_executor`, its script with
`flare_agent_async.client` imported in place of `nvflare.client`. In C and D the server downloads
each result's arrays from the trainer through the client job (`relay_results`, the executor's
default). Every trainer returns the model it receives, and drops its reference to it
(`del model`, `del task`) once the result is sent and before it asks for the next, so that a
trainer's memory is what its library holds. The server
is the same for all: an in-memory model of float32 arrays (1 KiB in 2, the larger ones in 8),
checked at the end of the run to be the initial one, NVFlare's in-time weighted aggregator and
`ScatterAndGather`. The client asks the server for a task every {job_interval}.

Times are from every round but the first (which starts the trainer), median (min-max). Dispatch
to result is the server's, from handing the task to the client until its result is in
(`BEFORE_TASK_DATA_FILTER` to `BEFORE_TASK_RESULT_FILTER`); execute() is the client job's
executor (`BEFORE_TASK_EXECUTION` to `AFTER_TASK_EXECUTION`); the round is the workflow's, wait
for the client's next request included. Memory is each process's peak RSS (`VmHWM`, sampled every
0.1 s) for the client job (CJ) and the trainer; growth is the peak less the same setup's 1 KiB
run's, over the model's size. ok: the final model is the initial one, every round was done,
NVFlare logged no error and no process of the job was left behind. The jobs are short (3 or 4
rounds for the larger models), and the client job's memory creeps up from round to round (glibc
keeps what NVFlare's threads freed, each in its own arena), so a longer job ends with a higher
peak: `--job-rounds` runs longer ones, and [Running inside
NVFlare](nvflare.md#the-client-jobs-memory) has them measured, with the setting that stops it.

{job}

### Where a job's time goes

The server's dispatch to result, in three hops: the task from its dispatch to the executor's
execute(), execute() itself, and the result from execute() to the server (medians of the same
rounds; they need not add up exactly). A's CJ passes the task on as a reference, so its trainer
downloads the model inside execute(); ours is handed the task after NVFlare downloaded it into
the CJ. In every setup the server then downloads the result: from A's trainer through the CJ's
cell, from ours through the CJ, which fetches each array from the agent.

{job_phases}

## Where a target is missed

{misses}
"""

# Why a target is missed, by the kind of target: what profiling showed, what was changed, and
# what remains. Only the kinds missed in the run are written into the page.
_WHY = {
    "small task": """
A small task is four messages (the task, its acknowledgement, the result, its acknowledgement)
and two hops between processes; on each side it passes through the frame codec, the protocol
state machine and two or three turns of the event loop (the reader wakes the trainer, or the
caller of `run_task`). The table's CPU column shows the cost per side, against which the
ping-pong floor spends one receive and one send. A small message leaves from the task that made
it (`run_task`, `submit_result`, the reader's acknowledgement) in the same turn, without waking
the connection's writer, and a task's acknowledgement rides with its result; a read that emptied
the socket is followed by a wait, not by a read that would fail; on asyncio and uvloop the socket
stays registered with the event loop from one wait to the next. What is left is spread over the
event loop's machinery for each wake-up (trio arms its epoll registration again for every wait)
and over Python for each message. TLS cannot send at once (it flushes what it holds back through
the writer), so its rows gain less.
NVFlare's agent waits for a poll every 200 ms, so its round trip is bound by that interval; ours
is bound by Python's cost per message.""",
    "one task to every agent": """
Dispatch-and-collect to many agents costs the same work per task as above, on the site and in
the agent processes, and all of them share the machine's two cores. With 10,000 connections the
processes hold over a million objects, and Python's cyclic garbage collector walks all of them
several times while the tasks are in flight; with its first threshold raised (the "gc threshold"
rows; see [Concepts](concepts.md#thousands-of-agents)) it seldom does.""",
    "idle site": """
An idle connection costs a heartbeat each way every `heartbeat_interval` (5 s by default), and
each one the same work per message as above; a longer interval costs proportionally less.""",
    "of site RSS per connected agent": """
Each connection holds its protocol state, a few tasks of the event loop and its read buffers
(which start small and grow only while reads fill them).""",
    "sync facade": """
The facade crosses into the agent's loop twice per task. `submit_result` hands the result over
in one trip (`run_sync_soon`) and its thread is woken once, by the site's answer; `get_task`
asks in one trip and is woken once, by the task, which a callback in the loop takes. A bare
`portal.call` wakes the calling thread twice (once its task is started in the loop, once it is
done), so two of them are about the two crossings' cost; the rest is the agent's work in the
loop while a second thread of the same process competes for the two cores.""",
    "raw-socket floor": """
The floor's own figure swings widely between runs on this machine: fresh memory is slow to
touch here, and a model received into new memory pays for it, on both sides of the
comparison.""",
    "peak RSS": """
Peak RSS counts every page a process touched during the transfers, including the transport's
buffers.""",
    "CJ peak RSS growth": """
In a job the model passes through the client job (CJ) an array at a time both ways. The CJ
downloads the task's arrays from the server one by one (NVFlare's pass-through) and sends each
on to the trainer as it comes, letting go of it once the trainer has it; the server downloads
the result's arrays from the trainer one at a time through the CJ, which fetches each from the
agent and serializes it as NVFlare does (an `.npz` per array), one array ahead of the server.
NVFlare's streaming leaves what it moved in reference cycles, which the executor collects every
128 MiB moved. So the CJ's peak is a few arrays in flight, NVFlare's buffers and its process
(about 100 MiB), which weighs most against a small model. NVFlare's Client API in process (B)
holds the model in the CJ. Part of the growth, at every size, is memory freed in the CJ and
kept by the C allocator, in a heap per thread, and it creeps up with the rounds;
`MALLOC_ARENA_MAX=1 python -m benchmarks --only job` shares one heap among the threads of the
simulator and its processes, to see how much
(see [Running inside NVFlare](nvflare.md#the-client-jobs-memory), with the figures and a setting
that trades time for memory instead). NVFlare's external process (A)
keeps its CJ small because its CJ forwards the task as a reference (NVFlare's pass-through) and
its trainer downloads the model from the server itself: there the trainer pays instead.""",
    "echo trainer's peak RSS growth": """
An echo trainer needs the model it received (1.00x); anything above that is what its library
holds while the result goes back.""",
    "the whole client": """
The whole client is the CJ's peak and the trainer's added. A's CJ never holds the model (it
forwards a reference, above), so A's whole client is about its trainer's, which holds the model
more than twice over at 1 GiB. Ours holds it once in the trainer, and in the CJ a few arrays at
a time (above).""",
    "dispatch to result at most": """
Dispatch to result is mostly NVFlare's two downloads ("Where a job's time goes"): the task
from the server, inside execute() for ours and A's alike (ours into the CJ, each array going on
to the trainer as it comes; A's straight into its trainer), and the result to the server after
it. Both setups pay both downloads, at the speed NVFlare moves them between two processes on
two cores. Ours gains on the result's: the CJ makes each array (fetched from the trainer,
serialized) while the server takes the one before, where A's trainer makes each when asked. The
rest is NVFlare's own. The hop into the trainer
is bound by the memory it receives into: a profile of the trainer (`perf record`) during a
512 MiB run showed most of its CPU time in the kernel zeroing fresh pages (`clear_page_erms`,
under `recv`).""",
    "dispatch to result no worse": """
With a tiny model, dispatch to result is mostly NVFlare's messaging between the server and the
CJ around execute(). Ours is the small part of it (execute() takes a few ms against A's ~20 ms);
NVFlare's part varies from round to round by more than that, and over a handful of rounds the
ranges of A, C and D overlap.""",
}


def misses(figures: dict[str, Any]) -> str:
    """Why each missed target of the run is missed, or a line saying none was."""
    missed = [t["target"] for t in figures.get("targets", []) if not t["met"]]
    if not missed:
        return "None: every target checked in this run is met."
    lines = ["Missed in this run: " + "; ".join(missed) + "."]
    for kind, why in _WHY.items():
        if any(kind in target for target in missed):
            lines.append(why.strip())
    return "\n\n".join(lines)


def _job_interval(figures: dict[str, Any]) -> str:
    interval = figures["plan"].get("job_request_interval_s")
    if interval is None:
        return "2 s, NVFlare's default, which a round includes"
    return f"{interval:g} s in this run (NVFlare's default is 2 s)"


def page(figures: dict[str, Any]) -> str:
    """The whole benchmarks page of the docs for this run."""
    env = figures["environment"]
    versions = ", ".join(f"{name} {v}" for name, v in env["versions"].items() if v)
    intro = _INTRO.format(
        command=figures["command"],
        date=env["date"],
        cores=env["machine"]["cores"],
        cpu=env["machine"]["cpu"],
        memory=env["machine"]["memory_gib"],
        python=env["python"],
        versions=versions,
        minutes=figures["seconds"] / 60,
    )
    body = _SECTIONS.format(
        targets=targets_table(figures),
        latency=latency_table(figures),
        floor=floor_table(figures),
        throughput=throughput_table(figures),
        scale=scale_table(figures),
        nvflare=nvflare_table(figures),
        job_interval=_job_interval(figures),
        job=job_table(figures),
        job_phases=job_phase_table(figures),
        misses=misses(figures),
    )
    return intro + "\n" + body


def write(figures: dict[str, Any], docs: str) -> list[str]:
    """Write the page and its plots under ``docs``; the paths written."""
    images = plots(figures, os.path.join(docs, IMAGES))
    path = os.path.join(docs, PAGE)
    with open(path, "w") as out:
        out.write(page(figures))
    return [path, *(os.path.join(docs, IMAGES, name) for name in images)]
