"""The exceptions of flare_agent_async, in one tree.

Every error the library raises on purpose derives from :class:`FlareAgentError`::

    FlareAgentError
    ├── AgentClosed                 the agent is closed: stopped, told goodbye, or its site is gone
    ├── CallStateError              a call made in the wrong state (also a RuntimeError)
    ├── ConnectionRejected          the site refused the agent's hello
    ├── TransportError              a connection could not be made or broke (also an OSError)
    ├── ProtocolError               the rules of the wire protocol were broken
    │   ├── LocalProtocolError      ... by this side: a bug in the caller or the library
    │   └── RemoteProtocolError     ... by the peer: its connection is closed
    └── SiteError                   raised by FlareSite to the code that runs tasks
        ├── AgentGone               the agent left, or did not come back in time
        ├── TaskAborted             the task was aborted before a result arrived
        ├── TaskLost                the agent restarted, and the site no longer had the task's data
        └── UnknownAgent            no agent with that id ever connected (also a LookupError)

`AgentClosed` and `CallStateError` are the names of NVIDIA FLARE's ``nvflare.client.defs``; they are
importable from :mod:`flare_agent_async.defs` and the package root as well.
"""

from __future__ import annotations

__all__ = [
    "AgentClosed",
    "AgentGone",
    "CallStateError",
    "ConnectionRejected",
    "FlareAgentError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "SiteError",
    "TaskAborted",
    "TaskLost",
    "TransportError",
    "UnknownAgent",
]


class FlareAgentError(Exception):
    """Base class of every error raised by flare_agent_async."""


class AgentClosed(FlareAgentError):
    """The agent is closed: `stop()` was called, the site said goodbye, or the site is gone.

    Raised by `get_task`. A closed agent stays closed; create a new one to connect again.
    """


class CallStateError(FlareAgentError, RuntimeError):
    """A call was made in the wrong state.

    For example `get_task` before `start()`, `get_task` while a fetched task has no submitted
    result, or `submit_result` twice for one task. The agent's state is unchanged: fix the caller.
    """


class ConnectionRejected(FlareAgentError):
    """The site refused the agent's hello; `reason` says why (version, site name, job id, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the site rejected the agent: {reason}")
        self.reason = reason


class TransportError(FlareAgentError, OSError):
    """A connection could not be made, or broke; the cause is chained.

    ``retryable`` is False when trying again cannot help (a certificate that is not trusted, say).
    """

    retryable = True


class ProtocolError(FlareAgentError):
    """The wire protocol's rules were broken."""


class LocalProtocolError(ProtocolError):
    """This side tried to break the protocol's rules: a bug in the caller or in the library."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol's rules; its connection is closed, other connections go on."""


class SiteError(FlareAgentError):
    """Base class of the errors `FlareSite` raises to the code that runs tasks."""


class AgentGone(SiteError):
    """The agent said goodbye, or stayed away longer than the site's ``reconnect_timeout``.

    Its unfinished tasks end with this error; wait for it again with `FlareSite.wait_for_agent`.
    """


class TaskAborted(SiteError):
    """The task was aborted (by `FlareSite.abort_task`) before its result arrived."""


class TaskLost(SiteError):
    """The agent restarted after it had received the task, and the site had released the task's
    data (``keep_task_data=False``), so it could not send the task again."""


class UnknownAgent(SiteError, LookupError):
    """No agent with this id has connected to the site; call `FlareSite.wait_for_agent` first."""
