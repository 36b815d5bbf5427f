"""Our agent over ``nvflare-ipc://`` against NVFlare's real cell network, in one process.

A test cell plays NVFlare's IPCExchanger: it pushes tasks, aborts and the goodbye on channel
``flare_agent`` and answers results, as the exchanger does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

from conftest import CELL_OPTIONS
from nvflare.fuel.f3.cellnet.cell import Cell
from nvflare.fuel.f3.cellnet.cell import Message as CellMessage
from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey, ReturnCode
from nvflare.fuel.f3.cellnet.utils import make_reply

from flare_agent_async import AgentClosed, AsyncFlareAgent, TaskResult

pytestmark = pytest.mark.anyio

SITE = "site-cells"


class Exchanger:
    """The exchanger's side: a job cell under a root cell, both in this process."""

    def __init__(self, root: Cell, url: str) -> None:
        self.agent_url = url.replace("tcp://", "nvflare-ipc://")
        self.root = root
        self.job = Cell(fqcn=f"{SITE}.job", root_url=url, **CELL_OPTIONS)
        self.results: list[CellMessage] = []
        self.accept_results = True
        self.job.register_request_cb(channel="flare_agent", topic="submit_result", cb=self._result)
        self.job.start()

    def _result(self, request: CellMessage) -> CellMessage:
        self.results.append(request)
        return make_reply(ReturnCode.OK if self.accept_results else ReturnCode.INVALID_REQUEST)

    async def send(self, agent_id: str, topic: str, message: CellMessage | None = None) -> str:
        """Send a request to the agent's cell as the exchanger does; the reply's return code."""

        def send() -> str:
            reply = self.job.send_request(
                channel="flare_agent",
                topic=topic,
                target=f"{SITE}.-{agent_id}",
                request=message or CellMessage(),
                timeout=5.0,
            )
            return str(reply.get_header(MessageHeaderKey.RETURN_CODE))

        return await anyio.to_thread.run_sync(send)

    async def wait_for(self, agent_id: str) -> None:
        """Heartbeat the agent until it answers, as the exchanger does before sending tasks."""
        for _ in range(50):
            if await self.send(agent_id, "heartbeat") == ReturnCode.OK:
                return
        raise AssertionError(f"agent {agent_id} never answered a heartbeat")

    async def task(self, agent_id: str, task_id: str, data: Any) -> str:
        message = CellMessage(
            headers={"task_id": task_id, "task_name": "train"},
            payload={"data": data, "meta": {"data_kind": "WEIGHTS", "current_round": 0}},
        )
        return await self.send(agent_id, "get_task", message)

    async def abort(self, agent_id: str, task_id: str) -> str:
        message = CellMessage(headers={"task_id": task_id, "task_name": "train"})
        return await self.send(agent_id, "abort", message)


@pytest.fixture(scope="module")
def exchanger(server_cell: tuple[Cell, str]) -> Iterator[Exchanger]:
    exchanger = Exchanger(*server_cell)
    yield exchanger
    exchanger.job.stop()


async def test_tasks_results_and_the_goodbye_cross_nvflare_cells(
    exchanger: Exchanger, anyio_backend: str
) -> None:
    agent_id = f"results-{anyio_backend}"
    with anyio.fail_after(30):
        async with AsyncFlareAgent(exchanger.agent_url, agent_id=agent_id, site_name=SITE) as agent:
            await exchanger.wait_for(agent_id)
            assert await exchanger.task(agent_id, "t1", {"w": np.ones(2)}) == ReturnCode.OK
            task = await agent.get_task()
            assert task is not None and task.task_id == "t1"
            assert task.meta == {"data_kind": "WEIGHTS", "current_round": 0}
            assert await agent.submit_result(TaskResult({"n": 1}, {"w": task.data["w"] + 1}))
            result = exchanger.results[-1]
            assert result.get_header("task_id") == "t1" and result.get_header("rc") == "OK"
            assert result.payload["meta"] == {"n": 1}
            np.testing.assert_array_equal(result.payload["data"]["w"], [2.0, 2.0])

            exchanger.accept_results = False
            try:
                assert await exchanger.task(agent_id, "t2", {"w": np.ones(2)}) == ReturnCode.OK
                task = await agent.get_task()
                assert task is not None and task.task_id == "t2"
                assert not await agent.submit_result(TaskResult({}, task.data))  # refused
            finally:
                exchanger.accept_results = True

            assert await exchanger.send(agent_id, "bye") == ReturnCode.OK
            with pytest.raises(AgentClosed):
                await agent.get_task()


async def test_an_abort_before_the_fetch_does_not_wedge_the_agent(
    exchanger: Exchanger, anyio_backend: str
) -> None:
    agent_id = f"aborts-{anyio_backend}"
    with anyio.fail_after(30):
        async with AsyncFlareAgent(exchanger.agent_url, agent_id=agent_id, site_name=SITE) as agent:
            await exchanger.wait_for(agent_id)
            assert await exchanger.task(agent_id, "t1", {"w": np.zeros(1)}) == ReturnCode.OK
            assert await exchanger.abort(agent_id, "t1") == ReturnCode.OK
            assert await exchanger.task(agent_id, "t2", {"w": np.zeros(1)}) == ReturnCode.OK
            task = await agent.get_task()
            assert task is not None
            if task.task_id == "t1":  # fetched before its abort was read
                await task.wait_aborted()
                assert not await agent.submit_result(TaskResult({}, task.data))
                task = await agent.get_task()
            assert task is not None and task.task_id == "t2"
            assert await agent.submit_result(TaskResult({}, task.data))
            assert exchanger.results[-1].get_header("task_id") == "t2"
