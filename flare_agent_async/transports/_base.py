"""What a transport is: something that connects to, or listens at, an address and carries messages.

A connection is an `anyio.abc.ObjectStream` of protocol messages (a `MessageStream`), with
anyio's exact semantics: ``receive`` raises `anyio.EndOfStream` when the peer closed, ``send`` and
``receive`` raise `anyio.BrokenResourceError` when the connection broke, and
`anyio.ClosedResourceError` after this side closed it. How messages become bytes is the
transport's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from anyio.abc import Listener, ObjectStream

from ..protocol import Message

__all__ = ["Connector", "MessageListener", "MessageStream"]

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
