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
    done = run_benchmarks("--quick", "--json", str(path), timeout=170)
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
    assert quick["targets"] and all(
        set(t) == {"target", "measured", "met"} for t in quick["targets"]
    )
    assert "### Targets" in quick["stdout"]


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
    for image in ("latency.png", "throughput.png", "memory.png", "scale.png"):
        assert (tmp_path / "img" / image).read_bytes().startswith(b"\x89PNG"), image
        assert f"img/{image}" in page
