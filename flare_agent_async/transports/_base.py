"""What a transport is: something that connects to, or listens at, an address and carries messages.

A connection is an `anyio.abc.ObjectStream` of protocol messages (a `MessageStream`), with
anyio's exact semantics: ``receive`` raises `anyio.EndOfStream` when the peer closed, ``send`` and
``receive`` raise `anyio.BrokenResourceError` when the connection broke, and
`anyio.ClosedResourceError` after this side closed it. How messages become bytes is the
transport's business.

What a stream can do beyond that, it declares as typed attributes (`MessageStreamAttribute`),
anyio's way: the connection driver asks ``stream.extra(attribute, None)`` and uses what it finds,
whoever wrote the transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from anyio import TypedAttributeSet, typed_attribute
from anyio.abc import Listener, ObjectStream

from ..protocol import Message

__all__ = ["Connector", "MessageListener", "MessageStream", "MessageStreamAttribute", "Progress"]


@dataclass(frozen=True)
class Progress:
    """How far a large frame has moved: ``done`` of ``total`` bytes."""

    direction: str
    """``"send"`` or ``"receive"``."""
    kind: str
    """The message class: ``"TaskAssign"``, ``"Result"``, ..."""
    task_id: str | None
    done: int
    total: int


class MessageStreamAttribute(TypedAttributeSet):
    """Capabilities a `MessageStream` may declare in its ``extra_attributes``.

    A stream without them still works: the driver then sends one message at a time, and counts
    the peer alive at each whole message received.
    """

    send_batch: Callable[[Sequence[Message]], Awaitable[None]] = typed_attribute()
    """``await send_batch(messages)``: send them in order, small ones in one write."""

    send_batch_nowait: Callable[[Sequence[Message]], bool] = typed_attribute()
    """``send_batch_nowait(messages)``: send them now if they can go without waiting; False
    if any of them could not, which are then kept and go first with the next ``send_batch``
    (called with no messages, if need be)."""

    watch_bytes: Callable[[Callable[[], object], Callable[[Progress], object] | None], None] = (
        typed_attribute()
    )
    """``watch_bytes(on_activity, on_progress)``: call ``on_activity()`` whenever bytes arrive or
    the peer makes room for a send (a large frame still moving keeps the peer alive), and
    ``on_progress`` with a `Progress` as large frames move."""

    discard_incoming: Callable[[], Awaitable[None]] = typed_attribute()
    """``await discard_incoming()``: read and drop whatever arrives until the peer closes (after a
    protocol error, so that closing does not reset the connection under the goodbye)."""


MessageStream = ObjectStream[Message]
"""One connection carrying protocol messages both ways."""


class Connector(ABC):
    """Makes connections to one address; an agent reconnects through it."""

    url: str
    """The address connected to, for messages and logs."""

    @abstractmethod
    async def connect(self) -> MessageStream:
        """Open a new connection.

        :raises TransportError: the connection could not be made (the cause is chained).
        """


class MessageListener(Listener[MessageStream]):
    """Accepts connections at one address; a site serves its agents through it."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The bound address, with the actual port when port 0 was asked for."""
