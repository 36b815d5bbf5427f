"""The environment a launched trainer finds: where its site is and who it is.

`flare_agent_async.nvflare.AgentExecutor` sets these for the trainer it launches;
`flare_agent_async.client.init` reads them.
"""

from __future__ import annotations

__all__ = [
    "CLIENT_SETTINGS",
    "ENV_AGENT_ID",
    "ENV_CLIENT_CONFIG",
    "ENV_JOB_ID",
    "ENV_SECRET",
    "ENV_SITE_NAME",
    "ENV_URL",
]

ENV_URL = "FLARE_AGENT_URL"
"""The site's URL (``tcp://127.0.0.1:port``, ``tls://...``)."""
ENV_SITE_NAME = "FLARE_AGENT_SITE_NAME"
"""The site's name, which the agent must ask for."""
ENV_AGENT_ID = "FLARE_AGENT_ID"
"""The agent's id."""
ENV_JOB_ID = "FLARE_AGENT_JOB_ID"
"""The job's id."""
ENV_SECRET = "FLARE_AGENT_SECRET"
"""A secret shared with the site, when it requires one."""
ENV_CLIENT_CONFIG = "FLARE_AGENT_CLIENT_CONFIG"
"""Settings for a Client API trainer, as a JSON object: ``train_task_name``, ``eval_task_name``,
``submit_model_task_name``, ``transfer_type``, ``params_exchange_format``; what the trainer's own
arguments leave unset."""

CLIENT_SETTINGS = {
    "train_task_name": "train",
    "eval_task_name": "validate",
    "submit_model_task_name": "submit_model",
    "transfer_type": "FULL",
    "params_exchange_format": "raw",
}
"""The settings ``FLARE_AGENT_CLIENT_CONFIG`` may give, with their defaults (NVFlare's)."""
