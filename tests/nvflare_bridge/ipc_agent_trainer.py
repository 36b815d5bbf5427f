"""The tests' trainer on NVFlare's own IPCAgent, for comparison: adds 1 to every weight.

``python ipc_agent_trainer.py CELL_URL SITE_NAME AGENT_ID WORK_DIR``
"""

from __future__ import annotations

import sys

from nvflare.client.ipc.defs import AgentClosed, TaskResult
from nvflare.client.ipc.ipc_agent import IPCAgent


def main() -> None:
    url, site_name, agent_id, work_dir = sys.argv[1:5]
    agent = IPCAgent(
        flare_site_url=url, flare_site_name=site_name, agent_id=agent_id, workspace_dir=work_dir
    )
    agent.start()
    try:
        for _ in range(1000):
            try:
                task = agent.get_task(timeout=120)
            except AgentClosed:
                return
            if task is None:
                raise SystemExit("no task for 120 s")
            data = {name: value + 1 for name, value in task.data.items()}
            agent.submit_result(TaskResult({"NUM_STEPS_CURRENT_ROUND": 1}, data))
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
