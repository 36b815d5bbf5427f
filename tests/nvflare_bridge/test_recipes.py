"""NVFlare's job recipes with one added line, ``use_agent_executor(recipe)``: each recipe runs in
the simulator twice, side by side, once as NVFlare builds it (its ScriptRunner and its Client
API) and once on AgentExecutor with the script's import lines changed; both must give the same
result. The conversion's rules and errors are checked without a simulator."""

from __future__ import annotations

import difflib
import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

import _jobs
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.app_common.np.recipes.cross_site_eval import NumpyCrossSiteEvalRecipe
from nvflare.app_common.np.recipes.fedavg import NumpyFedAvgRecipe

from flare_agent_async.nvflare import AgentExecutor, ExecutorOptions, use_agent_executor

SCRIPT = """\
import argparse

import numpy as np

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter


def mean(params):
    return float(np.mean(np.concatenate([np.ravel(value) for value in params.values()])))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", type=float, default=1.0)
    args = parser.parse_args()
    flare.init()
    writer = SummaryWriter()
    while flare.is_running():
        model = flare.receive()
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": mean(model.params)}))
            continue
        if flare.is_submit_model():
            site = flare.get_site_name()
            flare.send(flare.FLModel(params={"numpy_key": np.full(4, float(site[-1]))}))
            continue
        new = {name: value + args.step for name, value in model.params.items()}
        writer.add_scalar("mean", mean(new), global_step=model.current_round)
        flare.send(flare.FLModel(params=new, metrics={"mean": mean(new)}))


if __name__ == "__main__":
    main()
"""

CHANGED_IMPORTS = {
    "import nvflare.client as flare": "import flare_agent_async.client as flare",
    "from nvflare.client.tracking import SummaryWriter": (
        "from flare_agent_async.client.tracking import SummaryWriter"
    ),
}

JOB = """\
import sys

from flare_agent_async.nvflare import use_agent_executor
from nvflare.recipe import SimEnv
{imports}

recipe = {recipe}
{more}
{added}
recipe.execute(SimEnv(num_clients=2, workspace_root=sys.argv[1]))
"""

RUN_TIMEOUT = 150.0


def our_script(script: str) -> str:
    """The script with its imports of NVFlare's Client API changed, and nothing else."""
    ours = script
    expected = []
    for theirs, mine in CHANGED_IMPORTS.items():
        if theirs in script.splitlines():
            ours = ours.replace(theirs, mine)
            expected += [f"-{theirs}", f"+{mine}"]
    changed = [
        line
        for line in difflib.unified_diff(script.splitlines(), ours.splitlines(), lineterm="", n=0)
        if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))
    ]
    assert expected and sorted(changed) == sorted(expected)
    return ours


