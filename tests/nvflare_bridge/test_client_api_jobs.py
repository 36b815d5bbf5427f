"""A script written for NVFlare's Client API runs on AgentExecutor with only its import line
changed, and trains to the same global model as under NVFlare's own ScriptRunner, in the
simulator; its metrics reach a receiver on the server as NVFlare's analytics events."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

import _jobs
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

from flare_agent_async.nvflare import AgentExecutor

SCRIPT = """\
import numpy as np

{import_line}
from nvflare.app_common.abstract.fl_model import FLModel  # NVFlare's own model class
{tracking_line}

flare.init()
writer = SummaryWriter()
while flare.is_running():
    model = flare.receive()
    round_number = model.current_round
    # deterministic "training": scale, shift by the round and the site
    params = {{
        name: np.asarray(value) * 0.5 + round_number + len(flare.get_site_name())
        for name, value in model.params.items()
    }}
    writer.add_scalar("train_loss", 1.0 / (round_number + 1), global_step=round_number)
    flare.send(
        FLModel(
            params=params,
            metrics={{"round": round_number}},
            meta={{"NUM_STEPS_CURRENT_ROUND": 10}},
        )
    )
"""

OURS = SCRIPT.format(
    import_line="import flare_agent_async.client as flare",
    tracking_line="from flare_agent_async.client.tracking import SummaryWriter",
)
NVFLARES = SCRIPT.format(
    import_line="import nvflare.client as flare",
    tracking_line="from nvflare.client.tracking import SummaryWriter",
)

RECEIVER = '''\
"""Records every analytics event that reaches the server, as a JSON line."""

import json
import os

from nvflare.apis.analytix import AnalyticsData
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey


class AnalyticsRecorder(FLComponent):
    def handle_event(self, event_type, fl_ctx):
        if event_type != "fed.analytix_log_stats":
            return
        shareable = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
        data = AnalyticsData.from_dxo(from_shareable(shareable))
        record = {
            "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None),  # as NVFlare's do
            "tag": data.tag,
            "value": data.value,
            "step": data.step,
            "data_type": data.data_type.value,
            "writer": data.sender.value,
        }
        path = os.path.join(fl_ctx.get_engine().get_workspace().get_root_dir(), "analytics.jsonl")
        with open(path, "a") as file:
            file.write(json.dumps(record) + "\\n")
'''


def run_job(
    tmp_path: Path, name: str, executor: object, *, record: bool, controller: bool = False
) -> dict[str, np.ndarray]:
    components = {"to_fed_event": ConvertToFedEvent(events_to_convert=["analytix_log_stats"])}
    make = _jobs.fedavg_controller_job if controller else _jobs.fedavg_job
    job = make(name, executor, tmp_path / "initial.npz", components=components)
    if record:
        sys.path.insert(0, str(tmp_path))
        try:
            from analytics_recorder import AnalyticsRecorder  # written below, for this job
        finally:
            sys.path.remove(str(tmp_path))
        job.to_server(AnalyticsRecorder(), id="analytics_recorder")
    process, workspace = _jobs.start_simulator(job, tmp_path)
    out = (tmp_path / "simulator.out").read_text
    assert _jobs.finish_simulator(process) == 0, out()[-3000:]
    assert _jobs.error_logs(workspace) == {}
    return _jobs.final_model(workspace)


def test_a_client_api_script_trains_the_same_model_under_agent_executor_and_script_runner(
    tmp_path: Path,
) -> None:
    (tmp_path / "analytics_recorder.py").write_text(RECEIVER)
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    for folder, script in ((ours_dir, OURS), (theirs_dir, NVFLARES)):
        folder.mkdir()
        (folder / "client.py").write_text(script)
        (folder / "analytics_recorder.py").write_text(RECEIVER)

    launch = f"{sys.executable} -u {ours_dir / 'client.py'}"
    executor = AgentExecutor(agent_id="trainer", launch=launch, agent_connect_timeout=60)
    ours = run_job(ours_dir, "client_api_on_agents", executor, record=True)
    runner = ScriptRunner(script=str(theirs_dir / "client.py"), framework=FrameworkType.NUMPY)
    theirs = run_job(theirs_dir, "client_api_on_script_runner", runner, record=False)

    assert sorted(ours) == sorted(theirs) == sorted(_jobs.INITIAL)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
        assert not np.array_equal(ours[name], _jobs.INITIAL[name])  # it trained

    lines = (ours_dir / "workspace" / "server" / "analytics.jsonl").read_text().splitlines()
    arrived = sorted((r["site"], r["tag"], r["step"], r["value"]) for r in map(json.loads, lines))
    expected = sorted(
        (site, "train_loss", n, 1.0 / (n + 1))
        for site in ("site-1", "site-2")
        for n in range(_jobs.ROUNDS)
    )
    assert arrived == expected
    kinds = {(r["data_type"], r["writer"]) for r in map(json.loads, lines)}
    assert kinds == {("SCALAR", "TORCH_TENSORBOARD")}


def test_under_nvflares_fedavg_controller_too(tmp_path: Path) -> None:
    """The FLModel-based FedAvg controller reads results as FLModels: the same script gives the
    same global model under AgentExecutor as under ScriptRunner."""
    models = []
    for name, script in (("ours", OURS), ("theirs", NVFLARES)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "client.py").write_text(script)
        if name == "ours":
            launch = f"{sys.executable} -u {folder / 'client.py'}"
            executor: object = AgentExecutor(
                agent_id="trainer", launch=launch, agent_connect_timeout=60
            )
        else:
            executor = ScriptRunner(script=str(folder / "client.py"), framework=FrameworkType.NUMPY)
        models.append(run_job(folder, f"fedavg_{name}", executor, record=False, controller=True))
    ours, theirs = models
    assert sorted(ours) == sorted(theirs) == sorted(_jobs.INITIAL)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
        assert not np.array_equal(ours[name], _jobs.INITIAL[name])


EVAL_SCRIPT = """\
import numpy as np

