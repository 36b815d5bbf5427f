"""The in-memory transport: ``memory://name`` connects to a listener in the same event loop.

Messages pass as objects, without encoding: a payload the trainer mutates is the site's own object.
It is meant for tests and for running a site and its agents in one process.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.stapled import StapledObjectStream

from ..exceptions import TransportError
from ..protocol import Message
from ._base import Connector, MessageListener, MessageStream

__all__ = ["MemoryConnector", "MemoryListener", "memory_stream_pair"]

_listeners: dict[str, MemoryListener] = {}
_anonymous = itertools.count(1)
_BUFFER = 64  # messages in flight per direction before the sender waits: back-pressure


def memory_stream_pair(buffer: int = _BUFFER) -> tuple[MessageStream, MessageStream]:
    """Two ends of one in-memory connection."""
    a_send, b_receive = anyio.create_memory_object_stream[Message](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[Message](buffer)
    return StapledObjectStream(a_send, a_receive), StapledObjectStream(b_send, b_receive)


def _name(url: str) -> str:
    if not url.startswith("memory://"):
        raise ValueError(f"not a memory:// URL: {url!r}")
    return url[len("memory://") :]


class MemoryListener(MessageListener):
    """Listens at ``memory://name``; an empty name picks a unique one (like port 0)."""

    def __init__(self, url: str = "memory://") -> None:
        name = _name(url) or f"anonymous-{next(_anonymous)}"
        if name in _listeners:
            raise TransportError(f"memory://{name} is already in use by another listener")
        self._name = name
        self._accept_send, self._accept_receive = anyio.create_memory_object_stream[MessageStream](
            math.inf
        )
        self._serving = False
        _listeners[name] = self

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    def _connect(self) -> MessageStream:
        mine, theirs = memory_stream_pair()
        try:
            self._accept_send.send_nowait(theirs)
        except anyio.ClosedResourceError:
            raise TransportError(f"{self.url} is closed") from None
        return mine

    async def accept(self) -> MessageStream:
        """Wait for the next connection.

        :raises anyio.EndOfStream: the listener was closed.
        """
        return await self._accept_receive.receive()

    async def serve(
        self, handler: Callable[[MessageStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        self._serving = True
        async with anyio.create_task_group() as own_group:
            group = task_group or own_group
            async with self._accept_receive:
                async for stream in self._accept_receive:
                    group.start_soon(handler, stream)

    async def aclose(self) -> None:
        if _listeners.get(self._name) is self:
            del _listeners[self._name]
        self._accept_send.close()  # ends serve()'s loop with EndOfStream
        while True:  # connections made but never accepted: their agents see the end of stream
            try:
                stream = self._accept_receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            await stream.aclose()
        if not self._serving:
            self._accept_receive.close()


class MemoryConnector(Connector):
    """Connects to the `MemoryListener` at ``memory://name``."""

    def __init__(self, url: str) -> None:
        self._name = _name(url)
        self.url = url

    async def connect(self) -> MessageStream:
        await anyio.lowlevel.checkpoint()
        listener = _listeners.get(self._name)
        if listener is None:
            raise TransportError(f"nothing listens at {self.url}: start the site's listener first")
        return listener._connect()