def run_both(
    tmp_path: Path,
    recipe: str,
    *,
    imports: str = "",
    more: str = "",
    files: dict[str, str] | None = None,
    script: str = SCRIPT,
) -> dict[str, Path]:
    """The recipe's job as NVFlare builds it and with ``use_agent_executor(recipe)``, both in
    the simulator at once, each in its own process group; their workspaces, by variant."""
    started = {}
    for variant in ("nvflare", "ours"):
        folder = tmp_path / variant
        folder.mkdir()
        (folder / "client.py").write_text(script if variant == "nvflare" else our_script(script))
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
        job = JOB.format(
            imports=imports,
            recipe=recipe,
            more=more,
            added="use_agent_executor(recipe)" if variant == "ours" else "",
        )
        (folder / "job.py").write_text(job)
        with (folder / "job.out").open("wb") as log:
            started[variant] = subprocess.Popen(
                [sys.executable, "job.py", str(folder / "workspace")],
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    try:
        for variant, process in started.items():
            code = _jobs.finish_simulator(process, RUN_TIMEOUT)
            output = (tmp_path / variant / "job.out").read_text()
            assert code == 0, f"the {variant} job failed:\n{output[-3000:]}"
    finally:
        for process in started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    workspaces = {variant: tmp_path / variant / "workspace" for variant in started}
    clients = sorted(workspaces["ours"].rglob("config_fed_client.json"))
    assert clients, "the converted job has no client config"
    for path in clients:
        assert "flare_agent_async.nvflare" in path.read_text(), f"{path} has no AgentExecutor"
    for path in workspaces["nvflare"].rglob("config_fed_client.json"):
        assert "flare_agent_async" not in path.read_text()
    assert _jobs.error_logs(workspaces["ours"]) == {}
    return workspaces


def server_npy(workspace: Path) -> np.ndarray:
    (path,) = workspace.rglob("server/simulate_job/models/server.npy")
    return np.load(path, allow_pickle=False)


def scalars(workspace: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars NVFlare's TensorBoard receiver wrote on the server, by site."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for folder in sorted(workspace.rglob("tb_events/site-*")):
        events = EventAccumulator(str(folder))
        events.Reload()
        found[folder.name] = [
            (event.step, event.value)
            for tag in events.Tags()["scalars"]
            for event in events.Scalars(tag)
        ]
    return found


# -- the recipes, in the simulator ----------------------------------------------------------------


def test_hello_numpy_recipe_with_tensorboard_tracking_runs_on_agent_executor(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install -e '.[test]'")
    workspaces = run_both(
        tmp_path,
        'NumpyFedAvgRecipe(name="hello-numpy", min_clients=2, num_rounds=2, model=[0.0] * 6, '
        'train_script="client.py", train_args="--step 1.5")',
        imports=(
            "from nvflare.app_common.np.recipes.fedavg import NumpyFedAvgRecipe\n"
            "from nvflare.recipe import add_experiment_tracking"
        ),
        more='add_experiment_tracking(recipe, tracking_type="tensorboard")',
    )
    ours, theirs = server_npy(workspaces["ours"]), server_npy(workspaces["nvflare"])
    np.testing.assert_array_equal(ours, np.full(6, 3.0))
    np.testing.assert_array_equal(ours, theirs)
    expected = {site: [(0, 1.5), (1, 3.0)] for site in ("site-1", "site-2")}
    assert scalars(workspaces["ours"]) == expected
    assert scalars(workspaces["nvflare"]) == expected


def test_generic_fedavg_recipe_with_a_diff_transfer_runs_on_agent_executor(
    tmp_path: Path,
) -> None:
    # The server aggregates weight differences only, so a trainer that ignored the recipe's
    # DIFF transfer type (and sent full weights) would fail the job.
    initial = tmp_path / "initial.npz"
    np.savez(initial, **_jobs.INITIAL)
    workspaces = run_both(
        tmp_path,
        f"FedAvgRecipe(name='generic', min_clients=2, num_rounds=2, train_script='client.py', "
        f"framework=FrameworkType.RAW, params_transfer_type=TransferType.DIFF, "
        f"aggregator_data_kind=DataKind.WEIGHT_DIFF, "
        f"model_persistor=NpzModelPersistor({str(initial)!r}))",
        imports=(
            "from nvflare.apis.dxo import DataKind\n"
            "from nvflare.client.config import TransferType\n"
            "from nvflare.fuel.utils.constants import FrameworkType\n"
            "from nvflare.recipe.fedavg import FedAvgRecipe\n"
            "from flare_agent_async.nvflare import NpzModelPersistor"
        ),
    )
    ours, theirs = _jobs.final_model(workspaces["ours"]), _jobs.final_model(workspaces["nvflare"])
    assert sorted(ours) == sorted(_jobs.INITIAL)
    for name, initial_value in _jobs.INITIAL.items():
        np.testing.assert_allclose(ours[name], initial_value + 2.0)
        np.testing.assert_array_equal(ours[name], theirs[name])


CYCLIC_MODEL = '''\
"""A model wrapper for CyclicRecipe: the initial model in an .npz file, kept by our persistor."""

from flare_agent_async.nvflare import NpzModelPersistor


class NpzModel:
    def __init__(self, path):
        self.path = path

    def add_to_fed_job(self, job, ctx):
        job.add_component("persistor", NpzModelPersistor(self.path), ctx)
        return "persistor"
'''


def test_cyclic_recipe_runs_on_agent_executor(tmp_path: Path) -> None:
    initial = tmp_path / "initial.npz"
    np.savez(initial, **_jobs.INITIAL)
    workspaces = run_both(
        tmp_path,
        f"CyclicRecipe(name='cyclic', min_clients=2, num_rounds=2, train_script='client.py', "
        f"framework=FrameworkType.RAW, model=NpzModel({str(initial)!r}))",
        imports=(
            "from nvflare.fuel.utils.constants import FrameworkType\n"
            "from nvflare.recipe.cyclic import CyclicRecipe\n"
            "from npz_model import NpzModel"
        ),
        files={"npz_model.py": CYCLIC_MODEL},
    )
    ours, theirs = _jobs.final_model(workspaces["ours"]), _jobs.final_model(workspaces["nvflare"])
    for name, initial_value in _jobs.INITIAL.items():
        # two rounds of two sites one after the other: four steps of 1.0
        np.testing.assert_allclose(ours[name], initial_value + 4.0)
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_cross_site_eval_recipe_runs_on_agent_executor(tmp_path: Path) -> None:
    model = tmp_path / "server.npy"
    np.save(model, np.arange(4, dtype=np.float32))
    workspaces = run_both(
        tmp_path,
        f"NumpyCrossSiteEvalRecipe(name='cse', min_clients=2, eval_script='client.py', "
        f"initial_ckpt={str(model)!r})",
        imports=(
            "from nvflare.app_common.np.recipes.cross_site_eval import NumpyCrossSiteEvalRecipe"
        ),
    )
    results = {}
    for variant, workspace in workspaces.items():
        (path,) = workspace.rglob("cross_val_results.json")
        results[variant] = json.loads(path.read_text())
    assert results["ours"] == results["nvflare"]
    # every site evaluated the server's model and each site's submitted one
    assert results["ours"]["site-1"]["SRV_server"] == {"accuracy": 1.5}
    assert results["ours"]["site-2"]["site-1"] == {"accuracy": 1.0}
    assert results["ours"]["site-1"]["site-2"] == {"accuracy": 2.0}


TORCH_NET = """\
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        with torch.no_grad():  # the same initial model in every process
            self.fc.weight.copy_(torch.arange(6.0).reshape(2, 3))
            self.fc.bias.zero_()
"""

TORCH_SCRIPT = """\
import torch

import nvflare.client as flare
from net import Net


def main():
    flare.init()
    net = Net()
    while flare.is_running():
        model = flare.receive()
        net.load_state_dict(model.params)
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.add_(1.0)
        flare.send(flare.FLModel(params=net.state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": 1}))


if __name__ == "__main__":
    main()
"""


@pytest.mark.torch
def test_pytorch_fedavg_recipe_runs_on_agent_executor(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[torch]'")
    workspaces = run_both(
        tmp_path,
        "FedAvgRecipe(name='pt', min_clients=2, num_rounds=2, model=Net(), "
        "train_script='client.py')",
        imports=("from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe\nfrom net import Net"),
        files={"net.py": TORCH_NET},
        script=TORCH_SCRIPT,
    )
    initial = {"fc.weight": np.arange(6.0).reshape(2, 3), "fc.bias": np.zeros(2)}
    found = {}
    for variant, workspace in workspaces.items():
        (path,) = workspace.rglob("FL_global_model.pt")
        found[variant] = torch.load(path, weights_only=True)["model"]
    for name, value in initial.items():
        np.testing.assert_allclose(np.asarray(found["ours"][name]), value + 2.0, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(found["ours"][name]), found["nvflare"][name])


# -- the conversion, without a simulator ----------------------------------------------------------


def numpy_recipe(tmp_path: Path, **more: Any) -> NumpyFedAvgRecipe:
    script = tmp_path / "client.py"
    script.write_text(SCRIPT)
    return NumpyFedAvgRecipe(
        name="unit", min_clients=2, model=[0.0] * 3, train_script=str(script), **more
    )


def client_executors(recipe: Any) -> dict[str, list[Any]]:
    return {
        target: [definition.executor for definition in app.app_config.executors]
        for target, app in recipe._job._deploy_map.items()
        if hasattr(app.app_config, "executors")
    }


def test_every_script_runner_becomes_an_agent_executor_with_its_script_and_settings(
    tmp_path: Path,
) -> None:
    recipe = numpy_recipe(tmp_path, train_args="--step {2}", params_transfer_type="DIFF")
    assert use_agent_executor(recipe, listen_url="tcp://127.0.0.1:0", task_timeout=60) is recipe
    (executors,) = client_executors(recipe).values()
    (executor,) = executors
    assert isinstance(executor, AgentExecutor)
    assert executor.launch == "{python} -u custom/client.py --step '{{2}}'"
    assert executor.task_timeout == 60
    assert executor.client_config == {
        "train_task_name": "train",
        "eval_task_name": "validate",
        "submit_model_task_name": "submit_model",
        "transfer_type": "DIFF",
        "params_exchange_format": "numpy",
    }
    assert "flare_agent_async" in recipe._job.job.app_packages


def test_a_job_built_by_hand_with_a_script_runner_is_converted_too(tmp_path: Path) -> None:
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    script = tmp_path / "client.py"
    script.write_text("pass\n")
    job = FedJob(name="by_hand", min_clients=1)
    runner = ScriptRunner(
        script=str(script),
        launch_external_process=True,
        command="/opt/venv/bin/python -u",
        framework=FrameworkType.NUMPY,
    )
    job.to_clients(runner, tasks=["train"])
    assert use_agent_executor(job, task_timeout=60) is job
    (executors,) = [
        [definition.executor for definition in app.app_config.executors]
        for app in job._deploy_map.values()
        if hasattr(app.app_config, "executors")
    ]
    (executor,) = executors
    assert isinstance(executor, AgentExecutor)
    assert executor.launch == "/opt/venv/bin/python -u custom/client.py"
    assert executor.client_config["params_exchange_format"] == "numpy"
    assert "flare_agent_async" in job.job.app_packages


def test_per_site_settings_and_commands_are_kept(tmp_path: Path) -> None:
    recipe = numpy_recipe(tmp_path, launch_external_process=True)
    recipe.set_per_site_config(
        {
            "site-1": {"train_args": "--step 1"},
            "site-2": {"train_args": "--step 2", "command": "/opt/venv/bin/python -X dev"},
        }
    )
    use_agent_executor(recipe)
    launches = {
        target: [executor.launch for executor in executors]
        for target, executors in client_executors(recipe).items()
    }
    assert launches == {
        "site-1": ["{python} -u custom/client.py --step 1"],
        "site-2": ["/opt/venv/bin/python -X dev custom/client.py --step 2"],
    }


def test_unknown_or_misplaced_options_are_type_errors_and_change_nothing(tmp_path: Path) -> None:
    recipe = numpy_recipe(tmp_path)
    with pytest.raises(TypeError, match="listen_ur"):
        use_agent_executor(recipe, listen_ur="tcp://127.0.0.1:0")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="launch: it comes from the recipe"):
        use_agent_executor(recipe, launch="python x.py")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="listen_url must be a URL"):
        use_agent_executor(recipe, listen_url="localhost")
    with pytest.raises(TypeError, match="expected an NVFlare job recipe, got dict"):
        use_agent_executor({})
    assert not client_executors(recipe)  # nothing was prepared or changed


def test_a_recipe_without_a_script_runner_is_an_error_naming_what_it_has(tmp_path: Path) -> None:
    model = tmp_path / "server.npy"
    np.save(model, np.zeros(3))
    recipe = NumpyCrossSiteEvalRecipe(min_clients=2, initial_ckpt=str(model))
    with pytest.raises(ValueError, match="has no script runner to replace; it has NPValidator"):
        use_agent_executor(recipe)


def test_a_runner_that_cannot_be_converted_is_an_error_and_the_recipe_stays_whole(
    tmp_path: Path,
) -> None:
    recipe = numpy_recipe(tmp_path, launch_external_process=True, launch_once=False)
    with pytest.raises(ValueError, match="launch_once=False"):
        use_agent_executor(recipe)
    ((executor,),) = client_executors(recipe).values()
    assert isinstance(executor, ClientAPIExecutor)


def test_the_options_are_agent_executors_except_what_comes_from_the_recipe() -> None:
    parameters = set(inspect.signature(AgentExecutor).parameters) - {"launch", "client_config"}
    assert set(ExecutorOptions.__annotations__) == parameters
