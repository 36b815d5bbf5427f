"""A trainer of two ranks (torch.distributed on gloo, started by torchrun) against a real site:
every rank gets the same model, the same end of the job, the same abort, rank 0's error; only
rank 0 talks to the site; no process is left behind."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[torch]'")

from conftest import SiteThread, site_thread  # noqa: E402

from flare_agent_async._processes import processes_with  # noqa: E402
from flare_agent_async.exceptions import TaskAborted  # noqa: E402

HERE = Path(__file__).parent
RUN_TIMEOUT = 120.0
INITIAL = {"weight": np.zeros((1, 3), np.float32), "bias": np.zeros(1, np.float32)}


class Ranks:
    """``torchrun --nproc-per-node 2`` running a script, in a process group of its own."""

    def __init__(self, process: subprocess.Popen[bytes], records: Path, output: Path) -> None:
        self.process, self.records, self.output = process, records, output
        self.returncode: int | None = None

    def events(self, rank: int) -> list[dict[str, Any]]:
        path = self.records / f"rank{rank}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_for(self, event: str, timeout: float = 60.0) -> None:
        """Bounded polling until every rank recorded ``event``."""
        self.wait_for_count(event, 1, timeout)

    def wait_for_count(self, event: str, count: int, timeout: float = 60.0) -> None:
        """Bounded polling until every rank recorded ``event`` ``count`` times."""
        deadline = time.monotonic() + timeout
        while not all(
            sum(e["event"] == event for e in self.events(rank)) >= count for rank in (0, 1)
        ):
            if self.process.poll() is not None:
                raise AssertionError(f"the ranks ended before {event!r}:\n{self.log()}")
            assert time.monotonic() < deadline, f"no {event!r} on every rank within {timeout} s"
            time.sleep(0.05)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the ranks did not end within {timeout} s:\n{self.log()}"
            ) from None

    def log(self) -> str:
        return self.output.read_text()[-4000:]


@contextmanager
def ranks_at_a_site(
    folder: Path, *script: str | Path, **site_options: Any
) -> Iterator[tuple[SiteThread, Ranks]]:
    """A site in a thread, and two ranks of ``script`` (a path and its arguments) started
    against it as torchrun starts them. Leaving closes the site (its goodbye), then waits,
    bounded, for the ranks to end (`Ranks.returncode`); whatever is left is killed, and the
    test fails if any was.

    torchrun starts each rank in a session of its own, so the ranks are not torchrun's process
    group: every process of the run is found by a mark in its environment instead."""
    records = folder / "records"
    records.mkdir()
    output = folder / "torchrun.out"
    mark = f"{RUN_MARK}={folder}"
    with site_thread(**site_options) as site:
        env = {
            **os.environ,
            "FLARE_AGENT_URL": site.url,
            "FLARE_AGENT_SITE_NAME": "site-1",
            "FLARE_AGENT_ID": "trainer",
            "OMP_NUM_THREADS": "1",
            RUN_MARK: str(folder),
        }
        env.pop("RANK", None)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # one node, a free port on loopback
            "--nproc-per-node",
            "2",
            *map(str, script),
        ]
        with output.open("wb") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        run = Ranks(process, records, output)
        try:
            yield site, run
        except BaseException:
            kill_marked(mark)
            raise
    try:
        run.returncode = run.finish()
    finally:
        left = marked(mark)
        kill_marked(mark)
        process.wait(10)
    assert not left, f"processes of the run outlived torchrun: {left}"


RUN_MARK = "FLARE_AGENT_TEST_RUN"
"""In the environment of every process a test starts, with the test's folder as its value."""


def marked(mark: str) -> dict[int, str]:
    """Live processes whose environment holds ``mark``: pid -> command line."""
    return processes_with(mark.encode())


def kill_marked(mark: str, timeout: float = 10.0) -> None:
    """SIGKILL every process of the run; bounded polling until none is left."""
    deadline = time.monotonic() + timeout
    while found := marked(mark):
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes of the run survived SIGKILL: {found}"
        time.sleep(0.05)


def client(mode: str, folder: Path) -> tuple[Path, str, Path]:
    """The test trainer ``ddp_client.py`` in ``mode``, recording into ``folder/records``."""
    return HERE / "ddp_client.py", mode, folder / "records"


def wait_for_trainer(site: SiteThread) -> None:
    """The ranks start torch first: give them longer than the usual agent."""
    site.portal.call(lambda: site.site.wait_for_agent("trainer", timeout=60))


def run_rounds(site: SiteThread, rounds: int) -> list[dict[str, np.ndarray]]:
    """Run ``rounds`` training tasks, each on the last result; the results."""
    wait_for_trainer(site)
    weights, results = INITIAL, []
    for number in range(rounds):
        meta = {"data_kind": "WEIGHTS", "current_round": number, "total_round": rounds}
        result = site.portal.call(
            lambda w=weights, m=meta: site.site.run_task("trainer", "train", w, m)
        )
        weights = {key: np.asarray(value) for key, value in result.data.items()}
        results.append(weights)
    return results


