"""`Wakeup`: wake whoever waits for a change, with no event made while nobody waits."""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ["Wakeup"]


class Wakeup:
    """Tasks ``await wait()`` for the next change, and callbacks wait through `call_until`;
    `set` wakes them all.

    An `anyio.Event` is made only when a task waits, so `set` costs an attribute read when
    nobody does (it runs at every message). A change made before a task waits does not count:
    check the state, then wait, with no checkpoint in between.
    """

    __slots__ = ("_callbacks", "_event")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._callbacks: list[Callable[[], bool]] = []

    async def wait(self) -> None:
        """Wait for the next `set`."""
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def call_until(self, callback: Callable[[], bool]) -> None:
        """Call ``callback()`` at every `set` until it returns True."""
        self._callbacks.append(callback)

    def set(self) -> None:
        """Wake every task waiting now, and call the callbacks waiting now."""
        event, self._event = self._event, None
        if event is not None:
            event.set()
        if self._callbacks:
            callbacks, self._callbacks = self._callbacks, []
            self._callbacks.extend(callback for callback in callbacks if not callback())
