"""A site or an agent in a process of its own, for the scenarios that kill, stop or restart one.

    peer_process.py agent URL AGENT_ID BACKEND hang|echo
        prints "ready" once welcomed, then "task <task_id> <checksum>" for every task; ``echo``
        answers with the task's data, ``hang`` never answers (the test kills it mid-task).
    peer_process.py site URL BACKEND
        waits for a line "go" on stdin, listens at URL, prints "listening", waits for agent a1,
        runs one task on it, prints "done <checksum of the result>", then serves until killed.

It speaks on stdout only, one line per event, so the test can wait for exactly what it needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).parent))

from reliability_helpers import checksum

from flare_agent_async import AsyncFlareAgent, FlareSite, TaskResult


def say(line: str) -> None:
    print(line, flush=True)


async def agent(url: str, agent_id: str, behaviour: str) -> None:
    async with AsyncFlareAgent(
        url, agent_id=agent_id, site_name="site-1", reconnect_timeout=5
    ) as flare_agent:
        say("ready")
        async for task in flare_agent.tasks():
            say(f"task {task.task_id} {checksum(task.data)}")
            if behaviour == "hang":
                await anyio.sleep_forever()
            result = TaskResult({"checksum": checksum(task.data)}, task.data)
            await flare_agent.submit_result(result)


async def site(url: str) -> None:
    await anyio.to_thread.run_sync(sys.stdin.readline)  # "go": everything is imported by now
    async with FlareSite("site-1", heartbeat_interval=0.1, heartbeat_timeout=1) as flare_site:
        await flare_site.listen(url)
        say("listening")
        await flare_site.wait_for_agent("a1", timeout=20)
        result = await flare_site.run_task("a1", "train", {"x": list(range(10))}, timeout=20)
        say(f"done {checksum(result.data)}")
        await anyio.sleep_forever()


def main() -> None:
    role, url, *rest = sys.argv[1:]
    if role == "agent":
        agent_id, backend, behaviour = rest
        anyio.run(agent, url, agent_id, behaviour, backend=backend)
    else:
        (backend,) = rest
        anyio.run(site, url, backend=backend)


if __name__ == "__main__":
    main()
