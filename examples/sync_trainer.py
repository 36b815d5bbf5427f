"""A synchronous trainer, a plain blocking loop, for the demo's FedAvg job.

Start a site, then this agent (and others, with other ids) in other terminals:

    flare-agent-async site --listen tcp://127.0.0.1:8002 --agents agent-1 --rounds 5
    python examples/sync_trainer.py tcp://127.0.0.1:8002 agent-1
"""

import sys

from flare_agent_async import SyncFlareAgent, TaskResult
from flare_agent_async.demo import agent_data, evaluate, train_locally


def main(url: str, agent_id: str) -> None:
    with SyncFlareAgent(url, agent_id=agent_id, site_name="site-1") as agent:
        for task in agent.tasks():  # until the site says goodbye
            x, y = agent_data(task.meta["seed"], task.meta["agent_index"])
            weights = train_locally(task.data, x, y, 20, lambda task=task: task.aborted)
            if weights is None:
                continue  # aborted by the site: no result wanted
            accuracy, _ = evaluate(weights, x, y)
            agent.submit_result(
                TaskResult({"samples": len(y), "local_accuracy": accuracy}, weights)
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
