"""`PortalRunner`: an async resource on an event loop thread of its own, for blocking callers.

`SyncFlareAgent` and the Client API's blocking `Client` are each one of these around their async
twin: they only cross threads, through anyio's `BlockingPortal`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import anyio
from anyio import RunFinishedError
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from anyio.lowlevel import EventLoopToken, current_token

from ._wakeup import Wakeup
from .exceptions import AgentClosed, CallStateError

__all__ = ["BACKENDS", "PortalRunner"]

T = TypeVar("T")

BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "trio": ("trio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
}


class PortalRunner:
    """An event loop thread (anyio's portal) and the one task in it that holds ``resource``
    open (``async with``) until `close`; blocking calls into it from other threads. Kept apart
    from the object that uses it, so that a finalizer can stop it after that object is gone."""

    def __init__(self, resource: AbstractAsyncContextManager[Any], backend: str, name: str) -> None:
        loop_backend, options = BACKENDS[backend]
        self._resource = resource
        self._portal_context = start_blocking_portal(loop_backend, options, name=name)
        self._portal: BlockingPortal | None = None
        self._hosted: concurrent.futures.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self._token: EventLoopToken | None = None
        self._stop_requested: anyio.Event | None = None
        self._closed = False
        self._waiting: set[concurrent.futures.Future[Any]] = set()  # `call_settled` calls
        self._lock = threading.RLock()  # re-entrant: stop() from a signal handler in close()

    async def _host(self, portal: BlockingPortal, *, task_status: TaskStatus[Any]) -> None:
        """The one task in the loop: it enters the resource and leaves it when asked, from
        whichever thread; then the portal stops too, and the thread ends."""
        self._stop_requested = anyio.Event()
        async with self._resource:
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

        def run(settle: Callable[[T], object]) -> None:
            settle(function())

        return self.call_settled(run)

    def call_settled(self, function: Callable[[Callable[[T], object]], object]) -> T:
        """``function(settle)`` in the agent's loop, outside any task; returns what the loop
        passes to ``settle``, then or later (from a callback of the loop's own): one trip there
        and one back, however long the answer takes, and no task started.

        Interrupted while waiting (``KeyboardInterrupt``), the call goes on in the loop.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                function(future.set_result)
            except Exception as exc:  # raised in the calling thread
                future.set_exception(exc)

        return self._cross(run, future)

    def wait_for(
        self, take: Callable[[], T | None], changed: Wakeup, timeout: float | None = None
    ) -> T | None:
        """What ``take()`` returns once it is not None, or None after ``timeout`` seconds;
        ``take`` runs in the agent's loop, outside any task, now and at each ``changed.set()``
        (it may raise: the error is raised here). One trip there and one back, and no task
        started. Once this returns or raises, ``take`` runs no more: what it took is returned.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        given_up = False  # read and written in the loop only

        def attempt() -> bool:
            if given_up or future.done():
                return True
            try:
                value = take()
            except Exception as exc:
                future.set_exception(exc)
                return True
            if value is None:
                return False
            future.set_result(value)
            return True

        def start() -> None:
            if not attempt():
                changed.call_until(attempt)

        def give_up() -> None:
            nonlocal given_up
            given_up = True

        try:
            return self._cross(start, future, timeout)
        except TimeoutError:
            pass
        except AgentClosed:
            raise
        except BaseException:  # KeyboardInterrupt, say: stop taking before it goes on
            with contextlib.suppress(AgentClosed):
                self.call_sync(give_up)
            raise
        with contextlib.suppress(AgentClosed):
            self.call_sync(give_up)  # in the loop: from here on, nothing more is taken
        if not future.done():
            return None
        if future.cancelled():  # the loop stopped meanwhile
            raise AgentClosed("the agent is stopped")
        return future.result()

    def _cross(
        self,
        run: Callable[[], object],
        future: concurrent.futures.Future[T],
        timeout: float | None = None,
    ) -> T:
        """``run()`` in the agent's loop, outside any task; then wait (up to ``timeout``) for
        ``future``, which the loop settles then or later. A loop that stops first cancels it."""
        with self._lock:
            token = self._token
            if token is None or self._closed:
                raise AgentClosed("the agent is stopped")
            self._refuse_in_loop_thread()
            self._waiting.add(future)
        try:
            token.backend_class.run_sync_soon(run, (), token.native_token)
            return future.result(timeout)
        except (RunFinishedError, concurrent.futures.CancelledError) as exc:
            raise AgentClosed("the agent is stopped") from exc
        finally:
            with self._lock:
                self._waiting.discard(future)

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
                # The loop is gone: a call it never ran or answered ends with AgentClosed.
                for future in self._waiting:
                    future.cancel()
