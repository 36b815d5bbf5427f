"""`SyncFlareAgent`: NVIDIA FLARE's blocking `FlareAgent` contract, on a background event loop.

A synchronous training script keeps its loop as it is::

    with SyncFlareAgent("tcp://127.0.0.1:8002", agent_id="a1", site_name="site-1") as agent:
        for task in agent.tasks():  # until the site says goodbye
            agent.submit_result(TaskResult({}, train(task.data)))

It runs one `AsyncFlareAgent` on an event loop in a thread of its own, and only crosses threads:
each call is one trip into that loop and back, and every rule is the async agent's.

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

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import anyio
from anyio.abc import TaskGroup

try:  # trio brings sniffio; with asyncio alone, anyio finds the running loop by itself
    import sniffio
except ImportError:  # pragma: no cover - depends on what is installed
    sniffio = None  # type: ignore[assignment]

from .agent import AsyncFlareAgent, check_timeout
from .defs import FlareAgent, Task, TaskResult
from .exceptions import AgentClosed, CallStateError

__all__ = ["SyncFlareAgent"]

T = TypeVar("T")

_BACKENDS = {
    "asyncio": ("asyncio", {}),
    "trio": ("trio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
}


class _Call:
    """One call from a caller's thread into the agent's loop."""

    __slots__ = (
        "args",
        "cancelled",
        "done",
        "error",
        "fast",
        "finished",
        "function",
        "result",
        "scope",
    )

    def __init__(
        self,
        function: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        fast: Callable[[], Any] | None = None,
    ) -> None:
        self.function = function
        self.args = args
        self.fast = fast
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.scope: anyio.CancelScope | None = None
        self.cancelled = False
        self.finished = False


def _thread_safe_scheduler(backend: str) -> Callable[..., None]:
    """The running loop's way to run a callback soon, from any thread."""
    if backend == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    loop = asyncio.get_running_loop()

    def schedule(callback: Callable[..., object], *args: Any) -> None:
        loop.call_soon_threadsafe(callback, *args)

    return schedule


