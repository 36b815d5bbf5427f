"""The demo's federated job: multinomial logistic regression, trained with FedAvg.

Every agent makes its own synthetic data from the seed and its index (the site sends both in the
task's meta): features drawn around an agent-specific centre and labels skewed towards a few
classes, so no agent's data looks like another's (non-IID). Each round the site sends the global
weights, each agent takes some gradient steps on its data and returns its weights, its sample
count and metrics, and the site averages the weights, weighted by samples. A held-out set drawn
from all agents' distributions measures the global model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from .defs import RC, MetaKey, Task, TaskResult
from .exceptions import TaskAborted
from .site import FlareSite

FEATURES = 20
CLASSES = 5
SAMPLES_PER_AGENT = 400
LOCAL_STEPS = 20
LEARNING_RATE = 0.5

Weights = dict[str, np.ndarray]


def _truth(seed: int) -> np.ndarray:
    truth: np.ndarray = np.random.default_rng(seed).normal(0, 1.5, (FEATURES, CLASSES))
    return truth


def agent_data(
    seed: int, index: int, count: int = SAMPLES_PER_AGENT
) -> tuple[np.ndarray, np.ndarray]:
    """The samples and labels of agent ``index``: shifted features, skewed labels."""
    rng = np.random.default_rng([seed, index])
    centre = rng.normal(0, 1.0, FEATURES)
    x = rng.normal(centre, 1.0, (count * 3, FEATURES)).astype(np.float32)
    y = _labels(x, seed, rng)
    favoured = {index % CLASSES, (index + 1) % CLASSES}  # keep most samples of two classes
    keep = np.array([label in favoured or rng.random() < 0.2 for label in y])
    return x[keep][:count], y[keep][:count]


def held_out(seed: int, agents: int, count: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Samples drawn from every agent's feature distribution, labels unskewed."""
    rng = np.random.default_rng([seed, 10_000])
    centres = [np.random.default_rng([seed, n]).normal(0, 1.0, FEATURES) for n in range(agents)]
    x = np.concatenate([rng.normal(c, 1.0, (count // agents, FEATURES)) for c in centres]).astype(
        np.float32
    )
    return x, _labels(x, seed, rng)


def _labels(x: np.ndarray, seed: int, rng: np.random.Generator) -> np.ndarray:
    logits = x @ _truth(seed)
    probabilities = _softmax(logits)
    return np.array([rng.choice(CLASSES, p=p) for p in probabilities])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    normalized: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return normalized


def initial_weights(padding_mib: float = 0.0) -> Weights:
    """Zero weights; ``padding_mib`` adds an array of that size that rides along unchanged."""
    weights = {
        "W": np.zeros((FEATURES, CLASSES), dtype=np.float32),
        "b": np.zeros(CLASSES, dtype=np.float32),
    }
    if padding_mib:
        weights["padding"] = np.zeros(int(padding_mib * 2**20) // 4, dtype=np.float32)
    return weights


def evaluate(weights: Weights, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and cross-entropy loss of the model on ``(x, y)``."""
    probabilities = _softmax(x @ weights["W"] + weights["b"])
    loss = float(-np.log(probabilities[np.arange(len(y)), y] + 1e-12).mean())
    return float((probabilities.argmax(axis=1) == y).mean()), loss


def train_locally(
    weights: Weights, x: np.ndarray, y: np.ndarray, steps: int, aborted: Callable[[], bool]
) -> Weights | None:
    """Gradient steps on the local data; None if the task was aborted meanwhile."""
    w, b = weights["W"].copy(), weights["b"].copy()
    onehot = np.eye(CLASSES, dtype=np.float32)[y]
    for _ in range(steps):
        if aborted():  # checked between steps: an abort stops the work
            return None
        error = _softmax(x @ w + b) - onehot
        w -= LEARNING_RATE * (x.T @ error) / len(y)
        b -= LEARNING_RATE * error.mean(axis=0)
    return {**weights, "W": w.astype(np.float32), "b": b.astype(np.float32)}


def train(task: Task) -> TaskResult:
    """The demo's trainer (``flare_agent_async.demo:train``): one round of local training."""
    seed, index = int(task.meta["seed"]), int(task.meta["agent_index"])
    x, y = agent_data(seed, index)
    if task.meta.get("slow"):
        time.sleep(float(task.meta["slow"]))  # a long round, for the abort demonstration
    weights = train_locally(
        task.data, x, y, int(task.meta.get("steps", LOCAL_STEPS)), lambda: task.aborted
    )
    if weights is None:
        return TaskResult({"aborted": True}, None, RC.EXECUTION_EXCEPTION)
    accuracy, loss = evaluate(weights, x, y)
    meta = {"samples": len(y), "local_accuracy": accuracy, "local_loss": loss}
    return TaskResult(meta, weights)


@dataclass
class Round:
    """One round of the job, as the site saw it."""

    number: int
    accuracy: float
    loss: float
    seconds: float
    results: int
    aborted: list[str] = field(default_factory=list)
    bytes_moved: int = 0
    task_seconds: list[float] = field(default_factory=list)


def _nbytes(weights: Weights) -> int:
    return sum(array.nbytes for array in weights.values())


async def run_fedavg(
    site: FlareSite,
    agent_ids: list[str],
    *,
    rounds: int,
    seed: int = 0,
    model_mb: float = 0.0,
    abort_round: int | None = None,
    on_event: Callable[[str, dict[str, Any]], object] = lambda *_: None,
) -> tuple[list[Round], Weights]:
    """Run FedAvg on connected agents; ``on_event(kind, details)`` reports progress.

    In round ``abort_round`` (if any) the first agent's task is made slow and aborted by the
    site: the round goes on with the others.
    """
    weights = initial_weights(model_mb)
    x_test, y_test = held_out(seed, len(agent_ids))
    history: list[Round] = []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        results: dict[str, TaskResult] = {}
        timings: list[float] = []
        aborted: list[str] = []
        on_event("round", {"round": number, "rounds": rounds})

        async def run(
            index: int, agent_id: str, weights: Weights = weights, number: int = number
        ) -> None:
            meta: dict[str, Any] = {
                MetaKey.CURRENT_ROUND: number,
                MetaKey.TOTAL_ROUND: rounds,
                "seed": seed,
                "agent_index": index,
            }
            if abort_round == number and index == 0:
                meta["slow"] = 0.5  # a long round for the first agent, which the site aborts
            on_event("sent", {"agent": agent_id, "round": number})
            sent = time.perf_counter()
            try:
                result = await site.run_task(
                    agent_id, "train", weights, meta, task_id=f"round-{number}-{agent_id}"
                )
            except TaskAborted:
                aborted.append(agent_id)  # noqa: B023 - used within this round only
                on_event("aborted", {"agent": agent_id, "round": number})
                return
            timings.append(time.perf_counter() - sent)  # noqa: B023
            if result.return_code != RC.OK:
                on_event("failed", {"agent": agent_id, "round": number, "meta": result.meta})
                return
            results[agent_id] = result  # noqa: B023
            on_event("done", {"agent": agent_id, "round": number, "meta": result.meta})

        async def abort_soon(agent_id: str, number: int = number) -> None:
            await anyio.sleep(0.1)  # the trainer is at work by now
            await site.abort_task(agent_id, f"round-{number}-{agent_id}")

        async with anyio.create_task_group() as group:
            for index, agent_id in enumerate(agent_ids):
                group.start_soon(run, index, agent_id)
            if abort_round == number:
                group.start_soon(abort_soon, agent_ids[0])
        if results:
            total = sum(result.meta["samples"] for result in results.values())
            weights = {
                name: sum(
                    r.data[name] * (r.meta["samples"] / total) for r in results.values()
                ).astype(np.float32)
                for name in weights
            }
        accuracy, loss = evaluate(weights, x_test, y_test)
        moved = _nbytes(weights) * (len(results) + len(agent_ids))
        history.append(
            Round(
                number,
                accuracy,
                loss,
                time.perf_counter() - started,
                len(results),
                aborted,
                moved,
                timings,
            )
        )
        on_event("aggregated", {"round": number, "accuracy": accuracy, "loss": loss})
    return history, weights
