"""flare_agent_async.testing: the helpers users test their trainers with."""

from __future__ import annotations

import pytest

from flare_agent_async import RC, AsyncFlareAgent, TaskResult
from flare_agent_async.testing import run_trainer, site_and_agent

pytestmark = pytest.mark.anyio


async def test_run_trainer_runs_the_script_and_returns_results_in_order() -> None:
    async def trainer(agent: AsyncFlareAgent) -> None:
        async for task in agent.tasks():
            scale = task.meta.get("scale", 1)
            await agent.submit_result(TaskResult({"name": task.task_name}, task.data * scale))

    results = await run_trainer(trainer, [("a", 1), ("b", 2, {"scale": 10}), ("c", 3)])
    assert [(r.meta["name"], r.data, r.return_code) for r in results] == [
        ("a", 1, RC.OK),
        ("b", 20, RC.OK),
        ("c", 3, RC.OK),
    ]


async def test_run_trainer_propagates_the_trainers_exception() -> None:
    async def trainer(agent: AsyncFlareAgent) -> None:
        await agent.get_task()
        raise RuntimeError("trainer broke")

    with pytest.raises(BaseExceptionGroup) as info:
        await run_trainer(trainer, [("a", 1)])
    assert info.group_contains(RuntimeError, match="trainer broke")


async def test_site_and_agent_connects_them() -> None:
    async with site_and_agent(agent_id="x", site_name="s", job_id="j") as (site, agent):
        assert site.agents == frozenset({"x"})
        assert agent.connected and agent.agent_id == "x"
