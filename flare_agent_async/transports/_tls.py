"""TLS over any byte stream: ``tls://host:port`` is TLS over TCP.

`TLSByteStream` drives an `ssl.SSLObject` over memory BIOs, so it wraps any `ByteStream`.
Decryption writes straight into the caller's buffer (the one copy TLS cannot avoid); the
`ssl.SSLContext` decides everything else: certificates, verification, and mutual TLS when the
site's context requires client certificates (``verify_mode = ssl.CERT_REQUIRED``).

Two rules keep it correct under concurrency and cancellation:

* only the writer sends records after the handshake, so a reader never waits on the peer's
  reading (both ends sending large frames at once cannot deadlock); records the reader makes
  (rare after the handshake in TLS 1.3) leave with the writer's next flush;
* ciphertext owed to the peer is kept until it is written, so a cancelled send loses nothing: a
  plaintext chunk counts as sent once encrypted, and `flush` finishes the job.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence

import anyio

from ..exceptions import TransportError
from ..protocol import Limits
from ._base import MessageListener
from ._framed import ByteStream
from ._socket import SocketByteStream, TCPConnector, listen_tcp

__all__ = ["TLSByteStream", "TLSConnector", "listen_tls"]

_CHUNK = 256 * 1024  # plaintext encrypted per send: bounds the ciphertext held in memory
_READ_AHEAD = 256 * 1024  # the most ciphertext read at once
_READ_AHEAD_START = 16 * 1024  # an idle connection's: one record; doubles while reads fill it


class TLSByteStream(ByteStream):
    """A `ByteStream` that encrypts another; make one with `wrap`."""

    def __init__(
        self,
        inner: ByteStream,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self._inner = inner
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._owed = memoryview(b"")  # ciphertext taken from the BIO, not yet written
        self._buffer = bytearray(_READ_AHEAD_START)
        self._flush_lock = anyio.Lock()

    @classmethod
    async def wrap(
        cls,
        inner: ByteStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> TLSByteStream:
        """Run the handshake over ``inner``; if it fails, or is cancelled, ``inner`` is aborted.

        :raises TransportError: the handshake failed (certificate not trusted, none given, ...).
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ssl_object = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        stream = cls(inner, ssl_object, incoming, outgoing)
        try:
            await stream._handshake()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await inner.abort()
            raise
        return stream

    async def _handshake(self) -> None:
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self.flush()
                    await self._fill()
            await self.flush()
        except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            with anyio.move_on_after(1, shield=True):  # the alert tells the peer why
                try:
                    await self.flush()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
            error = TransportError(f"TLS handshake failed: {exc}")
            # Certificates and alerts are settled: only a cut connection is worth a retry.
            error.retryable = not isinstance(exc, ssl.SSLError) or isinstance(exc, ssl.SSLEOFError)
            raise error from exc

    async def flush(self) -> None:
        """Write all ciphertext owed to the peer; a cancellation keeps the rest for next time."""
        async with self._flush_lock:
            while True:
                if not self._owed:
                    data = self._outgoing.read()
                    if not data:
                        return
                    self._owed = memoryview(data)
                self._owed = self._owed[await self._inner.send_some([self._owed]) :]
                self.waited_to_send = self.waited_to_send or self._inner.waited_to_send

    async def _fill(self) -> None:
        count = await self._inner.receive_into(memoryview(self._buffer))
        if count:
            self._incoming.write(memoryview(self._buffer)[:count])
            if count == len(self._buffer) < _READ_AHEAD:  # more is coming: read more at once
                self._buffer = bytearray(2 * count)
        else:
            self._incoming.write_eof()

    async def receive_into(self, buffer: memoryview) -> int:
        # Waited only if the socket had to wait: a read served from bytes already here is no
        # schedule point, and claiming otherwise would let a large frame starve other tasks.
        self.waited_to_receive = False
        while True:
            try:
                # read() fills the buffer and returns a count when given one; nothing is
                # awaited between it and the return, so a cancellation cannot lose the bytes.
                count: int = self._ssl.read(len(buffer), buffer)  # type: ignore[assignment]
                return count
            except ssl.SSLWantReadError:
                await self._fill()
                self.waited_to_receive = self.waited_to_receive or self._inner.waited_to_receive
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0  # a close, clean or not: the framing above tells a cut frame
            except ssl.SSLError as exc:
                raise anyio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def send_some(self, buffers: Sequence[memoryview]) -> int:
        self.waited_to_send = False
        await self.flush()  # earlier chunks first; nothing of this one is taken yet
        try:
            return self._ssl.write(buffers[0][:_CHUNK])
        except ssl.SSLWantReadError as exc:  # renegotiation, which TLS 1.3 has not
            raise anyio.BrokenResourceError("TLS renegotiation is not supported") from exc
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def abort(self) -> None:
        self._owed = memoryview(b"")
        self._outgoing.read()  # a broken stream's records must not reach the peer
        await self._inner.aclose()

    async def aclose(self) -> None:
        with anyio.move_on_after(1, shield=True):
            try:
                self._ssl.unwrap()
            except ssl.SSLWantReadError:
                pass  # our close_notify is made; the peer's is not awaited
            except (ssl.SSLError, ValueError):
                pass
            try:
                await self.flush()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
        await self._inner.aclose()


def _require_context(url: str, context: ssl.SSLContext | None) -> ssl.SSLContext:
    if context is None:
        raise ValueError(f"{url} needs an ssl_context (see flare_agent_async.tls)")
    return context


class TLSConnector(TCPConnector):
    """Connects to ``tls://host:port``; ``ssl_context`` decides what is trusted and sent."""

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(url, limits=limits)
        context = _require_context(url, ssl_context)
        hostname = server_hostname or self._host

        async def wrap(sock: socket.socket) -> ByteStream:
            try:
                return await TLSByteStream.wrap(
                    SocketByteStream(sock), context, server_side=False, server_hostname=hostname
                )
            except TransportError as exc:
                error = TransportError(f"cannot connect to {url}: {exc}")
                error.retryable = exc.retryable
                raise error from exc

        self._wrap = wrap


async def listen_tls(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
    handshake_timeout: float = 10.0,
) -> MessageListener:
    """Listen at ``tls://host:port`` with a server ``ssl_context``.

    A connection whose handshake fails or takes longer than ``handshake_timeout`` is dropped
    (and logged); the listener goes on.
    """
    context = _require_context(url, ssl_context)

    async def wrap(sock: socket.socket) -> ByteStream:
        with anyio.fail_after(handshake_timeout):
            return await TLSByteStream.wrap(SocketByteStream(sock), context, server_side=True)

    return await listen_tcp(url, limits=limits, wrap=wrap, scheme="tls")
