"""`AgentExecutor` driven as NVFlare drives it, without the simulator: events, tasks, aborts."""

from __future__ import annotations

import concurrent.futures
import gc
import sys
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest
import trustme

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

from conftest import CELL_OPTIONS
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.app_common.np.np_downloader import ArrayDownloadable, download_arrays
from nvflare.fuel.f3.cellnet.cell import Cell
from nvflare.fuel.f3.streaming.obj_downloader import ObjectDownloader
from nvflare.fuel.utils.fobs import dots
from nvflare.fuel.utils.fobs.decomposers.via_downloader import LazyDownloadRef

from flare_agent_async import AgentClosed, AsyncFlareAgent, HeldResult, TaskResult
from flare_agent_async.nvflare import AgentExecutor, NpzModelPersistor, result_to_shareable
from flare_agent_async.nvflare._arrive import TASK_ROUTE
from flare_agent_async.nvflare._executor import PASS_THROUGH_MIN_BYTES, _Aborted
from flare_agent_async.tls import client_context

pytestmark = pytest.mark.anyio

SITE = "site-1"
JOB = "job-1"


class FakeEngine:
    """What an executor asks of NVFlare's engine: the workspace, and somewhere to fire events."""

    def __init__(self, root: Path) -> None:
        (root / "startup").mkdir()
        (root / "local").mkdir()
        self.workspace = Workspace(str(root), SITE)
        self.events: list[str] = []
        self.event_data: list[Any] = []

    def get_workspace(self) -> Workspace:
        return self.workspace

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self.events.append(event_type)
        self.event_data.append(fl_ctx.get_prop(FLContextKey.EVENT_DATA))

    @contextmanager
    def new_context(self) -> Iterator[FLContext]:
        ctx = FLContext()
        ctx.set_prop(ReservedKey.ENGINE, self, private=True, sticky=False)
        yield ctx


@pytest.fixture
def fl_ctx(tmp_path: Path) -> FLContext:
    engine = FakeEngine(tmp_path)
    Path(engine.workspace.get_app_dir(JOB)).mkdir(parents=True)
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, JOB, private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, SITE, private=True, sticky=False)
    return ctx


def task_shareable(data: dict[str, Any], task_id: str = "t1") -> Shareable:
    shareable = DXO(DataKind.WEIGHTS, data, meta={"lr": 0.1}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 1)
    shareable.set_header(AppConstants.NUM_ROUNDS, 3)
    shareable.set_header(FLContextKey.TASK_ID, task_id)
    return shareable


@asynccontextmanager
async def running(executor: AgentExecutor, fl_ctx: FLContext) -> AsyncIterator[AgentExecutor]:
    await anyio.to_thread.run_sync(executor.handle_event, EventType.START_RUN, fl_ctx)
    try:
        yield executor
    finally:
        await anyio.to_thread.run_sync(executor.handle_event, EventType.END_RUN, fl_ctx)


@asynccontextmanager
async def executing(
    executor: AgentExecutor, shareable: Shareable, fl_ctx: FLContext, signal: Signal | None = None
) -> AsyncIterator[list[Shareable]]:
    """Run ``execute`` in a thread, as NVFlare does; its reply lands in the yielded list.

    If the block fails, NVFlare's abort signal ends the task, so its thread cannot hang the test.
    """
    signal = signal or Signal()
    replies: list[Shareable] = []

    async def run() -> None:
        reply = await anyio.to_thread.run_sync(executor.execute, "train", shareable, fl_ctx, signal)
        replies.append(reply)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        try:
            yield replies
        except BaseException:
            signal.trigger(True)
            raise


