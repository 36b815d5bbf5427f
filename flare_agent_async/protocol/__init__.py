"""The wire protocol, sans I/O: messages, and the agent's and the site's state machines.

Nothing here reads a socket, a clock or an event loop; `flare_agent_async.agent` and
`flare_agent_async.site` drive these machines over a transport.
"""

from ._agent import (
    AgentProtocol,
    AgentState,
    BadTask,
    Closed,
    Rejected,
    Settled,
    Submission,
    TaskAborted,
    TaskArrived,
    Welcomed,
)
from ._messages import (
    PROTOCOL_VERSION,
    Abort,
    Bye,
    Heartbeat,
    Hello,
    Log,
    Message,
    Reject,
    Result,
    ResultAck,
    TaskAck,
    TaskAssign,
    Welcome,
)
from ._site import (
    LogReceived,
    LogRecord,
    ResultRefused,
    SessionState,
    SiteConfig,
    SiteSession,
    SiteTask,
    TaskFinished,
    check_hello,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "AgentProtocol",
    "AgentState",
    "BadTask",
    "Bye",
    "Closed",
    "Heartbeat",
    "Hello",
    "Log",
    "LogReceived",
    "LogRecord",
    "Message",
    "Reject",
    "Rejected",
    "Result",
    "ResultAck",
    "ResultRefused",
    "SessionState",
    "Settled",
    "SiteConfig",
    "SiteSession",
    "SiteTask",
    "Submission",
    "TaskAborted",
    "TaskAck",
    "TaskArrived",
    "TaskAssign",
    "TaskFinished",
    "Welcome",
    "Welcomed",
    "check_hello",
]