def test_every_rank_gets_the_same_model_each_round_and_the_goodbye_ends_both(
    tmp_path: Path,
) -> None:
    with ranks_at_a_site(tmp_path, *client("train", tmp_path)) as (site, run):
        results = run_rounds(site, rounds=3)
        assert site.portal.call(lambda: site.site.agents) == {"trainer"}  # rank 0 only
    assert run.returncode == 0, run.log()
    events = {rank: run.events(rank) for rank in (0, 1)}
    received = {rank: [e for e in events[rank] if e["event"] == "received"] for rank in (0, 1)}
    assert [e["round"] for e in received[0]] == [0, 1, 2]
    assert received[0] == received[1]  # the same task, round and weights on both ranks
    trained = {
        rank: [e["weights"] for e in events[rank] if e["event"] == "trained"] for rank in (0, 1)
    }
    assert trained[0] == trained[1]  # DDP kept them in step
    for sent, result in zip(trained[0], results, strict=True):
        for key, value in result.items():
            np.testing.assert_allclose(value, np.asarray(sent[key], np.float32))
    # each round starts from the global model, and training moves it
    assert received[0][1]["weights"] == {k: v.tolist() for k, v in results[0].items()}
    assert events[0][-1] == events[1][-1] == {"event": "end"}
    for rank in (0, 1):  # flare.share: rank 0's value, a tensor arriving as a tensor
        assert {"event": "shared", "value": {"from": 0, "w": [0.0, 1.0, 2.0]}} in events[rank]


def test_an_abort_mid_training_stops_every_rank_and_the_next_task_runs(tmp_path: Path) -> None:
    with ranks_at_a_site(tmp_path, *client("slow", tmp_path)) as (site, run):
        wait_for_trainer(site)
        future = site.run_task_soon("trainer", INITIAL, task_id="t1")
        run.wait_for("training")
        assert site.portal.call(site.site.abort_task, "trainer", "t1")
        with pytest.raises(TaskAborted):
            future.result(10)
        run.wait_for("aborted")
        site.run_task_soon("trainer", INITIAL, task_id="t2")
        run.wait_for_count("training", 2)
        # the "slow" trainer works until aborted: abort this one too, and end the job
        assert site.portal.call(site.site.abort_task, "trainer", "t2")
        run.wait_for_count("aborted", 2)
    assert run.returncode == 0, run.log()
    for rank in (0, 1):
        assert [e["event"] for e in run.events(rank)] == [
            "shared",
            "received",
            "training",
            "aborted",
            "received",
            "training",
            "aborted",
            "end",
        ], run.log()


def test_an_error_in_rank_0s_receive_is_raised_on_every_rank(tmp_path: Path) -> None:
    with ranks_at_a_site(tmp_path, *client("fail", tmp_path)) as (_, run):
        run.wait_for("error")
    assert run.returncode != 0
    errors = {rank: [e for e in run.events(rank) if e["event"] == "error"] for rank in (0, 1)}
    assert errors[0] and errors[0][0]["type"] == "TypeError", run.log()
    assert errors[1] and errors[1][0]["type"] == "RankFailed", run.log()
    assert "rank 0 failed in receive(): TypeError" in errors[1][0]["message"]


EXAMPLES = HERE.parent.parent / "examples"


def accuracies(site: SiteThread, rounds: int) -> list[float]:
    """Run ``rounds`` training tasks, each on the last result; the accuracy each result carries
    (the global model's at the start of its round), then one evaluation task's."""
    wait_for_trainer(site)
    weights: dict[str, Any] = {}
    found = []
    for number in range(rounds):
        meta = {"data_kind": "WEIGHTS", "current_round": number, "total_round": rounds}
        result = site.portal.call(
            lambda w=weights, m=meta: site.site.run_task("trainer", "train", w, m)
        )
        assert result.meta["NUM_STEPS_CURRENT_ROUND"] > 0
        found.append(result.meta["initial_metrics"]["accuracy"])
        weights = {key: np.asarray(value) for key, value in result.data.items()}
    evaluation = site.portal.call(
        lambda: site.site.run_task("trainer", "validate", weights, {"data_kind": "WEIGHTS"})
    )
    assert evaluation.meta["data_kind"] == "METRICS"  # metrics only, no weights
    found.append(evaluation.data["accuracy"])
    return found


@pytest.mark.parametrize("example", ["ddp_trainer", "lightning_trainer"])
def test_the_example_trains_federated_on_two_ranks(example: str, tmp_path: Path) -> None:
    if example == "lightning_trainer":
        pytest.importorskip("lightning", reason="needs lightning: pip install -e '.[torch]'")
    with ranks_at_a_site(tmp_path, EXAMPLES / f"{example}.py") as (site, run):
        found = accuracies(site, rounds=4)
    assert run.returncode == 0, run.log()
    assert all(later > earlier for earlier, later in itertools.pairwise(found)), found


def test_an_abort_stops_lightnings_fit_on_every_rank_at_the_same_step(tmp_path: Path) -> None:
    pytest.importorskip("lightning", reason="needs lightning: pip install -e '.[torch]'")
    script = (HERE / "lightning_client.py", tmp_path / "records")
    with ranks_at_a_site(tmp_path, *script) as (site, run):
        wait_for_trainer(site)
        future = site.run_task_soon("trainer", {}, task_id="t1")
        run.wait_for("training")
        assert site.portal.call(site.site.abort_task, "trainer", "t1")
        with pytest.raises(TaskAborted):
            future.result(10)
        run.wait_for("fit_done")
    assert run.returncode == 0, run.log()
    done = {rank: [e for e in run.events(rank) if e["event"] == "fit_done"] for rank in (0, 1)}
    assert done[0] == done[1]  # the same step on both ranks
    assert 0 < done[0][0]["steps"] < 50_000, done  # stopped mid-epoch, long before its end
    assert [e["event"] for e in run.events(0)][-1] == "end"
