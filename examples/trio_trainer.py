"""A trio trainer for the demo's FedAvg job: the agent is trio-native (anyio runs on trio).

Start a site, then this agent (and others, with other ids) in other terminals:

    flare-agent-async site --listen tcp://127.0.0.1:8002 --agents agent-1 --rounds 5 --backend trio
    python examples/trio_trainer.py tcp://127.0.0.1:8002 agent-1
"""

import sys

import trio

from flare_agent_async import RC, AsyncFlareAgent, TaskResult
from flare_agent_async.demo import agent_data, evaluate, train_locally


async def main(url: str, agent_id: str) -> None:
    async with AsyncFlareAgent(url, agent_id=agent_id, site_name="site-1") as agent:
        async for task in agent.tasks():  # until the site says goodbye
            x, y = agent_data(task.meta["seed"], task.meta["agent_index"])
            with trio.move_on_after(60) as too_long:  # a trio cancel scope bounds the work
                weights = await trio.to_thread.run_sync(
                    train_locally, task.data, x, y, 20, lambda task=task: task.aborted
                )
            if too_long.cancelled_caught:
                await agent.submit_result(
                    TaskResult({"error": "too long"}, None, RC.EXECUTION_EXCEPTION)
                )
                continue
            if weights is None:
                continue  # aborted by the site: no result wanted
            accuracy, _ = evaluate(weights, x, y)
            await agent.submit_result(
                TaskResult({"samples": len(y), "local_accuracy": accuracy}, weights)
            )


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
