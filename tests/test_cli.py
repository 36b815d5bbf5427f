"""The flare-agent-async command (the demo is the project's main job)."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise

import pytest

from flare_agent_async.cli import main


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_json_shows_the_loss_falling(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--agents", "3", "--rounds", "4", "--backend", backend, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    losses = report["losses"]
    assert len(losses) == 4 and len(report["round_seconds"]) == 4
    assert all(later < earlier for earlier, later in pairwise(losses))


def test_demo_prints_rounds_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 1/2: held-out loss" in out and "global model: y =" in out


def test_bad_options_fail_with_a_usage_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--agents", "0"])
    assert info.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err


def test_python_dash_m_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flare_agent_async", "demo", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert len(json.loads(done.stdout)["losses"]) == 1
