"""The Client API over the agent: AsyncClient on asyncio and trio, the blocking Client and the
module functions, and what each call does after an abort, a goodbye or a lost site."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.from_thread
import numpy as np
import pytest
from conftest import site_thread

import flare_agent_async.client as flare
from flare_agent_async import AgentClosed, FlareSite, LogRecord, TaskAborted
from flare_agent_async.client import AsyncClient, Client, FLModel, MetaKey
from flare_agent_async.protocol import Bye, TaskAssign
from flare_agent_async.testing import FaultyConnector, ScriptedPeer
from flare_agent_async.transports import MessageStream, connector_for

ROUND_META = {"data_kind": "WEIGHTS", "total_round": 3}


def round_meta(n: int) -> dict[str, Any]:
    return {**ROUND_META, "current_round": n}


async def echo_plus_one(flare: AsyncClient, seen: list[FLModel]) -> None:
    while await flare.is_running():
        model = await flare.receive()
        assert model is not None
        seen.append(model)
        params = {name: value + 1 for name, value in model.params.items()}
        await flare.send(
            FLModel(
                params=params,
                metrics={"round": model.current_round},
                meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 10},
            )
        )


@pytest.mark.anyio
async def test_a_client_api_loop_trains_round_after_round_and_ends_with_the_job() -> None:
    seen: list[FLModel] = []
    logs: list[LogRecord] = []
    site = FlareSite("site-1", "job-1", on_log=logs.append)
    async with anyio.create_task_group() as group, site:  # the site leaves first: goodbye
        url = await site.listen("memory://")

        async def trainer() -> None:
            async with AsyncClient(
                url, agent_id="a1", site_name="site-1", job_id="job-1"
            ) as client:
                assert (client.get_site_name(), client.get_job_id()) == ("site-1", "job-1")
                await client.log("started", 1.0, None, global_step=0)
                await echo_plus_one(client, seen)
                assert await client.receive() is None  # the job is over

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=10)
        weights = {"w": np.zeros(2)}
        for n in range(3):
            result = await site.run_task("a1", "train", weights, round_meta(n))
            assert result.meta["initial_metrics"] == {"round": n}
            assert result.meta["NUM_STEPS_CURRENT_ROUND"] == 10
            assert result.meta["data_kind"] == "WEIGHTS"
            weights = result.data
    # leaving the site said goodbye: is_running() was False and the trainer ended
    np.testing.assert_array_equal(weights["w"], [3.0, 3.0])
    assert [model.current_round for model in seen] == [0, 1, 2]
    assert all(model.meta["site_name"] == "site-1" for model in seen)
    assert [(r.key, r.value, r.step) for r in logs] == [("started", 1.0, 0)]


@pytest.mark.anyio
async def test_receive_holds_the_task_until_send_and_times_out_without_one() -> None:
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen("memory://")
        async with AsyncClient(url, agent_id="a1", site_name="site-1") as client:
            assert await client.receive(timeout=0.05) is None
            group.start_soon(site.run_task, "a1", "validate", {"w": 1}, round_meta(0))
            first = await client.receive(timeout=10)
            assert first is not None and await client.receive() is first  # held
            assert client.get_task_name() == "validate"
            assert (client.is_train(), client.is_evaluate(), client.is_submit_model()) == (
                False,
                True,
                False,
            )
            await client.send(FLModel(metrics={"acc": 0.5}))
            with pytest.raises(RuntimeError, match="receive"):
                await client.send(FLModel(metrics={"acc": 0.5}))
            with pytest.raises(RuntimeError, match="no task"):
                client.get_task_name()


@pytest.mark.anyio
async def test_an_aborted_task_is_dropped_and_its_late_result_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcome: list[BaseException] = []
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen("memory://")
        async with AsyncClient(url, agent_id="a1", site_name="site-1") as client:

            async def run() -> None:
                try:
                    await site.run_task("a1", "train", {"w": 1}, round_meta(0), task_id="t1")
                except TaskAborted as exc:
                    outcome.append(exc)

            group.start_soon(run)
            model = await client.receive(timeout=10)
            assert model is not None
            assert await site.abort_task("a1", "t1")
            with caplog.at_level(logging.WARNING, "flare_agent_async.client"):
                await client.send(FLModel(params={"w": 2}))  # too late: logged, not raised
            assert "did not keep" in caplog.text
            group.start_soon(site.run_task, "a1", "train", {"w": 5}, round_meta(1))
            following = await client.receive(timeout=10)
            assert following is not None and following.params == {"w": 5}
            await client.send(FLModel(params={"w": 6}))
    assert len(outcome) == 1


@pytest.mark.anyio
async def test_a_lost_site_is_an_error_not_the_end_of_the_job() -> None:
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(connector_for(await site.listen("memory://")))
        options: dict[str, Any] = {
            "agent_id": "a1",
            "site_name": "site-1",
            "reconnect_timeout": 0.2,
        }
        async with AsyncClient(faulty, **options) as client:
            faulty.refuse_connections = True
            await faulty.drop()
            with anyio.fail_after(10), pytest.raises(AgentClosed, match="site is gone"):
                await client.receive()
            with pytest.raises(AgentClosed):
                await client.is_running()


@pytest.mark.anyio
async def test_ranks_other_than_0_do_not_talk_to_the_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    async with AsyncClient(site_name="site-1") as client:  # no URL needed: it never connects
        assert client.rank == "1"
        assert await client.receive() is None and not await client.is_running()
        await client.send(FLModel(params={"w": 1}))  # nothing is sent
        with pytest.raises(RuntimeError, match="only rank 0"):
            await client.log("loss", 1.0)
    assert AsyncClient(site_name="s", rank=0, site="memory://x", agent_id="a").rank == "0"
    with pytest.raises(ValueError, match="rank must be"):
        AsyncClient(site_name="s", rank=1.5)  # type: ignore[arg-type]


def test_settings_come_from_the_arguments_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("FLARE_AGENT_URL", "FLARE_AGENT_SITE_NAME", "FLARE_AGENT_ID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="FLARE_AGENT_SITE_NAME"):
        AsyncClient()
    monkeypatch.setenv("FLARE_AGENT_SITE_NAME", "site-9")
    with pytest.raises(ValueError, match="FLARE_AGENT_URL"):
        AsyncClient(agent_id="a1")
    monkeypatch.setenv("FLARE_AGENT_URL", "memory://nowhere")
    monkeypatch.setenv("FLARE_AGENT_ID", "a9")
    monkeypatch.setenv("FLARE_AGENT_JOB_ID", "job-9")
    client = AsyncClient(transfer_type="DIFF", config={"lr": 0.1})
    assert (client.get_site_name(), client.get_job_id()) == ("site-9", "job-9")
    assert client.system_info() == {"site_name": "site-9", "job_id": "job-9"}
    config = client.get_config()
    assert config["lr"] == 0.1 and config["TASK_EXCHANGE"]["transfer_type"] == "DIFF"
    with pytest.raises(TypeError, match="colour"):
        AsyncClient(colour="blue")  # type: ignore[call-arg]


def test_task_names_and_transfer_type_left_unset_come_from_the_executors_client_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RANK", "1")  # no agent: only the settings are read
    monkeypatch.setenv("FLARE_AGENT_SITE_NAME", "site-9")
    monkeypatch.setenv(
        "FLARE_AGENT_CLIENT_CONFIG", '{"transfer_type": "DIFF", "train_task_name": "fit"}'
    )
    exchange = AsyncClient().get_config()["TASK_EXCHANGE"]
    assert exchange == {
        "train_task_name": "fit",
        "eval_task_name": "validate",
        "submit_model_task_name": "submit_model",
        "transfer_type": "DIFF",
        "exchange_format": "raw",
    }
    given = AsyncClient(transfer_type="FULL").get_config()
    assert given["TASK_EXCHANGE"]["transfer_type"] == "FULL"
    for bad, message in (
        ("{", "is not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"colour": "blue"}', "unknown settings: colour"),
        ('{"transfer_type": 1}', "transfer_type must be a string"),
    ):
        monkeypatch.setenv("FLARE_AGENT_CLIENT_CONFIG", bad)
        with pytest.raises(ValueError, match=message):
            AsyncClient()


# -- the blocking Client and the module functions ---------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_module_functions_run_a_script_written_for_nvflare(backend: str) -> None:
    with site_thread(job_id="job-1") as site:
        with pytest.raises(RuntimeError, match=r"flare.init\(\)"):
            flare.receive()
        client = flare.init(site=site.url, agent_id="a1", site_name="site-1", backend=backend)
        try:
            assert flare.init() is client  # a second init changes nothing
            futures = [site.run_task_soon("a1", {"w": n}, meta=round_meta(n)) for n in range(1)]
            assert flare.is_running()
            model = flare.receive()
            assert model is not None and flare.is_train() and flare.get_task_name() == "train"
            assert (flare.get_site_name(), flare.get_job_id()) == ("site-1", "")
            flare.log("loss", 0.5, None, global_step=1)
            flare.send(FLModel(params={"w": model.params["w"] + 10}))
            assert futures[0].result(10).data == {"w": 10}
            flare.clear()
            assert flare.system_info()["site_name"] == "site-1"
            assert flare.get_config()["TASK_EXCHANGE"]["train_task_name"] == "train"
        finally:
            flare.shutdown()
        flare.shutdown()  # twice is harmless
        with pytest.raises(RuntimeError, match=r"flare.init\(\)"):
            flare.is_running()


def test_a_blocking_client_takes_nvflares_own_model() -> None:
    nvflare_model = pytest.importorskip(
        "nvflare.app_common.abstract.fl_model", reason="needs NVFlare: pip install -e '.[test]'"
    )
    with site_thread() as site:
        client = Client(site.url, agent_id="a1", site_name="site-1")
        client.start()
        try:
            future = site.run_task_soon("a1", {"w": 1}, meta=round_meta(0))
            assert client.receive(timeout=10) is not None
            client.send(nvflare_model.FLModel(params={"w": 2}, metrics={"acc": 1.0}))
            result = future.result(10)
            assert result.data == {"w": 2} and result.meta["initial_metrics"] == {"acc": 1.0}
        finally:
            client.shutdown()
        with pytest.raises(AgentClosed):
            client.receive()
    with pytest.raises(ValueError, match="config_file"):
        flare.init(config_file="config_fed_client.json")


@pytest.mark.anyio
async def test_after_the_goodbye_a_held_result_is_only_logged_and_the_loop_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ScriptedPeer() as peer, anyio.create_task_group() as group:
        accepted: list[MessageStream] = []
        welcomed = anyio.Event()

        async def accept() -> None:
            accepted.append(await peer.accept_agent())
            welcomed.set()

        group.start_soon(accept)
        async with AsyncClient(peer.url, agent_id="a1", site_name="site-1") as client:
            await welcomed.wait()
            task = TaskAssign(task_id="t1", task_name="train", meta=round_meta(0), data={"w": 1})
            await accepted[0].send(task)
            assert await client.receive(timeout=10) is not None
            await accepted[0].send(Bye(reason="the job ended"))
            with caplog.at_level(logging.WARNING, "flare_agent_async.client"):
                await client.send(FLModel(params={"w": 2}))
            assert "did not keep" in caplog.text
            assert await client.receive() is None
            assert not await client.is_running()
