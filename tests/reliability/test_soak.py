"""Soak: many agents, many tasks, random faults from a fixed seed; nothing lost, nothing twice.

The suite runs a bounded soak. ``FLARE_AGENT_ASYNC_SOAK=20`` runs twenty times as many tasks per
agent, and over TCP as many agents as over memory; with ``FLARE_AGENT_ASYNC_REPORT=file.jsonl`` the
figures are written down::

    FLARE_AGENT_ASYNC_SOAK=20 FLARE_AGENT_ASYNC_REPORT=soak.jsonl pytest tests/reliability -k soak
"""

from __future__ import annotations

import os
import resource
from collections import Counter

import anyio
import pytest
from reliability_helpers import Ledger, echo_trainer, report

from flare_agent_async import AsyncFlareAgent, FlareSite
from flare_agent_async.testing import FaultyConnector

pytestmark = pytest.mark.anyio

SOAK = int(os.environ.get("FLARE_AGENT_ASYNC_SOAK", "0"))
FAULT_PROBABILITY = 0.02
"""Per message, each way: about one task in twelve meets a fault."""

SHAPES = {  # transport: (agents, tasks per agent)
    "memory": (200, 50 * max(SOAK, 1)),
    "tcp": (200, 50 * SOAK) if SOAK else (200, 10),
}


@pytest.mark.parametrize("transport", sorted(SHAPES))
async def test_soak_with_random_faults_loses_and_duplicates_nothing(
    transport: str, anyio_backend: str
) -> None:
    agents, tasks = SHAPES[transport]
    ledger, seen = Ledger(), Counter[tuple[str, str]]()
    connectors: list[FaultyConnector] = []
    start = anyio.current_time()
    async with FlareSite("site-1", reconnect_timeout=30) as site:
        url = await site.listen("memory://" if transport == "memory" else "tcp://127.0.0.1:0")

        async def agent(index: int) -> None:
            faulty = FaultyConnector(url)
            faulty.inject_randomly(FAULT_PROBABILITY, seed=index)
            connectors.append(faulty)
            agent_id = f"a{index}"
            counts = Counter[str]()
            try:
                async with (
                    AsyncFlareAgent(faulty, agent_id=agent_id, site_name="site-1") as flare_agent,
                    anyio.create_task_group() as group,
                ):
                    group.start_soon(echo_trainer, flare_agent, counts)
                    await site.wait_for_agent(agent_id, timeout=30)
                    for number in range(tasks):
                        await ledger.run(site, agent_id, f"t{number}", {"n": number, "a": index})
                    group.cancel_scope.cancel()
            finally:
                seen.update({(agent_id, task_id): count for task_id, count in counts.items()})

        with anyio.fail_after(60 + 20 * SOAK * (2 if transport == "tcp" else 1)):
            async with anyio.create_task_group() as group:
                for index in range(agents):
                    group.start_soon(agent, index)
    seconds = anyio.current_time() - start
    faults = sum((connector.faults for connector in connectors), Counter[str]())
    ledger.check(seen)
    assert len(ledger.sent) == agents * tasks
    assert sum(faults.values()) > 0, "no fault was injected"
    report(
        f"soak over {transport} on {anyio_backend}",
        agents=agents,
        tasks_completed=sum(ledger.results.values()),
        faults_injected=sum(faults.values()),
        faults=dict(faults),
        reconnects=sum(connector.connections - 1 for connector in connectors),
        results_lost=ledger.lost,
        results_duplicated=ledger.duplicated,
        seconds=round(seconds, 1),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    )
