"""The transport conformance suite: what every `MessageStream` must do, checked over a URL.

The library's own transports pass it, and a plugin's should too (``docs/plugins.md``)::

    await check_transport("pigeon://127.0.0.1:0")  # every check, each on a fresh connection

Each check listens at the URL, connects, and drives the two ends: order both ways, large frames
whole and equal, concurrent senders, anyio's close semantics, and cancellation in the middle of a
frame (a send leaves the connection usable or cleanly closed, a receive loses nothing).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import numpy as np

from .exceptions import TransportError
from .protocol import Heartbeat, Limits, Log, Message, Result, TaskAck, TaskAssign
from .transports import MessageStream, MessageStreamAttribute, connector_for, create_listener

__all__ = [
    "CHECKS",
    "TransportCheckFailed",
    "TransportPairs",
    "check_nobody_listening",
    "check_transport",
    "transport_pairs",
]

MiB = 2**20


class TransportCheckFailed(AssertionError):
    """A transport broke a rule of the conformance suite; the message says which and how."""


def _expect(condition: object, message: str) -> None:
    if not condition:
        raise TransportCheckFailed(message)


Pair = tuple[MessageStream, MessageStream]
Check = Callable[[MessageStream, MessageStream], Awaitable[None]]


# -- messages, and comparing them -----------------------------------------------------------------


def _arrays(total_bytes: int, count: int) -> dict[str, np.ndarray]:
    """``count`` float32 arrays of ``total_bytes`` together; every value distinct and exact."""
    n = total_bytes // 4 // count
    return {f"layer{i}": np.arange(i * n, (i + 1) * n, dtype=np.float32) for i in range(count)}


def big_task(task_id: str, total_bytes: int, *, count: int = 4) -> TaskAssign:
    """A task whose data is ``total_bytes`` of arrays: a frame that takes many writes."""
    return TaskAssign(
        task_id=task_id, task_name="train", meta={"tag": task_id}, data=_arrays(total_bytes, count)
    )


def _payload_equal(received: Any, sent: Any, where: str) -> None:
    if isinstance(sent, np.ndarray):
        _expect(
            isinstance(received, np.ndarray)
            and received.dtype == sent.dtype
            and received.shape == sent.shape
            and np.array_equal(received, sent),
            f"{where}: the array arrived different",
        )
    elif isinstance(sent, dict):
        _expect(isinstance(received, dict) and received.keys() == sent.keys(), f"{where}: keys")
        for key in sent:
            _payload_equal(received[key], sent[key], f"{where}[{key!r}]")
    elif isinstance(sent, list | tuple):
        _expect(type(received) is type(sent) and len(received) == len(sent), f"{where}: length")
        for i, (got, item) in enumerate(zip(received, sent, strict=True)):
            _payload_equal(got, item, f"{where}[{i}]")
    else:
        _expect(type(received) is type(sent) and received == sent, f"{where}: {received!r}")


def message_equal(received: Message, sent: Message) -> None:
    """Check that ``received`` is ``sent``, passed as it is or as equal values.

    :raises TransportCheckFailed: it differs, and where.
    """
    if received is sent:
        return
    _expect(type(received) is type(sent), f"{type(sent).__name__} arrived as {received!r}")
    for name in sent.__struct_fields__:
        _payload_equal(getattr(received, name), getattr(sent, name), name)


def _all_equal(received: Sequence[Message], sent: Sequence[Message]) -> None:
    _expect(len(received) == len(sent), f"{len(received)} of {len(sent)} messages arrived")
    for got, message in zip(received, sent, strict=True):
        message_equal(got, message)


async def _send_all(stream: MessageStream, messages: Iterable[Message]) -> None:
    for message in messages:
        await stream.send(message)


async def _receive_n(stream: MessageStream, n: int, into: list[Message]) -> None:
    for _ in range(n):
        into.append(await stream.receive())


async def _moving(
    *jobs: Callable[[], Coroutine[Any, Any, object]],
    streams: Sequence[MessageStream],
    seconds: float = 5,
) -> None:
    """Run ``jobs`` together; fail as soon as no byte moved for ``seconds`` (a deadlock fails
    fast, a slow machine does not fail a transfer that moves). Without byte reports, a bound."""
    moved = anyio.Event()

    def progress(_: object) -> None:
        moved.set()

    watched = False
    for stream in streams:
        watch = stream.extra(MessageStreamAttribute.watch_bytes, None)
        if watch is not None:
            watch(lambda: None, progress)
            watched = True
    async with anyio.create_task_group() as group:

        async def work() -> None:
            async with anyio.create_task_group() as inner:
                for job in jobs:
                    inner.start_soon(job)
            group.cancel_scope.cancel()

        group.start_soon(work)
        while True:
            with anyio.fail_after(seconds if watched else 60):
                await moved.wait()
            moved = anyio.Event()


# -- the checks ---------------------------------------------------------------------------------


async def order_both_ways(client: MessageStream, server: MessageStream) -> None:
    """200 small messages each way at once arrive in order."""
    up: list[Message] = [TaskAck(task_id=f"up-{n}") for n in range(200)]
    down: list[Message] = [TaskAck(task_id=f"down-{n}") for n in range(200)]
    at_server: list[Message] = []
    at_client: list[Message] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_send_all, client, up)
        group.start_soon(_send_all, server, down)
        group.start_soon(_receive_n, server, 200, at_server)
        group.start_soon(_receive_n, client, 200, at_client)
    _all_equal(at_server, up)
    _all_equal(at_client, down)


async def large_frame(client: MessageStream, server: MessageStream) -> None:
    """A 16 MiB task arrives whole and equal."""
    task = big_task("big-16", 16 * MiB)
    received: list[Message] = []
    async with anyio.create_task_group() as group:
        group.start_soon(client.send, task)
        group.start_soon(_receive_n, server, 1, received)
    _all_equal(received, [task])


async def mixed_sizes(client: MessageStream, server: MessageStream) -> None:
    """Large and small messages, arrays and bytes among them, arrive equal and in order."""
    rng = np.random.default_rng(7)
    messages: list[Message] = [
        Heartbeat(),
        big_task("mixed-16", 16 * MiB),
        TaskAck(task_id="mixed-16"),
        Result(
            task_id="mixed-16",
            return_code="OK",
            meta={"loss": 0.25},
            data={
                "delta": rng.standard_normal(MiB, dtype=np.float32),
                "blob": rng.bytes(300_000),
                "small": [np.float32(1.5), (1, "two"), b"\x00\x01"],
            },
        ),
        Log(key="loss", value=np.float64(0.125), step=4, task_id="mixed-16"),
        TaskAssign(task_id="tiny", task_name="validate", meta={}, data={"w": np.zeros(3)}),
        Heartbeat(),
    ]
    received: list[Message] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_send_all, client, messages)
        group.start_soon(_receive_n, server, len(messages), received)
    _all_equal(received, messages)


async def large_frames_both_ways(client: MessageStream, server: MessageStream) -> None:
    """16 MiB each way at once: neither side deadlocks waiting for the other to read."""
    up, down = big_task("up-16", 16 * MiB), big_task("down-16", 16 * MiB, count=2)
    at_server: list[Message] = []
    at_client: list[Message] = []
    await _moving(
        partial(client.send, up),
        partial(server.send, down),
        partial(_receive_n, server, 1, at_server),
        partial(_receive_n, client, 1, at_client),
        streams=[client, server],
    )
    _all_equal(at_server, [up])
    _all_equal(at_client, [down])


async def sends_at_once_in_order(client: MessageStream, server: MessageStream) -> None:
    """Messages sent at once (``send_batch_nowait``, where the stream declares it) and sent by
    ``send`` arrive in the order given, also those that could not go at once (too large, or the
    socket full), which the next ``send_batch`` sends first."""
    nowait = client.extra(MessageStreamAttribute.send_batch_nowait, None)
    send_batch = client.extra(MessageStreamAttribute.send_batch, None)
    if nowait is None or send_batch is None:
        return
    sent: list[Message] = [
        big_task(f"big-{n}", 2 * MiB, count=1) if n % 40 == 0 else Log(key="k", value=n, step=n)
        for n in range(400)
    ]
    received: list[Message] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_receive_n, server, len(sent), received)
        for n, message in enumerate(sent):
            if n % 3:
                nowait([message])  # what does not go now is kept for the next send_batch
            else:
                await client.send(message)
        await send_batch([])
    _all_equal(received, sent)


def _sender_message(sender: int, n: int) -> Log:
    size = 100_000 if n % 10 == 0 else 16  # some span many writes
    return Log(key=f"sender-{sender}", value=np.full(size, sender * 1000 + n), step=n)


async def concurrent_senders(client: MessageStream, server: MessageStream) -> None:
    """Four tasks sending on one stream: every message arrives intact, each sender's in order."""
    received: list[Message] = []

    async def sender(index: int) -> None:
        for n in range(50):
            await client.send(_sender_message(index, n))

    async with anyio.create_task_group() as group:
        for index in range(4):
            group.start_soon(sender, index)
        await _receive_n(server, 200, received)
    by_sender: dict[str, list[int]] = {}
    for message in received:
        if not isinstance(message, Log) or message.step is None:
            raise TransportCheckFailed(f"a sender's Log arrived as {message!r}")
        message_equal(message, _sender_message(int(message.key.split("-")[1]), message.step))
        by_sender.setdefault(message.key, []).append(message.step)
    _expect(
        by_sender == {f"sender-{index}": list(range(50)) for index in range(4)},
        "a sender's messages arrived out of order",
    )


