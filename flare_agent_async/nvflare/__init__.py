"""Running inside NVIDIA FLARE: an executor that hosts a site for our agents, and a persistor.

Needs the ``nvflare`` extra (``pip install flare-agent-async[nvflare]``). `AgentExecutor` runs an
NVFlare job's tasks on an `AsyncFlareAgent` or `SyncFlareAgent`; `NpzModelPersistor` keeps a
server's global model (a dict of numpy arrays) in an ``.npz`` file. Agents reach a stock
NVFlare ``IPCExchanger`` with ``nvflare-ipc://host:port`` URLs (`IPCConnector`).
"""

from ._convert import result_to_shareable, shareable_to_task
from ._executor import AgentExecutor
from ._ipc import IPCConnector
from ._persistor import NpzModelPersistor
from ._recipe import ExecutorOptions, use_agent_executor

__all__ = [
    "AgentExecutor",
    "ExecutorOptions",
    "IPCConnector",
    "NpzModelPersistor",
    "result_to_shareable",
    "shareable_to_task",
    "use_agent_executor",
]
