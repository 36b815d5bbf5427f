"""The NVFlare scenario of the benchmark suite: skipped cleanly without nvflare, and, with it, tiny
runs of both scenarios that report sane figures."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

from benchmarks import nvflare_ipc


def test_without_nvflare_the_scenario_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reason = nvflare_ipc.unavailable()
    assert reason is not None
    assert "not installed" in reason and "flare-agent-async[nvflare]" in reason


def test_another_nvflare_release_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("nvflare") is None:
        pytest.skip("nvflare is not installed")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.3.7")
    reason = nvflare_ipc.unavailable()
    assert reason is not None and "2.3.7" in reason and "2.9" in reason


@pytest.mark.skipif(nvflare_ipc.unavailable() is not None, reason=str(nvflare_ipc.unavailable()))
def test_both_scenarios_run_against_nvflares_agent() -> None:
    small = nvflare_ipc.latency(tasks=2, repeats=1)
    # IPCAgent looks for a task every 0.2 s and the site pauses 50 ms between tasks: a task costs
    # at least one look, and no task may need a resend (2 s later) or wait for a heartbeat (5 s)
    assert 100e3 < small["task_us"]["median"] < 2e6, small
    assert small["tasks_per_s"] == pytest.approx(1e6 / small["task_us"]["median"])
    for side in ("site", "agent"):
        assert small["cpu_ms_per_task"][side] > 0, small
        assert small[side]["peak_rss_mib"] > 10 and small[side]["cpu_s"] > 0, small

    large = nvflare_ipc.throughput(mib=2, repeats=1)
    assert 0 < large["seconds"]["median"] < 60, large
    assert large["gbytes_per_s"] > 0, large
    assert large["site_rss_x"] >= 0 and large["agent_rss_x"] >= 0, large
    for side in ("site", "agent"):
        assert large[side]["peak_rss_mib"] > 10 and large[side]["cpu_s"] > 0, large