async def _send_close_then_end(
    client: MessageStream, server: MessageStream, sent: list[Message]
) -> None:
    """``client`` sends ``sent`` and closes: all of it arrives at ``server``, then the end of the
    stream (and again: the end stays the end)."""
    received: list[Message] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_receive_n, server, len(sent), received)
        await _send_all(client, sent)
        await client.aclose()
    _all_equal(received, sent)
    for _ in range(2):
        try:
            message = await server.receive()
        except anyio.EndOfStream:
            continue
        raise TransportCheckFailed(f"expected the end of the stream, got {message!r}")


async def peer_close_delivers_then_ends(client: MessageStream, server: MessageStream) -> None:
    """After the peer sends and closes, everything it sent arrives, then `anyio.EndOfStream`."""
    sent: list[Message] = [TaskAck(task_id="a"), big_task("before-close", 4 * MiB), Heartbeat()]
    await _send_close_then_end(client, server, sent)


async def peer_close_with_unread(client: MessageStream, server: MessageStream) -> None:
    """A peer that closes with messages it never read still ends the stream cleanly."""
    await server.send(Heartbeat())  # the client never reads it
    await client.send(TaskAck(task_id="first"))
    message_equal(await server.receive(), TaskAck(task_id="first"))
    sent: list[Message] = [big_task("before-close", 4 * MiB), TaskAck(task_id="last")]
    await _send_close_then_end(client, server, sent)


