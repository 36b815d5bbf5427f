"""A trainer for the NVFlare tests: adds 1 to every weight of every task until the site says bye.

``python trainer.py URL SITE_NAME AGENT_ID MODE OUT_DIR``: MODE is ``async`` (an
`AsyncFlareAgent`), ``sync`` (a `SyncFlareAgent`) or ``auto`` (async on ``site-1``, sync
elsewhere). On a clean exit it writes how many tasks it ran to ``OUT_DIR/<site name>.done``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio

from flare_agent_async import AgentClosed, AsyncFlareAgent, SyncFlareAgent, TaskResult

META = {"NUM_STEPS_CURRENT_ROUND": 1}


def add_one(data: dict[str, Any]) -> dict[str, Any]:
    return {name: value + 1 for name, value in data.items()}


async def run_async(url: str, site_name: str, agent_id: str) -> int:
    done = 0
    async with AsyncFlareAgent(url, agent_id=agent_id, site_name=site_name) as agent:
        async for task in agent.tasks():
            done += await agent.submit_result(TaskResult(META, add_one(task.data)))
    return done


def run_sync(url: str, site_name: str, agent_id: str) -> int:
    done = 0
    agent = SyncFlareAgent(url, agent_id=agent_id, site_name=site_name)
    agent.start()
    try:
        for _ in range(1000):
            try:
                task = agent.get_task(timeout=120)
            except AgentClosed:
                return done
            if task is None:
                raise SystemExit("no task for 120 s")
            done += agent.submit_result(TaskResult(META, add_one(task.data)))
        raise SystemExit("more than 1000 tasks")
    finally:
        agent.stop()


def main() -> None:
    url, site_name, agent_id, mode, out_dir = sys.argv[1:6]
    if mode == "auto":
        mode = "async" if site_name.endswith("1") else "sync"
    if mode == "async":
        done = anyio.run(run_async, url, site_name, agent_id)
    else:
        done = run_sync(url, site_name, agent_id)
    Path(out_dir, f"{site_name}.done").write_text(f"{mode} {done}")


if __name__ == "__main__":
    main()
