"""The flare-agent-async command: the demo (the project's main job), site and agent, and every
error a person can make with them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from flare_agent_async import RC, AsyncFlareAgent, FlareSite, Task, TaskResult
from flare_agent_async.cli import main, serve_async


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flare_agent_async", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("transport", "mode", "backend"),
    [
        ("tcp", "async", "asyncio"),
        ("tcp", "async", "trio"),
        ("tcp", "sync", "asyncio"),
        ("tcp", "sync", "trio"),
        ("memory", "async", "asyncio"),
        ("memory", "async", "trio"),
    ],
)
def test_the_demo_trains_a_model_whose_accuracy_rises(
    transport: str, mode: str, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--agents", "2", "--rounds", "3", "--transport", transport]
    args += ["--backend", backend, "--json"] + (["--sync"] if mode == "sync" else [])
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["results"] == 2 and r["aborted"] == [] for r in rounds), rounds
    accuracies = [r["accuracy"] for r in rounds]
    assert accuracies == sorted(accuracies) and accuracies[-1] > 0.75


def test_the_demo_shows_a_site_abort_reaching_a_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--agents", "2", "--rounds", "3", "--abort-round", "2", "--json"]) == 0
    rounds = json.loads(capsys.readouterr().out)["rounds"]
    assert rounds[1]["aborted"] == ["agent-0"] and rounds[1]["results"] == 1
    assert rounds[2]["results"] == 2


def test_the_demo_moves_a_padded_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--agents", "2", "--rounds", "1", "--model-mb", "4", "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)["rounds"]
    assert only["bytes_moved"] >= 4 * 4 * 2**20  # out and back, two agents


def test_the_demo_prints_a_summary_for_people() -> None:
    done = run_cli("demo", "--agents", "2", "--rounds", "2")
    assert done.returncode == 0, done.stderr
    assert "held-out" in done.stdout and "FedAvg, 2 async agents over tcp" in done.stdout


def test_quiet_prints_nothing() -> None:
    done = run_cli("demo", "--agents", "1", "--rounds", "1", "--quiet")
    assert (done.returncode, done.stdout) == (0, "")


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on (free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_site_and_agents_as_separate_commands(free_port: int, tmp_path: Path) -> None:
    url = f"tcp://127.0.0.1:{free_port}"
    site = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flare_agent_async",
            "site",
            "--listen",
            url,
            "--agents",
            "a1,a2",
            "--rounds",
            "2",
            "--secret",
            "s3cret",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flare_agent_async",
                "agent",
                "flare_agent_async.demo:train",
                "--connect",
                url,
                "--agent-id",
                agent_id,
                "--secret",
                "s3cret",
            ]
            + (["--sync"] if agent_id == "a2" else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for agent_id in ("a1", "a2")
    ]
    out, err = site.communicate(timeout=120)
    assert site.returncode == 0, err
    rounds = json.loads(out)["rounds"]
    assert [r["results"] for r in rounds] == [2, 2]
    for agent in agents:
        _, agent_err = agent.communicate(timeout=60)
        assert agent.returncode == 0 and "served 2 task(s)" in agent_err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--connect", "carrier://pigeon"], "unknown transport scheme 'carrier'"),
        (["--connect", "tcp://127.0.0.1"], "needs a host and a port"),
        (["--connect", "tcp://127.0.0.1:{port}", "--connect-timeout", "0.5"], "Connection refused"),
    ],
)
def test_agent_errors_are_one_clear_line(args: list[str], message: str, free_port: int) -> None:
    args = [arg.format(port=free_port) for arg in args]
    done = run_cli("agent", "flare_agent_async.demo:train", "--agent-id", "a1", *args)
    assert done.returncode == 1
    assert done.stderr.startswith("flare-agent-async agent: error:") and message in done.stderr


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ("no_such_module:train", "cannot import 'no_such_module'"),
        ("flare_agent_async.demo:nope", "has no function 'nope'"),
        ("justaname", "trainer must be module:function"),
    ],
)
def test_a_trainer_that_cannot_be_found(trainer: str, message: str) -> None:
    done = run_cli("agent", trainer, "--connect", "tcp://127.0.0.1:1", "--agent-id", "a1")
    assert done.returncode == 1 and message in done.stderr


def test_wrong_credentials_are_refused_with_a_clear_line(free_port: int) -> None:
    url = f"tcp://127.0.0.1:{free_port}"
    site = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flare_agent_async",
            "site",
            "--listen",
            url,
            "--agents",
            "a1",
            "--secret",
            "right",
            "--wait",
            "20",
            "--quiet",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        done = run_cli(
            "agent",
            "flare_agent_async.demo:train",
            "--connect",
            url,
            "--agent-id",
            "a1",
            "--secret",
            "wrong",
            "--connect-timeout",
            "10",
        )
        assert done.returncode == 1
        assert "the site rejected the agent: authentication failed" in done.stderr
        assert "wrong" not in done.stderr and "right" not in done.stderr
    finally:
        site.kill()
        site.wait()


def test_site_errors_are_one_clear_line() -> None:
    done = run_cli("site", "--listen", "carrier://x", "--agents", "a1")
    assert done.returncode == 1 and "unknown transport scheme 'carrier'" in done.stderr
    done = run_cli("site", "--listen", "tcp://127.0.0.1:0", "--agents", "a1", "--wait", "0.2")
    assert done.returncode == 1 and "not every agent connected within 0.2 s" in done.stderr


def test_bad_options_fail_with_a_usage_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--agents", "0"])
    assert info.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err


def failing_trainer(task: Task) -> TaskResult:
    if task.data == "boom":
        raise RuntimeError("the trainer broke on purpose")
    return TaskResult({}, {"echo": task.data})


@pytest.mark.anyio
async def test_a_trainer_that_raises_fails_its_task_and_the_agent_goes_on() -> None:
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen("memory://")

        async def agent() -> None:
            async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as flare:
                await serve_async(flare, failing_trainer)

        group.start_soon(agent)
        await site.wait_for_agent("a1", timeout=10)
        failed = await site.run_task("a1", "train", "boom")
        assert failed.return_code == RC.EXECUTION_EXCEPTION
        assert failed.meta["error"] == "RuntimeError: the trainer broke on purpose"
        assert (await site.run_task("a1", "train", 7)).data == {"echo": 7}


@pytest.mark.parametrize("example", ["async_trainer", "trio_trainer", "sync_trainer"])
def test_the_examples_serve_a_site(example: str, free_port: int) -> None:
    url = f"tcp://127.0.0.1:{free_port}"
    site = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flare_agent_async",
            "site",
            "--listen",
            url,
            "--agents",
            "agent-1",
            "--rounds",
            "2",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    script = Path(__file__).parent.parent / "examples" / f"{example}.py"
    trainer = subprocess.run(
        [sys.executable, str(script), url, "agent-1"], capture_output=True, text=True, timeout=60
    )
    out, err = site.communicate(timeout=60)
    assert trainer.returncode == 0, trainer.stderr
    assert site.returncode == 0, err
    accuracies = [r["accuracy"] for r in json.loads(out)["rounds"]]
    assert len(accuracies) == 2 and accuracies[1] >= accuracies[0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_exits_130_without_a_traceback(backend: str) -> None:
    site = subprocess.Popen(
        [
            *(sys.executable, "-m", "flare_agent_async", "site"),
            *("--listen", "tcp://127.0.0.1:0", "--agents", "a1", "--backend", backend),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert site.stdout is not None
    assert "listening at" in site.stdout.readline()  # running, waiting for its agent
    site.send_signal(signal.SIGINT)
    _, err = site.communicate(timeout=30)
    assert site.returncode == 130 and "Traceback" not in err, err[-600:]