async def own_close(client: MessageStream, server: MessageStream) -> None:
    """After this side closes, send and receive raise `anyio.ClosedResourceError`; closing again
    is harmless."""
    await server.send(Heartbeat())  # unread data must not matter
    await client.aclose()
    for operation in (partial(client.send, Heartbeat()), client.receive):
        try:
            await operation()
        except anyio.ClosedResourceError:
            continue
        raise TransportCheckFailed("a closed stream went on working")
    await client.aclose()


async def receive_waiting_on_own_close(client: MessageStream, server: MessageStream) -> None:
    """A receive waiting when this side closes raises `anyio.ClosedResourceError`."""
    outcome: list[BaseException] = []

    async def receive() -> None:
        try:
            await client.receive()
        except Exception as exc:  # checked below
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(receive)
        await anyio.wait_all_tasks_blocked()
        await client.aclose()
    _expect(
        len(outcome) == 1 and isinstance(outcome[0], anyio.ClosedResourceError),
        f"the waiting receive ended with {outcome!r}",
    )


async def send_to_closed_peer(client: MessageStream, server: MessageStream) -> None:
    """Sending to a peer that closed raises `anyio.BrokenResourceError`, sooner or later."""
    await server.aclose()
    for attempt in range(1000):
        try:
            await client.send(TaskAck(task_id=str(attempt)))
        except anyio.BrokenResourceError:
            return
    raise TransportCheckFailed("1,000 sends to a closed peer went through")