async def test_a_task_runs_on_the_agent_and_end_run_says_goodbye(
    fl_ctx: FLContext, tmp_path: Path
) -> None:
    executor = AgentExecutor(agent_id="a1")
    async with running(executor, fl_ctx):
        url = (tmp_path / JOB / "flare_agent_async.url").read_text().strip()
        assert url == executor.url and url.startswith("tcp://127.0.0.1:")
        async with AsyncFlareAgent(url, agent_id="a1", site_name=SITE) as agent:
            with anyio.fail_after(20):
                shareable = task_shareable({"w": np.ones(3, dtype=np.float32)})
                async with executing(executor, shareable, fl_ctx) as replies:
                    task = await agent.get_task()
                    assert task is not None and task.task_id == "t1"
                    result = TaskResult({"NUM_STEPS_CURRENT_ROUND": 5}, {"w": task.data["w"] + 1})
                    assert await agent.submit_result(result)
                assert task.meta == {
                    "lr": 0.1,
                    "data_kind": "WEIGHTS",
                    "current_round": 1,
                    "total_round": 3,
                }
                await anyio.to_thread.run_sync(executor.handle_event, EventType.END_RUN, fl_ctx)
                with pytest.raises(AgentClosed):
                    await agent.get_task()
    (reply,) = replies
    assert reply.get_return_code() == ReturnCode.OK
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert dxo.meta == {"NUM_STEPS_CURRENT_ROUND": 5}
    np.testing.assert_array_equal(dxo.data["w"], np.full(3, 2, dtype=np.float32))
    # The task's arrays are let go once the task ended: the client job holds the result only,
    # and that until NVFlare has sent it.
    assert from_shareable(shareable).data == {}
    executor.handle_event(EventType.AFTER_SEND_TASK_RESULT, fl_ctx)
    assert from_shareable(reply).data == {}


async def test_nvflare_abort_aborts_a_fetched_task_and_an_unfetched_one_does_not_wedge_the_agent(
    fl_ctx: FLContext,
) -> None:
    executor = AgentExecutor(agent_id="a1", abort_check_interval=0.02)
    async with running(executor, fl_ctx):
        assert executor.url is not None
        async with AsyncFlareAgent(executor.url, agent_id="a1", site_name=SITE) as agent:
            with anyio.fail_after(20):
                # Aborted after the agent fetched it: the trainer hears of it.
                signal = Signal()
                async with executing(executor, task_shareable({}, "t1"), fl_ctx, signal) as first:
                    task = await agent.get_task()
                    assert task is not None and task.task_id == "t1"
                    signal.trigger(True)
                    await task.wait_aborted()
                assert first[0].get_return_code() == ReturnCode.TASK_ABORTED
                assert not await agent.submit_result(TaskResult({}, {}))

                # Aborted before the agent asked for it: the next task still comes through.
                signal = Signal()
                signal.trigger(True)
                async with executing(executor, task_shareable({}, "t2"), fl_ctx, signal) as second:
                    pass
                assert second[0].get_return_code() == ReturnCode.TASK_ABORTED
                async with executing(executor, task_shareable({}, "t3"), fl_ctx) as third:
                    task = await agent.get_task()
                    assert task is not None
                    if task.task_id == "t2":  # fetched before its abort arrived
                        await task.wait_aborted()
                        assert not await agent.submit_result(TaskResult({}, {}))
                        task = await agent.get_task()
                    assert task is not None and task.task_id == "t3"
                    assert await agent.submit_result(TaskResult({}, {"done": True}))
                assert third[0].get_return_code() == ReturnCode.OK


