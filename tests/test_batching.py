"""Messages that become ready together leave together: fewer system calls and wake-ups per task."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from flare_agent_async import AsyncFlareAgent, FlareSite, TaskResult
from flare_agent_async.protocol import Message, ResultAck, TaskAssign
from flare_agent_async.transports import FramedMessageStream

pytestmark = pytest.mark.anyio


async def test_a_result_ack_leaves_with_the_next_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """A site that sends the next task as soon as a result is in sends it in the same system call
    as the result's acknowledgement: the writer lets the woken tasks queue theirs first."""
    batches: list[list[type]] = []
    send_batch = FramedMessageStream.send_batch

    async def recording(self: FramedMessageStream, items: Sequence[Message]) -> None:
        if any(isinstance(item, ResultAck) for item in items):
            batches.append([type(item) for item in items])
        await send_batch(self, items)

    monkeypatch.setattr(FramedMessageStream, "send_batch", recording)
    tasks = 20
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group, FlareSite("site-1") as site:
            url = await site.listen("tcp://127.0.0.1:0")

            async def trainer() -> None:
                async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
                    async for task in agent.tasks():
                        await agent.submit_result(TaskResult({}, task.data))

            group.start_soon(trainer)
            await site.wait_for_agent("a1", timeout=10)
            for n in range(tasks):
                await site.run_task("a1", "ping", n)
    together = sum(TaskAssign in batch for batch in batches)
    assert len(batches) == tasks
    assert together >= tasks - 2, batches  # all but the last (and a straggler at most)
