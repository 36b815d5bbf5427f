"""Every transport keeps anyio's stream semantics: the conformance suite that
`flare_agent_async.testing.check_transport` exports for plugins, run against each built-in
transport (memory, tcp, tcp over IPv6, unix, tls, mutual tls) on both event loops, one check per
test; then what is particular to TLS.
"""

from __future__ import annotations

import itertools
import re
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

from flare_agent_async.exceptions import TransportError
from flare_agent_async.protocol import Heartbeat, Message, TaskAck
from flare_agent_async.testing import (
    CHECKS,
    TransportCheckFailed,
    TransportPairs,
    check_nobody_listening,
    check_transport,
    transport_pairs,
)
from flare_agent_async.transports import (
    MemoryConnector,
    MemoryListener,
    MessageListener,
    MessageStream,
    Scheme,
    TransportOptions,
    register_scheme,
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


@pytest.fixture
async def pairs(transport: Transport, anyio_backend: str) -> AsyncIterator[TransportPairs]:
    """Connections to a listener on the transport, as plugin authors get them."""
    async with transport_pairs(
        transport.listen_url,
        listen_ssl_context=transport.listen_options.get("ssl_context"),
        connect_ssl_context=transport.connect_options.get("ssl_context"),
    ) as pairs:
        yield pairs


# -- the conformance suite, every check on every transport --------------------------------------


@pytest.mark.parametrize("check", list(CHECKS))
async def test_every_transport_passes_the_conformance_suite(
    transport: Transport, check: str, anyio_backend: str
) -> None:
    await check_transport(
        transport.listen_url,
        listen_ssl_context=transport.listen_options.get("ssl_context"),
        connect_ssl_context=transport.connect_options.get("ssl_context"),
        checks=[check],
    )


async def test_connecting_where_nobody_listens_is_a_transport_error(
    transport: Transport, anyio_backend: str
) -> None:
    error = await check_nobody_listening(
        transport.listen_url,
        listen_ssl_context=transport.listen_options.get("ssl_context"),
        connect_ssl_context=transport.connect_options.get("ssl_context"),
    )
    assert re.search(transport.refused, str(error)), error


async def test_a_transport_that_breaks_a_rule_fails_the_suite_saying_which(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flare_agent_async.transports as transports

    monkeypatch.setattr(transports, "_schemes", dict(transports._schemes))  # registered here only

    class Forgetful(MemoryConnector):
        """Loses every tenth message it sends."""

        async def connect(self) -> MessageStream:
            stream = await super().connect()
            sent = itertools.count()
            send = stream.send

            async def forgetful_send(message: Message) -> None:
                if next(sent) % 10 != 9:
                    await send(message)

            stream.send = forgetful_send  # type: ignore[method-assign]
            return stream

    class ForgetfulListener(MemoryListener):
        @property
        def url(self) -> str:
            return super().url.replace("memory://", "forgetful://")

    def memory_url(url: str) -> str:
        return url.replace("forgetful://", "memory://")

    async def listen(url: str, options: TransportOptions) -> MessageListener:
        return ForgetfulListener(memory_url(url))

    register_scheme(
        "forgetful", Scheme(lambda url, _: Forgetful(memory_url(url)), listen, frozenset())
    )
    with pytest.raises(TransportCheckFailed, match="order_both_ways"):
        await check_transport("forgetful://", checks=["order_both_ways"], timeout=2)


# -- 8. TLS: trust and client certificates ----------------------------------------------------


@pytest.mark.parametrize("transport", ["tls", "mtls"], indirect=True)
async def test_a_client_that_does_not_trust_the_site_fails_at_the_handshake(
    pairs: TransportPairs, transport: Transport, pki: PKI
) -> None:
    stranger = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    stranger.configure_trust(context)
    if transport.name == "mtls":
        pki.agent.configure_cert(context)
    with pytest.raises(TransportError, match=r"(?i)handshake.*certificate") as caught:
        await pairs.connect(ssl_context=context)
    assert pairs.url in str(caught.value)

    client, server = await pairs.pair()  # the listener goes on serving
    await client.send(Heartbeat())
    assert await server.receive() == Heartbeat()
    assert pairs.pending() == 0


@pytest.mark.parametrize("transport", ["mtls"], indirect=True)
@pytest.mark.parametrize("credential", ["none", "untrusted"])
async def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    pairs: TransportPairs, pki: PKI, credential: str
) -> None:
    context = pki.agent_context()
    if credential == "untrusted":
        trustme.CA().issue_cert("agent-1.example").configure_cert(context)
    try:
        stream = await pairs.connect(ssl_context=context)
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

    client, server = await pairs.pair()  # the listener goes on serving good clients
    await server.send(Heartbeat())
    assert await client.receive() == Heartbeat()
    await client.send(TaskAck(task_id="t"))
    assert await server.receive() == TaskAck(task_id="t")
    assert pairs.pending() == 0  # the refused client never reached the handler
