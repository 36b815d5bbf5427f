"""The FlareAgent contract: NVIDIA FLARE's ``nvflare.client.defs``, name for name, value for value.

A training process written against NVFlare's ``FlareAgent`` imports these names from here instead.
Two things go beyond the reference, without changing it:

* `TaskResult` accepts numpy arrays (and anything else whose truth value is ambiguous) as ``data``;
* a `Task` carries its abort signal: `Task.aborted`, `Task.add_abort_callback`, and for async
  trainers `Task.wait_aborted` and `Task.cancel_on_abort`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .exceptions import AgentClosed, CallStateError

if TYPE_CHECKING:
    import anyio

# No event loop library is imported here: the contract's names, and the sans-IO protocol that
# uses them, import without one. The async helpers of `Task` import anyio when they are called.

__all__ = [
    "RC",
    "AgentClosed",
    "CallStateError",
    "FlareAgent",
    "MetaKey",
    "MsgHeader",
    "PayloadKey",
    "Task",
    "TaskResult",
    "agent_site_fqcn",
]


class RC:
    """Return codes of a `TaskResult`."""

    OK = "OK"
    BAD_TASK_DATA = "BAD_TASK_DATA"
    EXECUTION_EXCEPTION = "EXECUTION_EXCEPTION"


class MsgHeader:
    """Header names of the messages NVFlare's agents exchange."""

    TASK_ID = "task_id"
    TASK_NAME = "task_name"
    RC = "rc"


class PayloadKey:
    """Keys of a task's or result's payload in NVFlare's messages."""

    DATA = "data"
    META = "meta"


class MetaKey:
    """Well-known keys of `Task.meta` and `TaskResult.meta`."""

    CURRENT_ROUND = "current_round"
    TOTAL_ROUND = "total_round"
    DATA_KIND = "data_kind"
    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    PROCESSED_ALGORITHM = "PROCESSED_ALGORITHM"
    PROCESSED_KEYS = "PROCESSED_KEYS"
    INITIAL_METRICS = "initial_metrics"
    FILTER_HISTORY = "filter_history"


class Task:
    """A task received from the site: its name, id, meta and data.

    Beyond the reference, a task knows whether the site aborted it. A synchronous trainer checks
    `aborted` between batches or registers a callback; an async trainer awaits `wait_aborted` or
    runs its work under `cancel_on_abort`. Aborts are signalled from the agent's event loop thread.
    """

    def __init__(self, task_name: str, task_id: str, meta: dict[str, Any], data: Any) -> None:
        self.task_name = task_name
        self.task_id = task_id
        self.meta = meta
        self.data = data
        self._abort_lock = threading.Lock()
        self._aborted = False
        self._abort_callbacks: list[Callable[[], object]] = []

    def __str__(self) -> str:
        return f"'{self.task_name} {self.task_id}'"

    def __repr__(self) -> str:
        return f"Task(task_name={self.task_name!r}, task_id={self.task_id!r})"

    @property
    def aborted(self) -> bool:
        """Whether the site aborted this task. Safe to read from any thread."""
        return self._aborted

    def add_abort_callback(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback()`` once when the site aborts this task; at once if it already has.

        The callback runs in the agent's event loop thread and must not block. Returns a function
        that unregisters the callback.
        """
        with self._abort_lock:
            if not self._aborted:
                self._abort_callbacks.append(callback)
                return lambda: self._remove_abort_callback(callback)
        callback()
        return lambda: None

    def _remove_abort_callback(self, callback: Callable[[], object]) -> None:
        with self._abort_lock:
            if callback in self._abort_callbacks:
                self._abort_callbacks.remove(callback)

    def set_aborted(self) -> None:
        """Mark the task aborted and run its abort callbacks, once.

        The agent calls it when the site gives up on the task; a test of a trainer may call it to
        play the site. It runs the callbacks in the calling thread.
        """
        with self._abort_lock:
            if self._aborted:
                return
            self._aborted = True
            callbacks, self._abort_callbacks = self._abort_callbacks, []
        for callback in callbacks:
            callback()

    async def wait_aborted(self) -> None:
        """Wait until the site aborts this task. Call it in the agent's event loop."""
        import anyio

        event = anyio.Event()
        remove = self.add_abort_callback(event.set)
        try:
            await event.wait()
        finally:
            remove()

    @contextmanager
    def cancel_on_abort(self) -> Iterator[anyio.CancelScope]:
        """Run a block of async work that is cancelled when the site aborts this task.

        Use in the agent's event loop::

            with task.cancel_on_abort():
                weights = await train(task.data)
            if task.aborted:
                ...  # submit_result would return False: the site no longer wants it
        """
        import anyio

        with anyio.CancelScope() as scope:
            remove = self.add_abort_callback(scope.cancel)
            try:
                yield scope
            finally:
                remove()


_PLAIN_TYPES = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float)


def _is_empty(value: Any) -> bool:
    """The reference's ``not value``, kept to plain types: an array's truth value is ambiguous."""
    return value is None or (isinstance(value, _PLAIN_TYPES) and not value)


class TaskResult:
    """The result of a task: meta, data and a return code from `RC` (default ``RC.OK``).

    Empty ``meta`` or ``data`` (None, ``{}``, ``[]``, ...) become ``{}``, as in the reference.

    :raises TypeError: if ``meta`` is not a dict or ``return_code`` is not a str.
    """

    def __init__(self, meta: dict[str, Any] | None, data: Any, return_code: str = RC.OK) -> None:
        if _is_empty(meta):
            meta = {}
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be dict but got {type(meta)}")
        if _is_empty(data):
            data = {}
        if not isinstance(return_code, str):
            raise TypeError(f"return_code must be str but got {type(return_code)}")
        self.return_code = return_code
        self.meta = meta
        self.data = data

    def __repr__(self) -> str:
        return f"TaskResult(return_code={self.return_code!r}, meta={self.meta!r})"


class FlareAgent(ABC):
    """The blocking agent contract a training process uses to talk to its FLARE site.

    ``get_task(timeout)`` returns the next `Task` (or None after ``timeout`` seconds), the trainer
    works on it and calls ``submit_result(result)`` once; ``start()`` and ``stop()`` bracket it all.
    """

    @abstractmethod
    def start(self) -> None:
        """Start the agent: connect to the site."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the agent; a blocked `get_task` raises `AgentClosed`."""

    @abstractmethod
    def get_task(self, timeout: float | None = None) -> Task | None:
        """Get a task from the site, waiting up to ``timeout`` seconds (None: until one arrives).

        :returns: the task, or None if none arrived within ``timeout``.
        :raises AgentClosed: if the agent is closed before a task arrives.
        :raises CallStateError: if the previous task's result has not been submitted.
        """

    def submit_result(self, result: TaskResult) -> bool:
        """Submit the result of the current task, once; True when the site acknowledged it.

        :raises CallStateError: if there is no current task or its result was already submitted.
        """
        raise NotImplementedError


def agent_site_fqcn(site_name: str, agent_id: str, job_id: str | None = None) -> str:
    """The agent's fully qualified cell name: ``site--agent``, or ``site.job.agent`` with a job."""
    if not job_id:
        return f"{site_name}--{agent_id}"
    return ".".join([site_name, job_id, agent_id])
