"""`SyncFlareAgent`: NVIDIA FLARE's blocking `FlareAgent` contract, on a background event loop.

A synchronous training script keeps its loop as it is::

    with SyncFlareAgent("tcp://127.0.0.1:8002", agent_id="a1", site_name="site-1") as agent:
        for task in agent.tasks():  # until the site says goodbye
            agent.submit_result(TaskResult({}, train(task.data)))

It runs one `AsyncFlareAgent` in an event loop thread of its own, reached through anyio's
`BlockingPortal`, and only crosses threads: each call is one `portal.call`, and every rule is the
async agent's.

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

import concurrent.futures
import contextlib
import ssl
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.from_thread
from anyio import RunFinishedError
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from anyio.lowlevel import EventLoopToken, current_token

from ._validate import check_timeout
from .agent import AsyncFlareAgent
from .defs import FlareAgent, Task, TaskResult
from .exceptions import AgentClosed, CallStateError
from .protocol import Limits
from .transports import Connector, Progress

__all__ = ["SyncFlareAgent"]

T = TypeVar("T")

_BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "trio": ("trio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
}


class _Runner:
    """The portal's thread and the task in it that holds the agent open; kept apart from
    `SyncFlareAgent` so that a finalizer can stop them after that object is gone."""

    def __init__(self, agent: AsyncFlareAgent, backend: str, name: str) -> None:
        loop_backend, options = _BACKENDS[backend]
        self._agent = agent
        self._portal_context = start_blocking_portal(loop_backend, options, name=name)
        self._portal: BlockingPortal | None = None
        self._hosted: concurrent.futures.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self._token: EventLoopToken | None = None
        self._stop_requested: anyio.Event | None = None
        self._closed = False
        self._lock = threading.RLock()  # re-entrant: stop() from a signal handler in close()

    async def _host(self, portal: BlockingPortal, *, task_status: TaskStatus[Any]) -> None:
        """The agent's one task in the loop: it starts the agent and stops it when asked, from
        whichever thread; then the portal stops too, and the thread ends."""
        self._stop_requested = anyio.Event()
        async with self._agent:
            task_status.started((threading.current_thread(), current_token()))
            await self._stop_requested.wait()
        await portal.stop()

    def start(self) -> None:
        portal = self._portal_context.__enter__()
        try:
            self._hosted, (self._thread, self._token) = portal.start_task(self._host, portal)
        except BaseException as exc:
            # A failed connect, or an interrupted wait for it (KeyboardInterrupt): leaving the
            # portal with the error cancels whatever still runs there, then joins the thread.
            self._closed = True
            self._portal_context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal = portal

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _refuse_in_loop_thread(self) -> None:
        if self.in_loop_thread():
            raise CallStateError(
                "a blocking call from the agent's own thread (an abort callback?) would wait "
                "forever; abort callbacks must not block"
            )

    def call_sync(self, function: Callable[[], T]) -> T:
        """``function()`` in the agent's loop, outside any task: one trip there and back (a
        `portal.call` makes two), for calls that never wait."""
        token = self._token
        if token is None or self._closed:
            raise AgentClosed("the agent is stopped")
        self._refuse_in_loop_thread()
        try:
            return anyio.from_thread.run_sync(function, token=token)
        except RunFinishedError as exc:
            raise AgentClosed("the agent is stopped") from exc

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``function(*args)`` in the agent's loop, waited for.

        Interrupted while waiting (``KeyboardInterrupt``), the call is cancelled there, the
        async way, before the interruption goes on.
        """
        portal = self._portal
        if portal is None or self._closed:
            raise AgentClosed("the agent is stopped")
        self._refuse_in_loop_thread()
        try:
            future = portal.start_task_soon(function, *args)
        except RuntimeError as exc:  # the portal has stopped
            raise AgentClosed("the agent is stopped") from exc
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:  # the portal cancelled it: stopping
            raise AgentClosed("the agent is stopped") from exc
        except BaseException:
            future.cancel()  # a KeyboardInterrupt, say: the call ends the async way
            raise

    def close(self) -> None:
        """Stop the agent (it says goodbye), then the portal; join the thread. Idempotent.

        From the agent's own thread (an abort callback), the stop is started and not waited for.
        """
        if self.in_loop_thread():
            assert self._stop_requested is not None
            self._stop_requested.set()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._portal is not None and self._stop_requested is not None:
                    with contextlib.suppress(RuntimeError):  # stopped from within already
                        self._portal.call(self._stop_requested.set)
                if self._hosted is not None:
                    self._hosted.result()
            finally:
                self._portal_context.__exit__(None, None, None)


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
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
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
        self._runner: _Runner | None = None
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
            runner = self._runner = _Runner(
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

    def _running(self) -> _Runner:
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
        # A training loop's next task usually arrives with the acknowledgement of its last
        # result: then one light trip takes it, and no task is started in the loop for the call.
        task = runner.call_sync(self._agent.get_task_nowait)
        return task if task is not None else runner.call(self._agent.get_task, timeout)

    def submit_result(self, result: TaskResult) -> bool:
        """Submit the current task's result; blocks until the site acknowledged it.

        :returns: True once the site kept it; False if the task was aborted, the site refused
            the result, or the agent closed first.
        :raises TypeError: ``result`` is not a `TaskResult`.
        :raises CallStateError: no task was fetched, or its result was already submitted.
        """
        runner = self._running()
        try:
            return runner.call(self._agent.submit_result, result)
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

    def log(self, key: str, value: Any, step: int | None = None) -> None:
        """Send a log record (a metric, usually) to the site; see `AsyncFlareAgent.log`."""
        self._running().call(self._agent.log, key, value, step)

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