async def _cancel_a_blocked_send(
    client: MessageStream, server: MessageStream, outgoing: Iterable[Message]
) -> tuple[int | None, bool]:
    """Send to a peer that does not read until a send waits, cancel that send, and check that
    the connection is then either usable or cleanly closed. Returns how far the cancelled frame
    had gone (None without byte reports) and whether the cancellation hit a send."""
    # Sent after the cancellation; the padding completes a record or frame left cut short, so
    # that a corruption shows as an error rather than as a receiver waiting for more.
    after: list[Message] = [
        TaskAck(task_id="after-1"),
        Log(key="padding", value="p" * 100_000),
        TaskAck(task_id="after-2"),
    ]
    went: list[int] = []
    watch = client.extra(MessageStreamAttribute.watch_bytes, None)
    if watch is not None:
        watch(lambda: None, lambda progress: went.append(progress.done))
    scope = anyio.CancelScope()
    sender_done = anyio.Event()
    sent: list[Message] = []
    received: list[Message] = []
    errors: dict[str, BaseException] = {}

    async def sender() -> None:
        try:
            with scope:
                for message in outgoing:
                    went.clear()
                    await client.send(message)
                    sent.append(message)
        finally:
            sender_done.set()

    async def drain() -> None:
        try:
            while (message := await server.receive()) != after[-1]:
                received.append(message)
            received.append(message)
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            errors["receive"] = exc

    async with anyio.create_task_group() as group:
        group.start_soon(sender)
        await anyio.wait_all_tasks_blocked()  # the sender waits for a peer that does not read
        scope.cancel()
        group.start_soon(drain)  # reads while the cancelled send cleans up
        await sender_done.wait()
        try:
            await _send_all(client, after)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            errors["send"] = exc
    usable, closed = not errors, len(errors) == 2
    _expect(
        usable or closed,
        f"neither usable nor cleanly closed after a cancelled send: {errors!r}, "
        f"{len(received)} of {len(sent)} message(s) arrived",
    )
    # Closed: what arrived is a prefix of what went whole; nothing after the cut arrives.
    _all_equal(received, [*sent, *after] if usable else sent[: len(received)])
    return (went[-1] if went else None), scope.cancelled_caught


async def send_cancelled_mid_frame(client: MessageStream, server: MessageStream) -> None:
    """A send cancelled in the middle of a 64 MiB frame leaves the connection usable or cleanly
    closed, never corrupt."""
    went, cancelled = await _cancel_a_blocked_send(
        client, server, [big_task("cancelled-64", 64 * MiB, count=1)]
    )
    if went is not None:  # a stream that reports bytes must have been cut inside the frame
        _expect(cancelled and 0 < went < 64 * MiB, f"the cut came at {went} of {64 * MiB} bytes")