class _Runner:
    """The event loop thread and the agent in it; kept apart from the agent object so that a
    finalizer can stop it after the object is gone.

    A call crosses threads once each way: the caller schedules a callback in the loop (which
    starts the call as a task) and waits on an event the task sets. (A blocking portal also
    waits for the task to be started, a second round trip per call.)
    """

    def __init__(self, agent: AsyncFlareAgent, backend: str, name: str) -> None:
        self.agent = agent
        self._backend, self._options = _BACKENDS[backend]
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._schedule: Callable[..., None] | None = None
        self._group: TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._main_scope: anyio.CancelScope
        # A daemon thread: interpreter exit must not wait for it before the finalizer runs.
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._close_lock = threading.RLock()  # re-entrant: stop() from a signal handler in stop()
        self._calls: set[_Call] = set()  # calls in flight, for the loop's end to release
        self._calls_lock = threading.Lock()

    def _run(self) -> None:
        try:
            anyio.run(self._main, backend=self._backend, backend_options=self._options)
        except BaseException as exc:  # a failed start: told to start() through the future
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            # Calls that reached the loop too late to run: nobody may wait for them forever.
            with self._calls_lock:
                self._schedule = None
                for call in self._calls:
                    if not call.done.is_set():
                        call.error = AgentClosed("the agent is stopped")
                        call.done.set()

    async def _main(self) -> None:
        # The thread is ours: name its event loop for anyio, so that callbacks scheduled from
        # other threads (outside any task) can start tasks too.
        if sniffio is not None:
            sniffio.thread_local.name = self._backend
        self._stop = anyio.Event()
        with anyio.CancelScope() as self._main_scope:
            async with anyio.create_task_group() as group:
                self._group = group
                # Set before connecting, so that an interrupted start() can cancel the connect.
                self._schedule = _thread_safe_scheduler(self._backend)
                async with self.agent:
                    self._ready.set_result(None)
                    await self._stop.wait()
                    group.cancel_scope.cancel()  # calls still running end with AgentClosed

    def start(self) -> None:
        self.thread.start()
        try:
            self._ready.result()
        except BaseException:
            # A failed connect, or an interrupted wait for it (KeyboardInterrupt): stop the loop.
            schedule = self._schedule
            if schedule is not None:
                try:
                    schedule(self._main_scope.cancel)
                except Exception:
                    pass
            self.thread.join()
            raise

    def _begin(self, call: _Call) -> None:  # in the loop
        assert self._group is not None
        if call.fast is not None and not call.cancelled:
            try:
                call.result = call.fast()
            except Exception as exc:
                call.error = exc
            if call.result is not None or call.error is not None:
                call.finished = True
                call.done.set()
                return
        try:
            self._group.start_soon(self._perform, call)
        except RuntimeError:  # the agent's task group has just ended
            call.error = AgentClosed("the agent is stopped")
            call.done.set()

    async def _perform(self, call: _Call) -> None:  # in the loop
        try:
            with anyio.CancelScope() as call.scope:
                if call.cancelled:  # the caller gave up before the call began
                    call.scope.cancel()
                call.result = await call.function(*call.args)
                call.finished = True
        except Exception as exc:
            call.error = exc
            call.finished = True
        finally:
            if not call.finished:  # cancelled: the caller is gone, or the agent is stopping
                call.error = AgentClosed("the agent is stopped")
            call.done.set()

    async def _stop_from_within(self) -> None:  # in the loop
        await self.agent.stop()
        assert self._stop is not None
        self._stop.set()

    def _cancel(self, call: _Call) -> None:  # in the loop
        call.cancelled = True
        if call.scope is not None:
            call.scope.cancel()

    def call(
        self,
        function: Callable[..., Awaitable[T]],
        *args: Any,
        fast: Callable[[], T | None] | None = None,
    ) -> T:
        """Run ``function(*args)`` in the agent's loop and wait for it.

        ``fast``, if given, is tried first in the loop, as a plain call: a result other than
        None is the answer, with no task started for the call (`get_task` when a task is
        already here, the common case of a training loop).

        Interrupted while waiting (``KeyboardInterrupt``), the call is cancelled there, the
        async way, before the interruption goes on.
        """
        schedule = self._schedule
        if schedule is None or self._closed:
            raise AgentClosed("the agent is stopped")
        if threading.current_thread() is self.thread:
            raise CallStateError(
                "a blocking call from the agent's own thread (an abort callback?) would wait "
                "forever; abort callbacks must not block"
            )
        call = _Call(function, args, fast)
        with self._calls_lock:
            if self._schedule is None:  # the loop thread has ended
                raise AgentClosed("the agent is stopped")
            self._calls.add(call)
        try:
            try:
                schedule(self._begin, call)
            except Exception as exc:  # the loop has just ended (RuntimeError, RunFinishedError)
                raise AgentClosed("the agent is stopped") from exc
            try:
                call.done.wait()
            except BaseException:
                try:
                    schedule(self._cancel, call)
                except Exception:
                    pass
                raise
        finally:
            with self._calls_lock:
                self._calls.discard(call)
        if call.error is not None:
            raise call.error
        return cast(T, call.result)

    def close(self) -> None:
        """Stop the agent (it says goodbye) and the loop; join the thread. Idempotent.

        From the agent's own thread (an abort callback), the stop is started and not waited for.
        """
        if threading.current_thread() is self.thread:
            if not self._closed and self._group is not None:
                self._closed = True
                self._group.start_soon(self._stop_from_within)
            return
        with self._close_lock:
            if self._closed:  # stopped already, maybe from an abort callback: still join
                if self.thread.is_alive() and self.thread is not threading.current_thread():
                    self.thread.join()
                return
            schedule = self._schedule
            if schedule is not None:
                try:
                    self.call(self.agent.stop)
                except AgentClosed:
                    pass
            self._closed = True
        if schedule is not None and self._stop is not None:
            try:
                schedule(self._stop.set)
            except RuntimeError:
                pass  # the loop is already gone
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()


class SyncFlareAgent(FlareAgent):
    """A blocking agent for synchronous trainers: `AsyncFlareAgent` on a thread of its own.

    Takes the same options as `AsyncFlareAgent`, plus ``backend``: ``"asyncio"`` (default),
    ``"trio"`` or ``"uvloop"`` (when installed). Also a context manager (start on entry, stop on
    exit). See the module docstring for the thread rules.
    """

    def __init__(
        self,
        site: Any,
        *,
        agent_id: str,
        site_name: str,
        backend: str = "asyncio",
        **options: Any,
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
        self._agent = AsyncFlareAgent(site, agent_id=agent_id, site_name=site_name, **options)
        self._backend = backend
        self._runner: _Runner | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.RLock()  # re-entrant: stop() may come from a signal handler

    @property
    def agent_id(self) -> str:
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
            self._finalizer = weakref.finalize(self, runner.close)

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
        return self._running().call(self._agent.get_task, timeout, fast=self._agent._task_ready)

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
                if self._agent._failure is not None:
                    raise
                return
            assert task is not None
            yield task
            del task  # not kept alive while waiting for the next one

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
