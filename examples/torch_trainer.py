"""A PyTorch trainer for the demo's FedAvg job (needs torch: pip install torch).

The site sends numpy arrays; torch.from_numpy shares their memory, so nothing is copied on the
way in, and tensors can be sent back as they are (they travel as arrays).

    flare-agent-async site --listen tcp://127.0.0.1:8002 --agents agent-1 --rounds 5
    python examples/torch_trainer.py tcp://127.0.0.1:8002 agent-1
"""

import sys

import torch

from flare_agent_async import SyncFlareAgent, TaskResult
from flare_agent_async.demo import agent_data


def train(weights: dict, x: torch.Tensor, y: torch.Tensor, aborted, steps: int = 20) -> dict | None:
    w = torch.from_numpy(weights["W"]).clone().requires_grad_()
    b = torch.from_numpy(weights["b"]).clone().requires_grad_()
    optimizer = torch.optim.SGD([w, b], lr=0.5)
    for _ in range(steps):
        if aborted():
            return None
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y)
        loss.backward()
        optimizer.step()
    return {**weights, "W": w.detach().numpy(), "b": b.detach().numpy()}


def main(url: str, agent_id: str) -> None:
    with SyncFlareAgent(url, agent_id=agent_id, site_name="site-1") as agent:
        for task in agent.tasks():
            x, y = agent_data(task.meta["seed"], task.meta["agent_index"])
            weights = train(
                task.data, torch.from_numpy(x), torch.from_numpy(y), lambda task=task: task.aborted
            )
            if weights is not None:
                agent.submit_result(TaskResult({"samples": len(y)}, weights))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