async def send_cancelled_peer_not_reading(client: MessageStream, server: MessageStream) -> None:
    """A send cancelled once the peer stopped reading leaves the connection sound."""

    def filler(n: int) -> Log:  # 200 kB inside the header: one frame, one write
        return Log(key="filler", value=f"{n:08d}" * 25_000, step=n)

    _, cancelled = await _cancel_a_blocked_send(client, server, map(filler, range(500)))
    _expect(
        cancelled,
        "no send waited for a peer that does not read, in 100 MB: the transport holds what the "
        "peer does not read in memory (no back-pressure)",
    )


async def receive_cancelled_mid_frame(client: MessageStream, server: MessageStream) -> None:
    """Receives cancelled at 8, 24 and 40 MiB into a 64 MiB frame lose nothing."""
    big = big_task("received-64", 64 * MiB, count=1)
    after: list[Message] = [TaskAck(task_id="tail"), big_task("filler", MiB, count=1)]
    cut_at = [8 * MiB, 24 * MiB, 40 * MiB]
    received: list[Message] = []
    watch = server.extra(MessageStreamAttribute.watch_bytes, None)
    async with anyio.create_task_group() as group:
        group.start_soon(_send_all, client, [big, *after])
        if watch is not None:
            while not received:
                with anyio.CancelScope() as scope:

                    def cut(progress: Any, scope: anyio.CancelScope = scope) -> None:
                        if cut_at and progress.done >= cut_at[0]:
                            cut_at.pop(0)
                            scope.cancel()

                    watch(lambda: None, cut)
                    received.append(await server.receive())
            _expect(not cut_at, f"the frame arrived before the cuts at {cut_at}")
        else:  # whole objects: cancel a receive before one is there
            with anyio.CancelScope() as scope:
                scope.cancel()
                await server.receive()
            received.append(await server.receive())
        await _receive_n(server, len(after), received)
    _all_equal(received, [big, *after])


CHECKS: dict[str, Check] = {
    check.__name__: check
    for check in (
        order_both_ways,
        large_frame,
        mixed_sizes,
        large_frames_both_ways,
        concurrent_senders,
        sends_at_once_in_order,
        peer_close_delivers_then_ends,
        peer_close_with_unread,
        own_close,
        receive_waiting_on_own_close,
        send_to_closed_peer,
        send_cancelled_mid_frame,
        send_cancelled_peer_not_reading,
        receive_cancelled_mid_frame,
    )
}
"""The checks by name, each run on a fresh connection; their docstrings say what they ask."""


# -- running them -------------------------------------------------------------------------------


class TransportPairs:
    """Connections to a listener of the transport under test, both ends in hand: `pair` opens one.

    Use it for checks of your own beside `check_transport` (a TLS transport's trust rules,
    say)::

        async with transport_pairs("tls://127.0.0.1:0", listen_ssl_context=...) as pairs:
            client, server = await pairs.pair()
            stranger = await pairs.connect(ssl_context=untrusting)  # raises TransportError
    """

    def __init__(self, url: str, connect_ssl_context: ssl.SSLContext | None, limits: Limits | None):
        self.url = url
        """The URL the listener reports (the real port when port 0 was asked for)."""
        self._connect_ssl_context = connect_ssl_context
        self._limits = limits
        self._accepted_send, self._accepted = anyio.create_memory_object_stream[MessageStream](
            math.inf
        )
        self._release = anyio.Event()
        self._streams: list[MessageStream] = []  # closed at the end

    async def _handle(self, stream: MessageStream) -> None:
        # Kept open until the end: a transport may close a stream when its handler returns.
        self._streams.append(stream)
        self._accepted_send.send_nowait(stream)
        await self._release.wait()

    async def connect(self, *, ssl_context: ssl.SSLContext | None = None) -> MessageStream:
        """A new client end (with ``ssl_context`` instead of the usual one, when given).

        :raises TransportError: as the transport's connector does.
        """
        context = ssl_context if ssl_context is not None else self._connect_ssl_context
        with anyio.fail_after(10):
            stream = await connector_for(
                self.url, ssl_context=context, limits=self._limits
            ).connect()
        self._streams.append(stream)
        return stream

    async def accept(self) -> MessageStream:
        """The server end of the next connection the listener accepted."""
        with anyio.fail_after(10):
            return await self._accepted.receive()

    async def pair(self) -> Pair:
        """A new connection: ``(client, server)``."""
        client = await self.connect()
        return client, await self.accept()

    def pending(self) -> int:
        """Connections accepted but not taken by `accept` yet."""
        return self._accepted.statistics().current_buffer_used