async def test_tls_a_secret_and_the_agent_id_from_the_job_meta(
    fl_ctx: FLContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    certfile = tmp_path / "site.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(certfile)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    monkeypatch.setenv("TEST_AGENT_SECRET", "s3cret")
    fl_ctx.set_prop(FLContextKey.JOB_META, {"agent_id": "from-meta"}, private=True, sticky=False)
    executor = AgentExecutor(
        listen_url="tls://127.0.0.1:0", tls_certfile=str(certfile), secret_env="TEST_AGENT_SECRET"
    )
    async with running(executor, fl_ctx):
        assert executor.url is not None and executor.url.startswith("tls://127.0.0.1:")
        agent = AsyncFlareAgent(
            executor.url,
            agent_id="from-meta",
            site_name=SITE,
            secret="s3cret",
            ssl_context=client_context(str(ca_file)),
        )
        async with agent:
            with anyio.fail_after(20):
                async with executing(
                    executor, task_shareable({"w": np.ones(1)}), fl_ctx
                ) as replies:
                    task = await agent.get_task()
                    assert task is not None
                    assert await agent.submit_result(TaskResult({}, task.data))
    assert replies[0].get_return_code() == ReturnCode.OK


def test_a_launched_trainer_that_exits_early_fails_the_task_at_once(fl_ctx: FLContext) -> None:
    launch = f'{sys.executable} -c "raise SystemExit(3)"'
    executor = AgentExecutor(agent_id="a1", launch=launch, agent_connect_timeout=60)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    try:
        reply = executor.execute("train", task_shareable({"w": np.zeros(1)}), fl_ctx, Signal())
    finally:
        executor.handle_event(EventType.END_RUN, fl_ctx)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert executor.trainer_returncode == 3


def test_a_launched_trainer_that_stays_is_terminated_at_end_run(fl_ctx: FLContext) -> None:
    # The stand-in trainer never connects and never leaves on its own.
    launch = f'{sys.executable} -c "import time; time.sleep(600)"'
    executor = AgentExecutor(launch=launch, launch_stop_timeout=0.2)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    executor.handle_event(EventType.END_RUN, fl_ctx)
    assert executor.trainer_returncode == -15


def test_what_a_launched_trainer_starts_in_a_session_of_its_own_is_reaped_at_end_run(
    fl_ctx: FLContext, tmp_path: Path
) -> None:
    # As torchrun starts its ranks: a child in a session of its own, out of the trainer's
    # process group, which a signal to the group does not reach.
    child = tmp_path / "child.pid"
    script = tmp_path / "trainer.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "stay = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "child = subprocess.Popen(stay, start_new_session=True)\n"
        f"open({str(child)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    executor = AgentExecutor(launch=f"{sys.executable} {script}", launch_stop_timeout=0.2)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    deadline = time.monotonic() + 30
    while not child.exists() or not child.read_text():
        assert time.monotonic() < deadline, "the trainer never started its child"
        time.sleep(0.05)
    pid = int(child.read_text())
    executor.handle_event(EventType.END_RUN, fl_ctx)
    assert executor.trainer_returncode == -15
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, f"the trainer's child {pid} outlived the run"
        time.sleep(0.05)


def test_a_launched_trainers_task_leaves_the_client_job_once_the_trainer_has_it(
    fl_ctx: FLContext, tmp_path: Path
) -> None:
    # While the trainer works, the client job holds none of the task's arrays: a launched
    # trainer is never started again, so nothing would send it the task a second time.
    got, go = tmp_path / "got", tmp_path / "go"
    script = tmp_path / "trainer.py"
    script.write_text(
        "import os, pathlib, time\n"
        "from flare_agent_async import SyncFlareAgent, TaskResult\n"
        "env = os.environ\n"
        "with SyncFlareAgent(env['FLARE_AGENT_URL'], agent_id=env['FLARE_AGENT_ID'],\n"
        "                    site_name=env['FLARE_AGENT_SITE_NAME']) as agent:\n"
        "    task = agent.get_task(timeout=60)\n"
        f"    pathlib.Path({str(got)!r}).touch()\n"
        "    deadline = time.monotonic() + 60\n"
        f"    while not pathlib.Path({str(go)!r}).exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    agent.submit_result(TaskResult({}, task.data))\n"
    )
    executor = AgentExecutor(launch=f"{sys.executable} {script}", agent_connect_timeout=60)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    try:
        shareable = task_shareable({"w": np.arange(4, dtype=np.float32)})
        weights = weakref.ref(from_shareable(shareable).data["w"])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(executor.execute, "train", shareable, fl_ctx, Signal())
            deadline = time.monotonic() + 60
            while not got.exists():
                assert time.monotonic() < deadline, "the trainer never got its task"
                assert not reply.done(), reply.result()
                time.sleep(0.02)
            deadline = time.monotonic() + 10
            while gc.collect() >= 0 and weights() is not None:
                assert time.monotonic() < deadline, "the client job still holds the task's arrays"
                time.sleep(0.02)
            go.touch()
            result = reply.result(timeout=60)
    finally:
        executor.handle_event(EventType.END_RUN, fl_ctx)
    assert result.get_return_code() == ReturnCode.OK
    np.testing.assert_array_equal(from_shareable(result).data["w"], np.arange(4))


def test_a_site_that_cannot_listen_panics_the_run(fl_ctx: FLContext) -> None:
    executor = AgentExecutor(listen_url="bogus://nowhere")
    executor.handle_event(EventType.START_RUN, fl_ctx)
    assert fl_ctx.get_engine().events == [EventType.FATAL_SYSTEM_ERROR]
    reply = executor.execute("train", task_shareable({}), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    executor.handle_event(EventType.END_RUN, fl_ctx)


def test_a_task_without_a_dxo_is_bad_task_data(fl_ctx: FLContext) -> None:
    executor = AgentExecutor()
    executor.handle_event(EventType.START_RUN, fl_ctx)
    try:
        reply = executor.execute("train", Shareable(), fl_ctx, Signal())
    finally:
        executor.handle_event(EventType.END_RUN, fl_ctx)
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA


@pytest.mark.parametrize(
    ("result", "app_defined", "expected_rc", "expected_kind"),
    [
        (TaskResult({}, {"w": 1}), False, ReturnCode.OK, DataKind.WEIGHTS),
        (TaskResult({"data_kind": DataKind.WEIGHT_DIFF}, {"w": 1}), False, "OK", "WEIGHT_DIFF"),
        (TaskResult({}, {"w": 1}), True, ReturnCode.OK, DataKind.APP_DEFINED),
        (TaskResult({}, {}, "BAD_TASK_DATA"), False, ReturnCode.BAD_TASK_DATA, None),
        (TaskResult({}, {}, "not-an-nvflare-code"), False, ReturnCode.EXECUTION_EXCEPTION, None),
        (TaskResult({}, np.zeros(2)), False, ReturnCode.EXECUTION_RESULT_ERROR, None),
    ],
)
def test_results_convert_to_shareables(
    result: TaskResult, app_defined: bool, expected_rc: str, expected_kind: str | None
) -> None:
    shareable = result_to_shareable(result, app_defined)
    assert shareable.get_return_code() == expected_rc
    if expected_kind is not None:
        assert from_shareable(shareable).data_kind == expected_kind


def test_bad_executor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="client_config has unknown settings: colour"):
        AgentExecutor(client_config={"colour": "blue"})
    with pytest.raises(ValueError, match="client_config values must be strings"):
        AgentExecutor(client_config={"transfer_type": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="listen_url"):
        AgentExecutor(listen_url="127.0.0.1:0")
    with pytest.raises(ValueError, match="tls_certfile"):
        AgentExecutor(listen_url="tls://127.0.0.1:0")
    with pytest.raises(ValueError, match="agent_connect_timeout"):
        AgentExecutor(agent_connect_timeout=0)


def test_the_persistor_loads_the_initial_model_and_saves_the_latest(
    fl_ctx: FLContext, tmp_path: Path
) -> None:
    initial = tmp_path / "initial.npz"
    np.savez(initial, w=np.arange(3.0))
    persistor = NpzModelPersistor(str(initial))
    model = persistor.load_model(fl_ctx)
    np.testing.assert_array_equal(model[ModelLearnableKey.WEIGHTS]["w"], np.arange(3.0))
    persistor.save_model(make_model_learnable({"w": np.ones(3)}, {}), fl_ctx)
    with np.load(tmp_path / JOB / "global_model.npz", allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["w"], np.ones(3))
    np.testing.assert_array_equal(
        persistor.load_model(fl_ctx)[ModelLearnableKey.WEIGHTS]["w"], np.ones(3)
    )


async def test_log_records_are_fired_as_nvflares_analytics_events(
    fl_ctx: FLContext, tmp_path: Path
) -> None:
    from nvflare.apis.analytix import (
        ANALYTIC_EVENT_TYPE,
        AnalyticsDataType,
        LogWriterName,
        TrackConst,
    )

    executor = AgentExecutor(agent_id="a1")
    engine = fl_ctx.get_engine()
    async with running(executor, fl_ctx):
        agent = AsyncFlareAgent(str(executor.url), agent_id="a1", site_name=SITE)
        async with agent:
            options = {"writer": "MLFLOW", "global_step": 2}
            await agent.log("acc", 0.75, 2, data_type="METRIC", options=options)
            await agent.log("loss", 0.5, 3)  # a plain number: TensorBoard's scalar
            await agent.log("note", "text without a data type")  # not for NVFlare's tracking
            await agent.log("bad", "x", data_type="NOT_A_TYPE")  # refused, with a warning
            await agent.stop()  # the records are delivered before the goodbye
    fired = [
        from_shareable(data)
        for event, data in zip(engine.events, engine.event_data, strict=True)
        if event == ANALYTIC_EVENT_TYPE
    ]
    assert [dxo.data_kind for dxo in fired] == [DataKind.ANALYTIC, DataKind.ANALYTIC]
    assert [
        (
            dxo.data[TrackConst.TRACK_KEY],
            dxo.data[TrackConst.TRACK_VALUE],
            dxo.data.get(TrackConst.GLOBAL_STEP_KEY),
            dxo.get_meta_prop(TrackConst.DATA_TYPE_KEY),
            dxo.get_meta_prop(TrackConst.TRACKER_KEY),
        )
        for dxo in fired
    ] == [
        ("acc", 0.75, 2, AnalyticsDataType.METRIC, LogWriterName.MLFLOW),
        ("loss", 0.5, 3, AnalyticsDataType.SCALAR, LogWriterName.TORCH_TB),
    ]


# -- results relayed array by array ---------------------------------------------------------------


class Cells:
    """A client job's cell under the server's, in this process, as NVFlare connects them."""

    def __init__(self, server: Cell, url: str) -> None:
        self.server = server
        self.job = Cell(fqcn=f"{SITE}.{JOB}", root_url=url, **CELL_OPTIONS)
        self.job.start()

    def download(self, ref: LazyDownloadRef) -> tuple[str, dict[str, np.ndarray] | None]:
        """What NVFlare's server does with a result's references: download the arrays."""
        return download_arrays(ref.fqcn, ref.ref_id, per_request_timeout=10.0, cell=self.server)


@pytest.fixture(scope="module")
def cells(server_cell: tuple[Cell, str]) -> Iterator[Cells]:
    cells = Cells(*server_cell)
    yield cells
    cells.job.stop()


@pytest.fixture
def cell_ctx(fl_ctx: FLContext, cells: Cells) -> FLContext:
    engine = fl_ctx.get_engine()
    engine.get_cell = lambda: cells.job
    return fl_ctx


@asynccontextmanager
async def trainer_of(executor: AgentExecutor, fl_ctx: FLContext) -> AsyncIterator[AsyncFlareAgent]:
    """The executor running, and its agent connected; at most 20 s for the block."""
    async with running(executor, fl_ctx):
        agent = AsyncFlareAgent(executor.url or "", agent_id="a1", site_name=SITE)
        with anyio.fail_after(20):
            async with agent:
                yield agent


async def test_the_server_downloads_a_results_arrays_from_the_trainer_one_at_a_time(
    cell_ctx: FLContext, cells: Cells
) -> None:
    arrays = {"w": np.arange(5, dtype=np.float32), "b": np.ones((2, 2))}
    submitted: list[bool] = []
    executor = AgentExecutor(agent_id="a1")
    async with (
        trainer_of(executor, cell_ctx) as agent,
        anyio.create_task_group() as group,
    ):
        async with executing(executor, task_shareable({}), cell_ctx) as replies:
            assert await agent.get_task() is not None

            async def submit() -> None:
                submitted.append(await agent.submit_result(TaskResult({}, {**arrays, "n": 3})))

            group.start_soon(submit)
        (reply,) = replies
        assert reply.get_return_code() == ReturnCode.OK
        data = from_shareable(reply).data
        assert data["n"] == 3 and set(data) == {"w", "b", "n"}
        refs = [data["w"], data["b"]]
        assert all(isinstance(ref, LazyDownloadRef) for ref in refs)
        assert submitted == []  # the trainer waits until the server has them
        error, downloaded = await anyio.to_thread.run_sync(cells.download, refs[0])
        assert not error and downloaded is not None
        for key, ref in zip(["w", "b"], refs, strict=True):
            np.testing.assert_array_equal(downloaded[ref.item_id], arrays[key])
    assert submitted == [True]


async def test_results_without_arrays_to_relay_come_whole(cell_ctx: FLContext) -> None:
    """A result with another return code is sent as that code (the trainer's result is settled
    at once), and with ``relay_results=False`` the arrays come to the client job."""
    for executor, result in [
        (AgentExecutor(agent_id="a1"), TaskResult({}, {"w": np.ones(3)}, "EXECUTION_EXCEPTION")),
        (AgentExecutor(agent_id="a1", relay_results=False), TaskResult({}, {"w": np.ones(3)})),
    ]:
        async with (
            trainer_of(executor, cell_ctx) as agent,
            executing(executor, task_shareable({}), cell_ctx) as replies,
        ):
            assert await agent.get_task() is not None
            assert await agent.submit_result(result)
        (reply,) = replies
        assert reply.get_return_code() == result.return_code
        if result.return_code == ReturnCode.OK:
            np.testing.assert_array_equal(from_shareable(reply).data["w"], np.ones(3))


async def test_a_relayed_result_the_server_never_takes_is_settled_by_the_next_task(
    cell_ctx: FLContext,
) -> None:
    """NVFlare may drop a reply after execute() (an abort, a task the server gave up): nothing
    downloads it then, and the trainer must not wait for it past the next task."""
    submitted: list[bool] = []
    first_settled = anyio.Event()
    executor = AgentExecutor(agent_id="a1")
    async with trainer_of(executor, cell_ctx) as agent, anyio.create_task_group() as group:
        async with executing(executor, task_shareable({}, "t1"), cell_ctx) as first:
            assert await agent.get_task() is not None

            async def submit() -> None:
                submitted.append(await agent.submit_result(TaskResult({}, {"w": np.ones(3)})))
                first_settled.set()

            group.start_soon(submit)
        assert isinstance(from_shareable(first[0]).data["w"], LazyDownloadRef)
        assert submitted == []
        async with executing(executor, task_shareable({}, "t2"), cell_ctx) as second:
            assert await agent.get_task() is not None
            await first_settled.wait()
            assert submitted == [False]
            assert await agent.submit_result(TaskResult({}, {"n": 1}))
    assert from_shareable(second[0]).data == {"n": 1}


def test_a_held_result_that_comes_as_nvflare_aborts_is_released(fl_ctx: FLContext) -> None:
    released: list[tuple[bool, str]] = []

    class Site:
        def _release(self, session: object, task: object, accepted: bool, reason: str) -> None:
            released.append((accepted, reason))

    held = HeldResult.__new__(HeldResult)  # as run_task makes it, with a site that records
    held.held, held.released = ("w",), False
    held._site, held._session, held._task = Site(), None, None  # type: ignore[assignment]

    async def comes_as_cancelled() -> HeldResult:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            pass  # the abort cancels the call, and in the same instant the result arrives
        return held

    executor = AgentExecutor(agent_id="a1", abort_check_interval=0.02)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    try:
        signal = Signal()
        signal.trigger(True)
        with pytest.raises(_Aborted):
            executor._call(signal, comes_as_cancelled)
    finally:
        executor.handle_event(EventType.END_RUN, fl_ctx)
    assert released == [(False, "NVFlare aborted the task")]


# -- tasks whose arrays come from the server one at a time ----------------------------------------


class Router:
    """NVFlare's client runner, as far as the executor looks: which executor runs which task."""

    def __init__(self, **executors: object) -> None:
        self.task_router = type("TaskRouter", (), {"task_table": executors})()


def passed_through(cells: Cells, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A task's arrays as NVFlare hands them over when the cell passes tasks through:
    references to a download transaction on the server."""
    downloader = ObjectDownloader(cell=cells.server, timeout=30.0, num_receivers=1)
    item_ids = [f"T{index}" for index in range(len(arrays))]
    items = dict(zip(item_ids, arrays.values(), strict=True))
    ref_id = downloader.add_object(ArrayDownloadable(items, 2**20))
    fqcn = cells.server.get_fqcn()
    return {
        key: LazyDownloadRef(fqcn, ref_id, item_id, dots.NUMPY_DOWNLOAD)
        for key, item_id in zip(arrays, item_ids, strict=True)
    }


def test_the_cell_passes_tasks_through_only_where_every_executor_is_an_agent_executor(
    cell_ctx: FLContext, cells: Cells
) -> None:
    only_ours = AgentExecutor(agent_id="a1")
    cases = [
        (only_ours, Router(train=only_ours, validate=AgentExecutor()), True),
        (only_ours, Router(train=only_ours, validate=object()), False),
        (AgentExecutor(agent_id="a1", relay_tasks=False), None, False),
    ]
    for executor, router, passes in cases:
        cell_ctx.set_prop(FLContextKey.RUNNER, router or Router(train=executor), private=True)
        executor.handle_event(EventType.START_RUN, cell_ctx)
        try:
            assert (TASK_ROUTE in cells.job.decode_pass_through_topics) is passes
        finally:
            executor.handle_event(EventType.END_RUN, cell_ctx)
        assert TASK_ROUTE not in cells.job.decode_pass_through_topics


async def test_a_passed_through_tasks_arrays_come_from_the_server_on_to_the_trainer(
    cell_ctx: FLContext, cells: Cells
) -> None:
    arrays = {"w": np.arange(600_000, dtype=np.float32), "b": np.ones((2, 3))}  # w: 2 chunks
    executor = AgentExecutor(agent_id="a1", relay_results=False)
    async with trainer_of(executor, cell_ctx) as agent:
        shareable = task_shareable({"n": 3, **passed_through(cells, arrays)})
        async with executing(executor, shareable, cell_ctx) as replies:
            task = await agent.get_task()
            assert task is not None and list(task.data) == ["n", "w", "b"]
            for key, array in arrays.items():
                np.testing.assert_array_equal(task.data[key], array)
            assert await agent.submit_result(TaskResult({}, {"sum": float(task.data["w"].sum())}))
    (reply,) = replies
    assert reply.get_return_code() == ReturnCode.OK
    assert from_shareable(reply).data == {"sum": float(arrays["w"].sum())}


async def test_references_the_site_cannot_hand_on_one_by_one_are_downloaded_first(
    cell_ctx: FLContext, cells: Cells
) -> None:
    numpy_decomposers.register()  # as NVFlare's runtime does
    arrays = {"w": np.arange(5.0)}
    executor = AgentExecutor(agent_id="a1", relay_results=False)
    async with trainer_of(executor, cell_ctx) as agent:
        shareable = task_shareable({"model": passed_through(cells, arrays)})  # nested
        async with executing(executor, shareable, cell_ctx) as replies:
            task = await agent.get_task()
            assert task is not None
            np.testing.assert_array_equal(task.data["model"]["w"], arrays["w"])
            assert await agent.submit_result(TaskResult({}, {"n": 1}))
    assert replies[0].get_return_code() == ReturnCode.OK


@pytest.mark.parametrize("failure", ["no such download", "nvflare aborts"])
async def test_a_task_whose_arrays_do_not_download_ends_and_never_reaches_the_trainer(
    cell_ctx: FLContext, cells: Cells, failure: str
) -> None:
    executor = AgentExecutor(agent_id="a1")
    async with trainer_of(executor, cell_ctx) as agent:
        refs = passed_through(cells, {"w": np.arange(3.0)})
        signal = Signal()
        if failure == "nvflare aborts":
            signal.trigger(True)  # the download sees it before its first request
            expected = ReturnCode.TASK_ABORTED
        else:
            ref = refs["w"]
            refs = {"w": LazyDownloadRef(ref.fqcn, "no-such-transaction", "T0", ref.dot)}
            expected = ReturnCode.EXECUTION_EXCEPTION
        shareable = task_shareable({"n": 1, **refs}, "t1")
        async with executing(executor, shareable, cell_ctx, signal) as first:
            pass
        assert first[0].get_return_code() == expected
        async with executing(executor, task_shareable({"n": 2}, "t2"), cell_ctx):
            task = await agent.get_task()  # the first never reached the trainer
            assert task is not None and task.task_id == "t2"
            assert await agent.submit_result(TaskResult({}, {"n": 2}))


async def test_the_cell_passes_the_next_task_through_only_after_a_large_one(
    cell_ctx: FLContext, cells: Cells
) -> None:
    executor = AgentExecutor(agent_id="a1", relay_results=False)
    cell_ctx.set_prop(FLContextKey.RUNNER, Router(train=executor), private=True)
    large = np.zeros(PASS_THROUGH_MIN_BYTES // 8, dtype=np.float64)
    tasks = [
        ({"w": large[:8]}, False),  # small: a round trip to the server saves nothing
        ({"w": large}, True),
        (passed_through(cells, {"w": large[:8]}), False),
        (passed_through(cells, {"w": large}), True),
    ]
    async with trainer_of(executor, cell_ctx) as agent:
        assert TASK_ROUTE in cells.job.decode_pass_through_topics  # the first task, unseen
        for index, (data, passes) in enumerate(tasks):
            async with executing(executor, task_shareable(data, f"t{index}"), cell_ctx) as replies:
                task = await agent.get_task()
                assert task is not None and task.data["w"].nbytes in (64, large.nbytes)
                assert await agent.submit_result(TaskResult({}, {"n": index}))
            assert replies[0].get_return_code() == ReturnCode.OK
            assert (TASK_ROUTE in cells.job.decode_pass_through_topics) is passes, index
    assert TASK_ROUTE not in cells.job.decode_pass_through_topics