{import_line}
from nvflare.app_common.abstract.fl_model import FLModel

flare.init()
local = {{"w": np.full(3, float(len(flare.get_site_name()) + int(flare.get_site_name()[-1])))}}
while flare.is_running():
    model = flare.receive()
    if flare.is_submit_model():
        flare.send(FLModel(params=local))
    elif flare.is_evaluate():
        score = float(sum(np.sum(np.asarray(v)) for v in model.params.values()))
        flare.send(FLModel(metrics={{"score": score, "site": flare.get_site_name()}}))
"""


def test_cross_site_evaluation_gets_the_same_metrics(tmp_path: Path) -> None:
    """Metrics-only results: NVFlare's cross-site evaluation of the sites' local models gives the
    same table under AgentExecutor as under ScriptRunner."""
    from nvflare.app_common.workflows.cross_site_eval import CrossSiteEval
    from nvflare.job_config.api import FedJob

    tables = []
    for name, import_line in (
        ("ours", "import flare_agent_async.client as flare"),
        ("theirs", "import nvflare.client as flare"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        script = folder / "client.py"
        script.write_text(EVAL_SCRIPT.format(import_line=import_line))
        job = FedJob(name=f"cse_{name}", min_clients=_jobs.CLIENTS)
        job.set_app_packages(["flare_agent_async"])
        job.to_server(
            CrossSiteEval(server_models=[], submit_model_timeout=60, validation_timeout=60)
        )
        executor: object
        if name == "ours":
            launch = f"{sys.executable} -u {script}"
            executor = AgentExecutor(agent_id="trainer", launch=launch, agent_connect_timeout=60)
        else:
            executor = ScriptRunner(script=str(script), framework=FrameworkType.NUMPY)
        job.to_clients(executor, tasks=["submit_model", "validate"])
        process, workspace = _jobs.start_simulator(job, folder)
        out = (folder / "simulator.out").read_text
        assert _jobs.finish_simulator(process) == 0, out()[-3000:]
        assert _jobs.error_logs(workspace) == {}
        (table,) = workspace.rglob("cross_val_results.json")
        tables.append(json.loads(table.read_text()))
    ours, theirs = tables
    assert ours == theirs
    assert ours == {
        site: {owner: {"score": 3.0 * (6 + int(owner[-1])), "site": site} for owner in ours[site]}
        for site in ("site-1", "site-2")
    }
    assert all(sorted(owners) == ["site-1", "site-2"] for owners in ours.values())
