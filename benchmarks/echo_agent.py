"""The job scenario's trainer for setup C: a `SyncFlareAgent` returning each task's data
unchanged. `AgentExecutor` launches it with the site's URL, its agent id and the site's name in
its environment."""

import os

from flare_agent_async import SyncFlareAgent, TaskResult

with SyncFlareAgent(
    os.environ["FLARE_AGENT_URL"],
    agent_id=os.environ["FLARE_AGENT_ID"],
    site_name=os.environ["FLARE_AGENT_SITE_NAME"],
) as agent:
    for task in agent.tasks():
        agent.submit_result(TaskResult({"NUM_STEPS_CURRENT_ROUND": 1}, task.data))
        # Let go of the task before asking for the next one, as every trainer of the scenario
        # does: the trainer's peak RSS is then the library's, not this loop variable's.
        del task