@asynccontextmanager
async def transport_pairs(
    url: str,
    *,
    listen_ssl_context: ssl.SSLContext | None = None,
    connect_ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[TransportPairs]:
    """A listener at ``url`` serving in a task group, and `TransportPairs` to connect to it; at
    the end every connection and the listener are closed."""
    listener = await create_listener(url, ssl_context=listen_ssl_context, limits=limits)
    pairs = TransportPairs(listener.url, connect_ssl_context, limits)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, pairs._handle, group)
            try:
                yield pairs
            finally:
                pairs._release.set()
                with anyio.fail_after(15, shield=True):
                    for stream in pairs._streams:
                        await stream.aclose()
                    await listener.aclose()
    finally:
        pairs._accepted_send.close()
        pairs._accepted.close()


async def check_nobody_listening(
    url: str,
    *,
    listen_ssl_context: ssl.SSLContext | None = None,
    connect_ssl_context: ssl.SSLContext | None = None,
) -> TransportError:
    """Connecting where a listener was, and is no more, is a `TransportError` naming the URL.

    :returns: the error, for a caller that checks what it says.
    :raises TransportCheckFailed: the connect succeeded, or failed otherwise.
    """
    listener = await create_listener(url, ssl_context=listen_ssl_context)
    bound = listener.url
    await listener.aclose()
    connector = connector_for(bound, ssl_context=connect_ssl_context)
    try:
        with anyio.fail_after(10):
            stream = await connector.connect()
    except TransportError as exc:
        _expect(bound in str(exc), f"the error does not name {bound}: {exc}")
        return exc
    await stream.aclose()
    raise TransportCheckFailed(f"a connection to {bound} succeeded with nobody listening")


async def check_transport(
    url: str,
    *,
    listen_ssl_context: ssl.SSLContext | None = None,
    connect_ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
    checks: Iterable[str] | None = None,
    timeout: float = 60.0,
) -> None:
    """Run the conformance checks (`CHECKS`, or those named) over the transport of ``url``,
    each on a fresh connection, on the running event loop; then check that connecting where
    nobody listens fails cleanly.

    :param url: where to listen (``tcp://127.0.0.1:0``, say); the checks connect to the URL
        the listener reports.
    :raises TransportCheckFailed: a check failed; the message says which rule, and how.
    :raises KeyError: a name in ``checks`` is not one of `CHECKS`.
    """
    names = list(CHECKS) if checks is None else list(checks)
    selected = [(name, CHECKS[name]) for name in names]
    failed: TransportCheckFailed | None = None  # raised out here: not in an exception group
    options = {"listen_ssl_context": listen_ssl_context, "connect_ssl_context": connect_ssl_context}
    async with transport_pairs(url, limits=limits, **options) as pairs:
        for name, check in selected:
            client, server = await pairs.pair()
            try:
                with anyio.fail_after(timeout):
                    await check(client, server)
            except TransportCheckFailed as exc:
                failed = TransportCheckFailed(f"{name}: {exc}")
                failed.__cause__ = exc
            except TimeoutError as exc:
                failed = TransportCheckFailed(f"{name}: not done within {timeout:g} s")
                failed.__cause__ = exc
            if failed is not None:
                break
    if failed is not None:
        raise failed
    if checks is None:
        await check_nobody_listening(
            url, listen_ssl_context=listen_ssl_context, connect_ssl_context=connect_ssl_context
        )
