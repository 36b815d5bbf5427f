"""`SyncFlareAgent`: NVIDIA FLARE's blocking `FlareAgent` contract, on a background event loop.

A synchronous training script keeps its loop as it is::

    with SyncFlareAgent("tcp://127.0.0.1:8002", agent_id="a1", site_name="site-1") as agent:
        for task in agent.tasks():  # until the site says goodbye
            agent.submit_result(TaskResult({}, train(task.data)))

It runs one `AsyncFlareAgent` in an event loop thread of its own, reached through anyio's
`BlockingPortal`, and only crosses threads: each call is one trip into that loop and back, and
every rule is the async agent's.

Thread rules:

* any thread may call `get_task`, `submit_result` and `stop`; two threads calling `get_task` at
  once get one task and one `CallStateError`, as with two tasks of the async agent;
* `stop()` from another thread, or from a signal handler, wakes a blocked `get_task` at once
  with `AgentClosed`;
* a `KeyboardInterrupt` while blocked cancels the call the async way (a task stays queued, a
  result is still delivered) and leaves the agent stoppable;
* the agent's event loop is its own: calling threads may run event loops of their own
  (a notebook's, say);
* abort callbacks (`Task.add_abort_callback`) run in the agent's thread and must not block
  (`stop()` from one starts the stop; a blocking call from one raises `CallStateError`);
  `Task.aborted` can be read from any thread;
* nothing is left behind: `stop()` joins the thread and closes the connection, and so does
  garbage collection of a started agent, or interpreter exit.
"""

from __future__ import annotations

import functools
import ssl
import threading
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

from ._portal import BACKENDS, PortalRunner
from ._validate import check_timeout
from .agent import AsyncFlareAgent
from .defs import FlareAgent, Task, TaskResult
from .exceptions import AgentClosed, CallStateError
from .protocol import Limits
from .transports import Connector, Progress

__all__ = ["SyncFlareAgent"]


class SyncFlareAgent(FlareAgent):
    """A blocking agent for synchronous trainers: `AsyncFlareAgent` on a thread of its own.

    Takes the options of `AsyncFlareAgent`, plus ``backend``: ``"asyncio"`` (default),
    ``"trio"`` or ``"uvloop"`` (when installed). Also a context manager (start on entry, stop on
    exit). See the module docstring for the thread rules.
    """

    def __init__(
        self,
        site: str | Connector,
        *,
        agent_id: str,
        site_name: str,
        backend: str = "asyncio",
        job_id: str | None = None,
        secret: bytes | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        connect_timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
        close_timeout: float = 10.0,
        max_backoff: float = 2.0,
        on_progress: Callable[[Progress], object] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self._agent = AsyncFlareAgent(
            site,
            agent_id=agent_id,
            site_name=site_name,
            job_id=job_id,
            secret=secret,
            ssl_context=ssl_context,
            limits=limits,
            connect_timeout=connect_timeout,
            reconnect_timeout=reconnect_timeout,
            close_timeout=close_timeout,
            max_backoff=max_backoff,
            on_progress=on_progress,
        )
        self._backend = backend
        self._runner: PortalRunner | None = None
        self._lock = threading.RLock()  # re-entrant: stop() may come from a signal handler

    @property
    def agent_id(self) -> str:
        """This agent's id."""
        return self._agent.agent_id

    @property
    def connected(self) -> bool:
        """Whether the agent is connected to its site right now."""
        return self._agent.connected

    def start(self) -> None:
        """Start the agent's thread and connect; returns once the site welcomed the agent.

        :raises ConnectionRejected: as `AsyncFlareAgent.start`.
        :raises TransportError: as `AsyncFlareAgent.start`.
        :raises CallStateError: the agent was already started.
        """
        with self._lock:
            if self._runner is not None:
                raise CallStateError(
                    "the agent was already started; create a new one to start again"
                )
            runner = self._runner = PortalRunner(
                self._agent, self._backend, name=f"flare-agent-{self.agent_id}"
            )
            runner.start()
            # Stop the loop when this object is collected, or at interpreter exit.
            weakref.finalize(self, runner.close)

    def stop(self) -> None:
        """Stop the agent: submitted results are delivered first (up to ``close_timeout``), the
        site is told goodbye, the thread is joined. Idempotent; callable from any thread and from
        signal handlers. A blocked `get_task` raises `AgentClosed`."""
        with self._lock:
            runner = self._runner
        if runner is not None:
            runner.close()

    def _running(self) -> PortalRunner:
        runner = self._runner
        if runner is None:
            raise CallStateError("the agent is not started: call start() first")
        return runner

    def get_task(self, timeout: float | None = None) -> Task | None:
        """Wait for the next task, up to ``timeout`` seconds (None: until one arrives).

        :returns: the task, or None if none arrived in time (a task arriving later is kept).
        :raises AgentClosed: the agent is closed, or stopped meanwhile.
        :raises CallStateError: not started, or the current task has no result yet.
        :raises TypeError: ``timeout`` is not a number.
        :raises ValueError: ``timeout`` is not positive.
        """
        check_timeout(timeout)
        runner = self._running()
        # One trip into the loop and one back, however long the task takes to come: the task
        # is taken there, by a callback at each change of the agent's state, not by a task.
        agent = self._agent
        return runner.wait_for(agent.get_task_nowait, agent._changed, timeout)

    def submit_result(self, result: TaskResult) -> bool:
        """Submit the current task's result; blocks until the site acknowledged it.

        :returns: True once the site kept it; False if the task was aborted, the site refused
            the result, or the agent closed first.
        :raises TypeError: ``result`` is not a `TaskResult`.
        :raises CallStateError: no task was fetched, or its result was already submitted.
        """
        runner = self._running()
        try:
            kept: bool = runner.call_settled(
                functools.partial(self._agent.submit_result_nowait, result)
            )
            return kept
        except AgentClosed:
            if isinstance(result, TaskResult):
                return False  # stopped before the result could go: the contract says False
            raise

    def tasks(self) -> Iterator[Task]:
        """Iterate over tasks until the site says goodbye or the agent is stopped.

        Submit each task's result (or let it be aborted) before asking for the next one.

        :raises AgentClosed: the agent closed because of a failure (the site is gone, say).
        """
        while True:
            try:
                task = self.get_task()
            except AgentClosed:
                if self._agent.failure is not None:
                    raise
                return
            assert task is not None
            yield task
            del task  # not kept alive while waiting for the next one: models are large

    def log(
        self,
        key: str,
        value: Any,
        step: int | None = None,
        *,
        data_type: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Send a log record (a metric, usually) to the site; see `AsyncFlareAgent.log`."""
        log = functools.partial(self._agent.log, data_type=data_type, options=options)
        self._running().call(log, key, value, step)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
