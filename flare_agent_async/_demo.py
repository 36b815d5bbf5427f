"""A small federated run in one process: a site, a few agents, FedAvg of a linear model.

Each agent holds its own noisy samples of ``y = 3x + 2`` over a different range of x (the data
is not identically distributed); each round the site sends the global weights, every agent takes a
few gradient steps on its own data and returns its weights and sample count, and the site
averages them, weighted by samples. The loss on held-out data falls round after round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from .agent import AsyncFlareAgent
from .defs import MetaKey, TaskResult
from .site import FlareSite

Samples = list[tuple[float, float]]


def _samples(rng: random.Random, count: int, low: float, high: float) -> Samples:
    return [
        (x, 3 * x + 2 + rng.gauss(0, 0.1)) for x in (rng.uniform(low, high) for _ in range(count))
    ]


def _loss(weights: dict[str, float], samples: Samples) -> float:
    w, b = weights["w"], weights["b"]
    return sum((w * x + b - y) ** 2 for x, y in samples) / len(samples)


def _train(
    weights: dict[str, float], samples: Samples, steps: int, rate: float
) -> dict[str, float]:
    w, b = weights["w"], weights["b"]
    for _ in range(steps):
        dw = sum(2 * (w * x + b - y) * x for x, y in samples) / len(samples)
        db = sum(2 * (w * x + b - y) for x, y in samples) / len(samples)
        w, b = w - rate * dw, b - rate * db
    return {"w": w, "b": b}


@dataclass
class DemoReport:
    """What the demo measured, round by round."""

    losses: list[float] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)


async def run_demo(
    *,
    agents: int = 4,
    rounds: int = 5,
    seed: int = 0,
    on_round: Callable[[int, float, float], object] = lambda *_: None,
) -> DemoReport:
    """Run the federated demo; ``on_round(round, loss, seconds)`` is called after each round."""
    rng = random.Random(seed)
    data = {f"agent-{n}": _samples(rng, 50, n, n + 1.0) for n in range(agents)}
    held_out = _samples(rng, 200, 0, agents)
    report = DemoReport(weights={"w": 0.0, "b": 0.0})

    async def trainer(agent_id: str, url: str) -> None:
        async with AsyncFlareAgent(url, agent_id=agent_id, site_name="demo-site") as agent:
            async for task in agent.tasks():
                weights = _train(task.data, data[agent_id], steps=10, rate=0.01)
                meta = {"samples": len(data[agent_id])}
                await agent.submit_result(TaskResult(meta, weights))

    async with anyio.create_task_group() as group, FlareSite("demo-site") as site:
        url = await site.listen("memory://")
        for agent_id in data:
            group.start_soon(trainer, agent_id, url)
        for agent_id in data:
            await site.wait_for_agent(agent_id, timeout=10)
        for round_number in range(rounds):
            started = time.perf_counter()
            meta = {MetaKey.CURRENT_ROUND: round_number, MetaKey.TOTAL_ROUND: rounds}
            results: dict[str, TaskResult] = {}

            async def run(agent_id: str, meta: dict[str, int], into: dict[str, TaskResult]) -> None:
                into[agent_id] = await site.run_task(agent_id, "train", report.weights, meta)

            async with anyio.create_task_group() as round_group:
                for agent_id in data:
                    round_group.start_soon(run, agent_id, meta, results)
            total = sum(result.meta["samples"] for result in results.values())
            report.weights = {
                key: sum(r.data[key] * r.meta["samples"] for r in results.values()) / total
                for key in ("w", "b")
            }
            seconds = time.perf_counter() - started
            report.losses.append(_loss(report.weights, held_out))
            report.round_seconds.append(seconds)
            on_round(round_number, report.losses[-1], seconds)
    return report
