"""flare_agent_async: an async-native agent runtime for federated learning.

It speaks NVIDIA FLARE's ``FlareAgent`` contract (`flare_agent_async.defs`): a trainer gets tasks
from its site and submits results, with `AsyncFlareAgent` on asyncio or trio; `FlareSite` is the
side that runs tasks on many agents.
"""

from .agent import AsyncFlareAgent
from .defs import (
    RC,
    FlareAgent,
    MetaKey,
    MsgHeader,
    PayloadKey,
    Task,
    TaskResult,
    agent_site_fqcn,
)
from .exceptions import (
    AgentClosed,
    AgentGone,
    CallStateError,
    ConnectionRejected,
    FlareAgentError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SiteError,
    TaskAborted,
    TaskLost,
    TransportError,
    UnknownAgent,
)
from .site import Coming, FlareSite, HeldResult, LogRecord
from .sync import SyncFlareAgent

__all__ = [
    "RC",
    "AgentClosed",
    "AgentGone",
    "AsyncFlareAgent",
    "CallStateError",
    "Coming",
    "ConnectionRejected",
    "FlareAgent",
    "FlareAgentError",
    "FlareSite",
    "HeldResult",
    "LocalProtocolError",
    "LogRecord",
    "MetaKey",
    "MsgHeader",
    "PayloadKey",
    "ProtocolError",
    "RemoteProtocolError",
    "SiteError",
    "SyncFlareAgent",
    "Task",
    "TaskAborted",
    "TaskLost",
    "TaskResult",
    "TransportError",
    "UnknownAgent",
    "agent_site_fqcn",
]

__version__ = "0.1.0"
