"""Every transport keeps anyio's stream semantics: one module run against each of them.

The ``harness`` fixture listens on a transport (memory, tcp, tcp over IPv6, unix, tls, mutual
tls) and accepts connections; ``pair`` is one connection as ``(client, server)``. Each test runs
on every transport and on both event loops.
"""

from __future__ import annotations

import itertools
import math
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import trustme

from flare_agent_async.exceptions import TransportError
from flare_agent_async.protocol import Heartbeat, Log, Message, Result, TaskAck, TaskAssign
from flare_agent_async.transports import (
    FramedMessageStream,
    MessageStream,
    Progress,
    connector_for,
    create_listener,
)

pytestmark = pytest.mark.anyio

MiB = 2**20


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


NAMES = ("memory", "tcp", "tcp6", "unix", "tls", "mtls")
TLS = ("tls", "mtls")
SOCKETS = ("tcp", "tcp6", "unix", "tls", "mtls")
_NO_IPV6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


def transports() -> list[Any]:
    """Every transport, for ``parametrize("transport", ..., indirect=True)``."""
    return [
        pytest.param(name, marks=[_NO_IPV6] if name == "tcp6" else [], id=name) for name in NAMES
    ]


# -- certificates and transports --------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: trustme.CA
    site: trustme.LeafCert
    agent: trustme.LeafCert

    def site_context(self, *, mutual: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.site.configure_cert(context)
        if mutual:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context

    def agent_context(self, *, certificate: trustme.LeafCert | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        if certificate is not None:
            certificate.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca = trustme.CA()
    return PKI(ca, ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("agent-1.example"))


@dataclass
class Transport:
    name: str
    listen_url: str
    listen_options: dict[str, Any] = field(default_factory=dict)
    connect_options: dict[str, Any] = field(default_factory=dict)
    refused: str = ""
    """What a connection error says when nobody listens (a regular expression)."""

    @property
    def is_memory(self) -> bool:
        return self.name == "memory"


@pytest.fixture
def unix_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for a socket file whose path fits in AF_UNIX's ~107 bytes."""
    if len(str(tmp_path / "site.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(params=transports())
def transport(request: pytest.FixtureRequest) -> Transport:
    name: str = request.param
    if name == "memory":
        return Transport(name, "memory://", refused="nothing listens at memory://")
    if name == "tcp":
        return Transport(name, "tcp://127.0.0.1:0", refused="cannot connect to .*refused")
    if name == "tcp6":
        return Transport(name, "tcp://[::1]:0", refused="cannot connect to .*refused")
    if name == "unix":
        path = request.getfixturevalue("unix_dir") / "site.sock"
        return Transport(
            name, f"unix://{path}", refused="cannot connect to .*No such file or directory"
        )
    pki: PKI = request.getfixturevalue("pki")
    mutual = name == "mtls"
    return Transport(
        name,
        "tls://127.0.0.1:0",
        listen_options={"ssl_context": pki.site_context(mutual=mutual)},
        connect_options={
            "ssl_context": pki.agent_context(certificate=pki.agent if mutual else None)
        },
        refused="cannot connect to .*refused",
    )


# -- the harness: a listener serving in a task group ------------------------------------------


class Harness:
    """A listener on one transport; `connect` opens client ends, `accept` returns server ends."""

    def __init__(self, transport: Transport, url: str) -> None:
        self.transport = transport
        self.url = url
        self.streams: list[MessageStream] = []  # everything to close at the end
        self.accepted_send, self._accepted = anyio.create_memory_object_stream[MessageStream](
            math.inf
        )

    async def connect(self, **options: Any) -> MessageStream:
        connector = connector_for(self.url, **(options or self.transport.connect_options))
        with anyio.fail_after(10):
            stream = await connector.connect()
        self.streams.append(stream)
        return stream

    async def accept(self) -> MessageStream:
        with anyio.fail_after(10):
            return await self._accepted.receive()

    def pending(self) -> int:
        """Connections served but not taken by `accept` yet."""
        return self._accepted.statistics().current_buffer_used

    async def pair(self) -> tuple[MessageStream, MessageStream]:
        client = await self.connect()
        return client, await self.accept()

    def close_queue(self) -> None:
        self.accepted_send.close()
        self._accepted.close()


@pytest.fixture
async def harness(transport: Transport, anyio_backend: str) -> AsyncIterator[Harness]:
    listener = await create_listener(transport.listen_url, **transport.listen_options)
    harness = Harness(transport, listener.url)
    release = anyio.Event()

    async def handler(stream: MessageStream) -> None:
        # Kept alive until the test ends: a transport may close a stream when its handler returns.
        harness.streams.append(stream)
        harness.accepted_send.send_nowait(stream)
        await release.wait()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, handler, group)
            try:
                yield harness
            finally:
                release.set()
                with anyio.fail_after(15, shield=True):
                    for stream in harness.streams:
                        await stream.aclose()
                    await listener.aclose()
    finally:
        harness.close_queue()


@pytest.fixture
async def pair(harness: Harness) -> tuple[MessageStream, MessageStream]:
    return await harness.pair()


# -- messages ---------------------------------------------------------------------------------


@cache
def _arrays(total_bytes: int, count: int) -> dict[str, np.ndarray]:
    """``count`` float32 arrays of ``total_bytes`` together; every value distinct and exact."""
    n = total_bytes // 4 // count
    assert n * count <= 2**24  # float32 holds these integers exactly
    return {f"layer{i}": np.arange(i * n, (i + 1) * n, dtype=np.float32) for i in range(count)}


def big_task(task_id: str, total_bytes: int, *, count: int = 4) -> TaskAssign:
    return TaskAssign(
        task_id=task_id,
        task_name="train",
        meta={"round": 3, "tag": task_id},
        data=_arrays(total_bytes, count),
    )


def assert_payload_equal(received: Any, sent: Any, where: str = "") -> None:
    if isinstance(sent, np.ndarray):
        assert isinstance(received, np.ndarray), where
        assert received.dtype == sent.dtype, where
        assert received.shape == sent.shape, where
        assert np.array_equal(received, sent), f"{where}: array content differs"
    elif isinstance(sent, dict):
        assert isinstance(received, dict), where
        assert received.keys() == sent.keys(), where
        for key in sent:
            assert_payload_equal(received[key], sent[key], f"{where}[{key!r}]")
    elif isinstance(sent, list | tuple):
        assert type(received) is type(sent), where
        assert len(received) == len(sent), where
        for i, (r, s) in enumerate(zip(received, sent, strict=True)):
            assert_payload_equal(r, s, f"{where}[{i}]")
    else:
        assert type(received) is type(sent), where
        assert received == sent, where


def assert_message_equal(received: Message, sent: Message, *, memory: bool) -> None:
    if memory:
        assert received is sent  # objects pass as they are
        return
    assert type(received) is type(sent)
    for name in sent.__struct_fields__:
        assert_payload_equal(getattr(received, name), getattr(sent, name), name)


async def send_all(stream: MessageStream, messages: Sequence[Message]) -> None:
    for message in messages:
        await stream.send(message)


async def receive_n(stream: MessageStream, n: int, into: list[Message]) -> None:
    for _ in range(n):
        into.append(await stream.receive())


class StallGuard:
    """Fails a transfer as soon as no byte has moved for a while: a deadlock fails in seconds,
    and a slow machine does not fail a transfer that is moving."""

    def __init__(self, *streams: MessageStream, seconds: float = 1.5) -> None:
        self.seconds = seconds
        self._moved = anyio.Event()
        for stream in streams:
            if isinstance(stream, FramedMessageStream):
                stream.on_progress = self._progress

    def _progress(self, _: Progress) -> None:
        self._moved.set()

    async def run(self, *jobs: Callable[[], Coroutine[Any, Any, object]]) -> None:
        async with anyio.create_task_group() as group:

            async def work() -> None:
                async with anyio.create_task_group() as inner:
                    for job in jobs:
                        inner.start_soon(job)
                group.cancel_scope.cancel()

            group.start_soon(work)
            while True:
                with anyio.fail_after(self.seconds, reason="no byte moved: deadlocked"):
                    await self._moved.wait()
                self._moved = anyio.Event()


# -- 1. ordering ------------------------------------------------------------------------------


async def test_small_messages_arrive_in_order_both_ways_at_once(
    pair: tuple[MessageStream, MessageStream],
) -> None:
    client, server = pair
    up: list[Message] = [TaskAck(task_id=f"up-{n}") for n in range(200)]
    down: list[Message] = [TaskAck(task_id=f"down-{n}") for n in range(200)]
    at_server: list[Message] = []
    at_client: list[Message] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(send_all, client, up)
            group.start_soon(send_all, server, down)
            group.start_soon(receive_n, server, 200, at_server)
            group.start_soon(receive_n, client, 200, at_client)
    assert at_server == up
    assert at_client == down


# -- 2. large frames --------------------------------------------------------------------------


async def test_a_16_mib_task_arrives_equal(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    task = big_task("big-16", 16 * MiB)
    received: list[Message] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(client.send, task)
            group.start_soon(receive_n, server, 1, received)
    assert_message_equal(received[0], task, memory=transport.is_memory)
    assert sum(a.nbytes for a in received[0].data.values()) == 16 * MiB  # type: ignore[union-attr]


async def test_large_and_small_messages_mixed_arrive_equal_and_in_order(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
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
                "delta": rng.standard_normal(MiB, dtype=np.float32),  # 4 MiB
                "blob": rng.bytes(300_000),  # large bytes travel out of band too
                "small": [np.float32(1.5), (1, "two"), b"\x00\x01"],
            },
        ),
        Log(key="loss", value=np.float64(0.125), step=4, task_id="mixed-16"),
        TaskAssign(task_id="tiny", task_name="validate", meta={}, data={"w": np.zeros(3)}),
        Heartbeat(),
    ]
    received: list[Message] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(send_all, client, messages)
            group.start_soon(receive_n, server, len(messages), received)
    assert len(received) == len(messages)
    for got, sent in zip(received, messages, strict=True):
        assert_message_equal(got, sent, memory=transport.is_memory)


@pytest.mark.parametrize("transport", transports(), indirect=True)
async def test_large_frames_both_ways_at_once(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    up = big_task("up-16", 16 * MiB)
    down = big_task("down-16", 16 * MiB, count=2)
    at_server: list[Message] = []
    at_client: list[Message] = []
    with anyio.fail_after(30):
        await StallGuard(client, server).run(
            partial(client.send, up),
            partial(server.send, down),
            partial(receive_n, server, 1, at_server),
            partial(receive_n, client, 1, at_client),
        )
    assert_message_equal(at_server[0], up, memory=transport.is_memory)
    assert_message_equal(at_client[0], down, memory=transport.is_memory)


# -- 3. concurrent senders --------------------------------------------------------------------


def _sender_message(sender: int, n: int) -> Log:
    size = 100_000 if n % 10 == 0 else 16  # some span many writes, and the staging buffer
    return Log(
        key=f"sender-{sender}",
        value=np.full(size, sender * 1000 + n, dtype=np.int64),
        step=n,
    )


async def test_concurrent_senders_on_one_stream_each_keep_their_order(
    pair: tuple[MessageStream, MessageStream],
) -> None:
    client, server = pair
    received: list[Message] = []

    async def sender(index: int) -> None:
        for n in range(50):
            await client.send(_sender_message(index, n))

    with anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            for index in range(4):
                group.start_soon(sender, index)
            await receive_n(server, 200, received)

    by_sender: dict[str, list[int]] = {}
    for message in received:
        assert isinstance(message, Log)
        assert message.step is not None
        expected = _sender_message(int(message.key.split("-")[1]), message.step)
        assert_message_equal(message, expected, memory=False)  # intact, whatever the transport
        by_sender.setdefault(message.key, []).append(message.step)
    assert by_sender == {f"sender-{index}": list(range(50)) for index in range(4)}


# -- 4. close semantics -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", transports(), indirect=True)
async def test_after_the_peer_closes_everything_sent_arrives_then_end_of_stream(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    sent: list[Message] = [TaskAck(task_id="a"), big_task("before-close", 4 * MiB), Heartbeat()]
    received: list[Message] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(receive_n, server, len(sent), received)
            await send_all(client, sent)
            await client.aclose()
        for got, message in zip(received, sent, strict=True):
            assert_message_equal(got, message, memory=transport.is_memory)
        with pytest.raises(anyio.EndOfStream):
            await server.receive()
        with pytest.raises(anyio.EndOfStream):  # and again: the end stays the end
            await server.receive()


@pytest.mark.parametrize("transport", transports(), indirect=True)
async def test_a_peer_that_closes_with_messages_unread_still_ends_the_stream_cleanly(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    await server.send(Heartbeat())  # the client never reads it
    await client.send(TaskAck(task_id="first"))
    sent: list[Message] = [big_task("before-close", 4 * MiB), TaskAck(task_id="last")]
    received: list[Message] = []
    with anyio.fail_after(10):
        assert await server.receive() == TaskAck(task_id="first")  # the heartbeat is there
        async with anyio.create_task_group() as group:
            group.start_soon(receive_n, server, len(sent), received)
            await send_all(client, sent)
            await client.aclose()
        for got, message in zip(received, sent, strict=True):
            assert_message_equal(got, message, memory=transport.is_memory)
        with pytest.raises(anyio.EndOfStream):
            await server.receive()


async def test_after_this_side_closes_send_and_receive_raise_closed(
    pair: tuple[MessageStream, MessageStream],
) -> None:
    client, server = pair
    await server.send(Heartbeat())  # unread data must not matter
    await client.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await client.send(Heartbeat())
    with pytest.raises(anyio.ClosedResourceError):
        await client.receive()
    await client.aclose()  # closing again is harmless


async def test_a_receive_waiting_when_this_side_closes_raises_closed(
    pair: tuple[MessageStream, MessageStream],
) -> None:
    client, _ = pair
    outcome: list[Exception] = []

    async def receive() -> None:
        try:
            await client.receive()
        except Exception as exc:  # recorded and checked below
            outcome.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            await client.aclose()
    assert len(outcome) == 1
    assert isinstance(outcome[0], anyio.ClosedResourceError), repr(outcome[0])


async def test_sending_to_a_peer_that_closed_eventually_raises_broken(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    await server.aclose()
    attempts = 0
    with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):  # noqa: PT012
        while attempts < 1000:
            attempts += 1
            await client.send(TaskAck(task_id=str(attempts)))
    if transport.is_memory:
        assert attempts == 1
    assert attempts < 1000


# -- 5. and 6. cancellation in the middle of a large frame ------------------------------------


async def cancel_a_blocked_send(
    client: MessageStream, server: MessageStream, outgoing: Iterable[Message], *, memory: bool
) -> tuple[int | None, bool]:
    """Send ``outgoing`` to a peer that does not read until a send waits, cancel that send, and
    check that the connection is then either usable or cleanly closed, never anything else.

    Returns how far the cancelled frame had gone (None when nothing reports it) and whether the
    cancellation hit a send.
    """
    # Sent after the cancellation; the padding completes any record or frame left cut short, so
    # that a corruption shows as an error rather than as a receiver waiting for more.
    after: list[Message] = [
        TaskAck(task_id="after-1"),
        Log(key="padding", value="p" * 100_000),
        TaskAck(task_id="after-2"),
    ]
    went: list[int] = []
    if isinstance(client, FramedMessageStream):
        client.on_progress = lambda progress: went.append(progress.done)
    scope = anyio.CancelScope()
    sender_done = anyio.Event()
    sent: list[Message] = []
    received: list[Message] = []
    receive_error: BaseException | None = None
    send_error: BaseException | None = None

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
        nonlocal receive_error
        try:
            while True:
                message = await server.receive()
                received.append(message)
                if message == after[-1]:
                    return
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            receive_error = exc

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(sender)
            await anyio.wait_all_tasks_blocked()  # the sender waits for a peer that does not read
            scope.cancel()
            group.start_soon(drain)  # reads while the cancelled send cleans up
            await sender_done.wait()
            try:
                await send_all(client, after)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                send_error = exc

    usable = send_error is None and receive_error is None
    closed = send_error is not None and receive_error is not None
    assert usable != closed, (
        f"neither usable nor cleanly closed: the later send raised {send_error!r}, the "
        f"receiver raised {receive_error!r} after {len(received)} of {len(sent)} message(s)"
    )
    # Closed: what arrived is a prefix of what went whole; nothing after the cut arrives.
    expected = [*sent, *after] if usable else sent[: len(received)]
    assert len(received) == len(expected)
    for got, message in zip(received, expected, strict=True):
        assert_message_equal(got, message, memory=memory)
    return (went[-1] if went else None), scope.cancelled_caught


async def test_a_send_cancelled_mid_frame_leaves_the_connection_usable_or_cleanly_closed(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    went, cancelled = await cancel_a_blocked_send(
        client, server, [big_task("cancelled-64", 64 * MiB, count=1)], memory=transport.is_memory
    )
    if not transport.is_memory:  # memory takes the whole message at once
        assert cancelled, "the send was meant to be cut in the middle of the frame"
        assert went is not None and 0 < went < 64 * MiB


def _filler(n: int) -> Log:
    # 200 kB inside the header: the whole frame is one write (no out-of-band buffers)
    return Log(key="filler", value=f"{n:08d}" * 25_000, step=n)


@pytest.mark.parametrize("transport", transports(), indirect=True)
async def test_a_send_cancelled_once_the_peer_stopped_reading_leaves_the_connection_sound(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    _, cancelled = await cancel_a_blocked_send(
        client, server, map(_filler, itertools.count()), memory=transport.is_memory
    )
    assert cancelled


@pytest.mark.parametrize("transport", transports(), indirect=True)
async def test_a_receive_cancelled_mid_frame_loses_nothing(
    pair: tuple[MessageStream, MessageStream], transport: Transport
) -> None:
    client, server = pair
    big = big_task("received-64", 64 * MiB, count=1)
    # What follows the big frame: a lost byte shows as a wrong array, not as a hang.
    after: list[Message] = [TaskAck(task_id="tail"), big_task("filler", MiB, count=1)]
    cut_at = [8 * MiB, 24 * MiB, 40 * MiB]  # where a receive is cancelled, in frame bytes
    cuts: list[int] = []
    received: list[Message] = []

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(send_all, client, [big, *after])
            if isinstance(server, FramedMessageStream):
                while not received:
                    with anyio.CancelScope() as scope:

                        def on_progress(
                            progress: Progress, scope: anyio.CancelScope = scope
                        ) -> None:
                            if cut_at and progress.done >= cut_at[0]:
                                cuts.append(cut_at.pop(0))
                                scope.cancel()

                        server.on_progress = on_progress
                        received.append(await server.receive())
                assert cuts == [8 * MiB, 24 * MiB, 40 * MiB]
            else:  # memory passes whole objects: cancel a receive before one is there
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await server.receive()
                assert scope.cancelled_caught
                received.append(await server.receive())
            await receive_n(server, len(after), received)
    expected: list[Message] = [big, *after]
    for got, sent in zip(received, expected, strict=True):
        assert_message_equal(got, sent, memory=transport.is_memory)


# -- 7. nobody listening ----------------------------------------------------------------------


async def test_connecting_where_nobody_listens_is_a_transport_error(
    transport: Transport, anyio_backend: str
) -> None:
    listener = await create_listener(transport.listen_url, **transport.listen_options)
    url = listener.url
    await listener.aclose()
    connector = connector_for(url, **transport.connect_options)
    with anyio.fail_after(10), pytest.raises(TransportError, match=transport.refused) as caught:
        await connector.connect()
    assert url in str(caught.value)


# -- 8. TLS: trust and client certificates ----------------------------------------------------


@pytest.mark.parametrize("transport", ["tls", "mtls"], indirect=True)
async def test_a_client_that_does_not_trust_the_site_fails_at_the_handshake(
    harness: Harness, pki: PKI
) -> None:
    stranger = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    stranger.configure_trust(context)
    if harness.transport.name == "mtls":
        pki.agent.configure_cert(context)
    with pytest.raises(TransportError, match=r"(?i)handshake.*certificate") as caught:
        await harness.connect(ssl_context=context)
    assert harness.url in str(caught.value)

    client, server = await harness.pair()  # the listener goes on serving
    await client.send(Heartbeat())
    assert await server.receive() == Heartbeat()
    assert harness.pending() == 0


@pytest.mark.parametrize("transport", ["mtls"], indirect=True)
@pytest.mark.parametrize("credential", ["none", "untrusted"])
async def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    harness: Harness, pki: PKI, credential: str
) -> None:
    context = pki.agent_context()
    if credential == "untrusted":
        trustme.CA().issue_cert("agent-1.example").configure_cert(context)
    try:
        stream = await harness.connect(ssl_context=context)
    except TransportError:
        pass  # refused during the handshake
    else:  # TLS 1.3: the site checks the client's certificate after the client is done
        with anyio.fail_after(10):
            try:
                await stream.send(Heartbeat())
            except anyio.BrokenResourceError:
                pass
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()

    client, server = await harness.pair()  # the listener goes on serving good clients
    await server.send(Heartbeat())
    assert await client.receive() == Heartbeat()
    await client.send(TaskAck(task_id="t"))
    assert await server.receive() == TaskAck(task_id="t")
    assert harness.pending() == 0  # the refused client never reached the handler
