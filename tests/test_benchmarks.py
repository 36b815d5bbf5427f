"""The benchmark suite runs: ``python -m benchmarks --quick`` measures every scenario, and its
figures make a report. (The figures themselves are checked by reading the report, never here.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import job, report

ROOT = Path(__file__).resolve().parent.parent


def run_benchmarks(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "120"},
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    done = run_benchmarks("--quick", "--json", str(path), timeout=230)
    assert done.returncode == 0, done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(path.read_text())
    figures["stdout"] = done.stdout
    return figures


def positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_every_scenario_is_measured(quick: dict[str, Any]) -> None:
    plan = quick["plan"]
    latency = {(r["transport"], r["backend"], r["agent_kind"]) for r in quick["latency"]}
    assert latency == {
        (transport, backend, "async")
        for transport in plan["transports"]
        for backend in plan["backends"]
    } | {
        (transport, backend, "sync")
        for transport in plan["sync_transports"]
        for backend in plan["backends"]
    }
    throughput = {(r["transport"], r["backend"], r["mib"]) for r in quick["throughput"]}
    assert len(throughput) == len(plan["throughput_transports"]) * len(plan["backends"]) * len(
        plan["sizes_mib"]
    )
    assert {r["agents"] for r in quick["scale"]} == set(plan["agents"])
    floors = {r.get("floor", "bulk") for r in quick["floor"]}
    assert floors == {"tcp ping-pong", "portal.call", "bulk"}
    # a raw-socket floor for every transport measured, the tls one over blocking ssl sockets
    bulk = {r["transport"] for r in quick["floor"] if "mib" in r}
    assert bulk == {t for t in plan["throughput_transports"] if t in ("tcp", "unix", "tls")}
    if isinstance(quick["nvflare"], dict):  # nvflare is not installed here: said why
        assert "nvflare" in quick["nvflare"]["skipped"]
    else:
        assert {r["kind"] for r in quick["nvflare"]} == {"latency", "throughput"}
    if isinstance(quick["job"], dict):
        assert "nvflare" in quick["job"]["skipped"]
    else:  # every setup at a size, then the next size
        assert [(r["setup"], r["mib"]) for r in quick["job"]] == [
            (setup, mib) for mib, _ in plan["job_sizes"] for setup in plan["job_setups"]
        ]


def test_the_figures_are_sane(quick: dict[str, Any]) -> None:
    for row in quick["latency"]:
        assert 1 < row["task_us"]["min"] <= row["task_us"]["median"] <= row["task_us"]["max"] < 1e6
        assert positive(row["tasks_per_s"])
        for process in ("site", "agent"):
            assert 10 < row[process]["peak_rss_mib"] < 4096
            assert positive(row[process]["cpu_s"])
    for row in quick["throughput"] + [r for r in quick["floor"] if "mib" in r]:
        assert positive(row["gbytes_per_s"]) and row["gbytes_per_s"] < 1000
        # A received model has to exist somewhere, and never many times over (small models
        # are lost in the noise of a process's own allocations and frees: 16 MiB of slack).
        for process in ("site", "agent"):
            assert -16 < row[f"{process}_rss_x"] * row["mib"] < 3 * row["mib"] + 16
    for row in quick["scale"]:
        assert positive(row["connect_s"]) and positive(row["dispatch_s"]["median"])
        assert 0 < row["site_kib_per_agent"] < 1024
        assert 0 <= row["idle_cpu_percent"] < 100
    if isinstance(quick["nvflare"], list):
        for row in quick["nvflare"]:
            assert positive(
                row["gbytes_per_s"] if row["kind"] == "throughput" else row["tasks_per_s"]
            )
    for row in quick["job"] if isinstance(quick["job"], list) else []:
        for figure in (
            "dispatch_to_result_ms",
            "task_in_ms",
            "execute_ms",
            "result_out_ms",
            "round_ms",
        ):
            spread = row[figure]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"] < 60e3, (figure, row)
        assert row["verdict"]["ok"] and row["ok"], row["problems"]
        assert row["leftovers"] == [] and row["error_logs"] == {}
        for process in ("client_job", "trainer"):  # C and D: the trainer is a process
            assert 10 < row[process]["peak_rss_mib"] < 4096, row
    assert quick["targets"] and all(
        set(t) == {"target", "measured", "met"} for t in quick["targets"]
    )
    assert "### Targets" in quick["stdout"]
    if isinstance(quick["job"], list):
        assert "### Inside an NVFlare job" in quick["stdout"]


def test_a_report_is_written_from_saved_figures(quick: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    saved = tmp_path / "figures.json"
    saved.write_text(json.dumps(quick))
    done = run_benchmarks(
        "--from-json", str(saved), "--report", "--docs", str(tmp_path), timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "benchmarks.md").read_text()
    assert quick["environment"]["date"] in page
    assert "| target | measured | met |" in page
    assert "## Inside an NVFlare job" in page
    if isinstance(quick["job"], list):
        assert "| model | setup | dispatch to result, ms |" in page
        assert page.count("| 1 KiB | ") == len(quick["job"])
    for image in ("latency.png", "throughput.png", "memory.png", "scale.png"):
        assert (tmp_path / "img" / image).read_bytes().startswith(b"\x89PNG"), image
        assert f"img/{image}" in page


def _job_row(
    setup: str, mib: float, dispatch_ms: float, cj_mib: float, trainer_mib: float | None
) -> dict[str, Any]:
    model_bytes = int(mib * 2**20)
    return {
        "setup": setup,
        "setup_name": job.SETUPS[setup],
        "mib": mib,
        "model_bytes": model_bytes,
        "dispatch_to_result_ms": {"median": dispatch_ms, "min": dispatch_ms, "max": dispatch_ms},
        "task_in_ms": {"median": dispatch_ms / 4, "min": dispatch_ms / 4, "max": dispatch_ms / 4},
        "execute_ms": {"median": 1.0, "min": 1.0, "max": 1.0},
        "result_out_ms": {
            "median": dispatch_ms / 2,
            "min": dispatch_ms / 2,
            "max": dispatch_ms / 2,
        },
        "round_ms": {"median": 2000.0, "min": 2000.0, "max": 2000.0},
        "client_job": {"peak_rss_mib": cj_mib, "growth_x": None},
        "trainer": None if trainer_mib is None else {"peak_rss_mib": trainer_mib, "growth_x": None},
        "wall_s": 20.0,
        "ok": True,
        "problems": [],
    }


def test_a_jobs_memory_grows_from_its_setups_tiny_run(monkeypatch: pytest.MonkeyPatch) -> None:
    peaks = {("C", job.TINY_MIB): (100, 40), ("C", 64): (228, 120), ("B", 64): (300, None)}
    monkeypatch.setattr(
        job,
        "run",
        lambda setup, mib, rounds, interval: _job_row(setup, mib, 10, *peaks[setup, mib]),
    )
    series = job.Series()
    assert series.measure("C", job.TINY_MIB, 6)["client_job"]["growth_x"] is None
    grown = series.measure("C", 64, 4)
    assert grown["client_job"]["growth_x"] == pytest.approx(2.0)
    assert grown["trainer"]["growth_x"] == pytest.approx(1.25)
    alone = series.measure("B", 64, 4)  # no tiny run of B came first: no baseline
    assert alone["client_job"]["growth_x"] is None and alone["trainer"] is None


def test_the_job_targets_compare_ours_with_nvflares_external_process() -> None:
    tiny, big = job.TINY_MIB, 64
    rows = [
        _job_row("A", tiny, 40, 100, 90),
        _job_row("C", tiny, 30, 100, 40),
        _job_row("D", tiny, 50, 100, 40),
        _job_row("A", big, 600, 130, 500),
        _job_row("C", big, 400, 300, 130),
        _job_row("D", big, 500, 500, 200),
    ]
    rows[4]["client_job"]["growth_x"], rows[4]["trainer"]["growth_x"] = 1.5, 1.2
    rows[5]["client_job"]["growth_x"], rows[5]["trainer"]["growth_x"] = 3.0, 2.5
    figures: dict[str, Any] = {"plan": {"backends": []}, "job": rows}
    report.check_targets(figures)
    met = {t["target"]: t["met"] for t in figures["targets"]}
    assert met == {
        "dispatch to result no worse than A's (job, 1 KiB, C)": True,
        "dispatch to result no worse than A's (job, 1 KiB, D)": False,
        "CJ peak RSS growth at most 2x the model (job, 64 MiB, C)": True,
        "echo trainer's peak RSS growth at most 1.3x the model (job, 64 MiB, C)": True,
        "the whole client (CJ + trainer peaks) below NVFlare's external process (A) "
        "(job, 64 MiB, C)": True,
        "dispatch to result at most 0.8x A's (job, 64 MiB, C)": True,
        "CJ peak RSS growth at most 2x the model (job, 64 MiB, D)": False,
        "echo trainer's peak RSS growth at most 1.3x the model (job, 64 MiB, D)": False,
        "the whole client (CJ + trainer peaks) below NVFlare's external process (A) "
        "(job, 64 MiB, D)": False,
        "dispatch to result at most 0.8x A's (job, 64 MiB, D)": False,
    }
    page = report.misses(figures)  # each missed target is explained
    for kind in (
        "CJ peak RSS growth",
        "echo trainer's peak RSS growth",
        "the whole client",
        "dispatch to result at most",
        "dispatch to result no worse",
    ):
        assert report._WHY[kind].strip() in page
    assert "| 64 MiB | D: AgentExecutor, our Client API |" in report.job_table(figures)
    phases = report.job_phase_table(figures)  # the models the targets speak of, hop by hop
    assert (
        "| 64 MiB | C | 100 (100-100) | 1.0 (1.0-1.0) | 200 (200-200) | 400 (400-400) |" in phases
    )
    assert "1 KiB" not in phases


def test_a_large_run_sends_one_array_past_2_gib_on_every_transport() -> None:
    from benchmarks.__main__ import Plan, steps

    plan = Plan()
    plan.enlarge()
    described = [description for _, description, _ in steps(plan, {"floor", "throughput"})]
    for transport in ("tcp", "unix", "tls"):
        assert f"2560 MiB out and back over raw {transport} sockets" in described
        for backend in ("asyncio", "trio"):
            assert f"one 2560 MiB array out and back, {transport}, {backend}" in described
    assert not any("2560" in d for _, d, _ in steps(Plan(), {"floor", "throughput"}))


def test_one_array_goes_out_and_back_and_is_checked_against_the_floor() -> None:
    from benchmarks import throughput

    row = throughput.ours("tcp", "asyncio", 4, 1, arrays=1)  # the run checks the array came back
    assert row["arrays"] == 1 and row["gbytes_per_s"] > 0
    floor = {
        "scenario": "floor",
        "transport": "tcp",
        "mib": 4,
        "gbytes_per_s": 4 * row["gbytes_per_s"],
    }
    figures: dict[str, Any] = {"plan": {"backends": []}, "throughput": [row], "floor": [floor]}
    report.check_targets(figures)
    (target,) = [t for t in figures["targets"] if "one 4 MiB array" in t["target"]]
    assert target["met"] is False and "25% of" in target["measured"]
    assert "4 MiB, one array" in report.throughput_table(figures)


def test_many_agents_run_with_the_collector_threshold_asked_for() -> None:
    from benchmarks import scale

    row = scale.measure(20, "asyncio", idle_s=0.1, rounds=1, gc_threshold=12_345)
    assert row["gc_threshold"] == 12_345  # as the site process reported it
    assert "| 20 | asyncio, gc threshold 12,345 |" in report.scale_table({"scale": [row]})
    default = scale.measure(20, "asyncio", idle_s=0.1, rounds=1)
    assert default["gc_threshold"] == 700
    assert "| 20 | asyncio |" in report.scale_table({"scale": [default]})


class _Planned(Exception):
    """Stops the suite once it has its plan."""


def test_the_job_scenario_takes_its_setups_and_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.__main__ as suite

    plans: list[Any] = []

    def planned(plan: Any, only: set[str], console: Any) -> dict[str, Any]:
        plans.append((plan, only))
        raise _Planned

    monkeypatch.setattr(suite, "run", planned)
    monkeypatch.setattr(suite.signal, "signal", lambda *args: None)  # the test's own stay
    with pytest.raises(_Planned):
        suite.main(["--only", "job", "--job-setups", "A", "C", "--job-rounds", "10"])
    plan, only = plans[0]
    assert only == {"job"} and plan.job_setups == ("A", "C")
    # Longer jobs for the models; the tiny baseline keeps its own rounds.
    assert plan.job_sizes == ((job.TINY_MIB, 6), (64, 10), (512, 10))
    with pytest.raises(SystemExit):
        suite.main(["--only", "job", "--job-rounds", "1"])
    assert len(plans) == 1
