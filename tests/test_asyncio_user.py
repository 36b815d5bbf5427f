"""What a plain asyncio user does: the agent awaited on their own loop, with asyncio's tools."""

from __future__ import annotations

import asyncio

import pytest

from flare_agent_async import AsyncFlareAgent, FlareSite, TaskResult

pytestmark = pytest.mark.asyncio


async def test_an_asyncio_trainer_with_create_task_and_gather() -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")

        async def trainer() -> int:
            trained = 0
            async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
                async for task in agent.tasks():
                    await asyncio.sleep(0)  # the training step
                    trained += 1
                    await agent.submit_result(TaskResult({}, {"w": task.data["w"] + 1}))
            return trained

        training = asyncio.create_task(trainer())
        await site.wait_for_agent("a1", timeout=5)
        weights = 0
        for _ in range(5):
            weights = (await site.run_task("a1", "train", {"w": weights})).data["w"]
        assert weights == 5
    assert await asyncio.wait_for(training, 5) == 5


async def test_asyncio_wait_for_timeout_on_get_task_loses_no_task() -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(agent.get_task(), 0.01)
            running = asyncio.create_task(site.run_task("a1", "train", 1))
            task = await asyncio.wait_for(agent.get_task(), 5)
            assert task is not None and task.data == 1
            assert await agent.submit_result(TaskResult({}, {"ok": 1}))
            assert (await running).data == {"ok": 1}


async def test_cancelling_an_asyncio_task_that_awaits_get_task() -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("memory://")
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
            waiting = asyncio.create_task(agent.get_task())
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            running = asyncio.create_task(site.run_task("a1", "train", 2))
            task = await agent.get_task(timeout=5)
            assert task is not None and task.data == 2
            await agent.submit_result(TaskResult({}, {"ok": 2}))
            assert (await running).data == {"ok": 2}
