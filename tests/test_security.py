"""Who gets in: shared-secret authentication both ways, TLS and mutual TLS."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import anyio
import pytest
import trustme

from flare_agent_async import (
    AsyncFlareAgent,
    ConnectionRejected,
    FlareSite,
    RemoteProtocolError,
    TaskResult,
    TransportError,
)
from flare_agent_async.protocol import PROTOCOL_VERSION, Hello, agent_proof, site_proof, verify
from flare_agent_async.tls import client_context, server_context

pytestmark = pytest.mark.anyio

OK = TaskResult({}, {"ok": True})


async def run_one_task(site: FlareSite, agent: AsyncFlareAgent) -> TaskResult:
    async with anyio.create_task_group() as group:
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task(agent.agent_id, "train", {"x": 1}))

        group.start_soon(run)
        task = await agent.get_task(timeout=5)
        assert task is not None
        assert await agent.submit_result(OK)
    return results[0]


# -- shared secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [b"s3cret-bytes", "s3cret-text"])
async def test_a_shared_secret_lets_the_agent_in(secret: bytes | str) -> None:
    async with FlareSite("site-1", secret=secret) as site:
        url = await site.listen("memory://")
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1", secret=secret) as agent:
            assert (await run_one_task(site, agent)).data == {"ok": True}
        assert site.failed_authentications == 0


async def test_a_wrong_secret_is_rejected_without_saying_which_part_was_wrong() -> None:
    async with FlareSite("site-1", secret=b"right") as site:
        url = await site.listen("memory://")
        agent = AsyncFlareAgent(url, agent_id="a1", site_name="site-1", secret=b"wrong")
        with pytest.raises(ConnectionRejected) as info:
            await agent.start()
        assert info.value.reason == "authentication failed"
        assert (site.failed_authentications, site.rejected_hellos) == (1, 1)
        assert site.agents == frozenset()


async def test_an_agent_without_the_secret_is_told_it_needs_one() -> None:
    async with FlareSite("site-1", secret=b"right") as site:
        url = await site.listen("memory://")
        agent = AsyncFlareAgent(url, agent_id="a1", site_name="site-1")
        with pytest.raises(ConnectionRejected, match="requires a shared secret"):
            await agent.start()
        assert site.failed_authentications == 1


async def test_an_agent_with_a_secret_refuses_a_site_that_cannot_prove_it() -> None:
    async with FlareSite("site-1") as site:  # an impostor: knows no secret
        url = await site.listen("memory://")
        agent = AsyncFlareAgent(url, agent_id="a1", site_name="site-1", secret=b"ours")
        with pytest.raises(RemoteProtocolError, match="did not prove it knows the shared secret"):
            await agent.start()


async def test_secrets_per_agent_id() -> None:
    secrets = {"a1": b"one", "a2": "two"}
    async with FlareSite("site-1", secret=secrets) as site:
        url = await site.listen("memory://")
        async with AsyncFlareAgent(url, agent_id="a2", site_name="site-1", secret="two") as a2:
            assert (await run_one_task(site, a2)).data == {"ok": True}
        for agent_id, secret in [("a1", b"two"), ("a3", b"one")]:  # another's secret; no entry
            agent = AsyncFlareAgent(url, agent_id=agent_id, site_name="site-1", secret=secret)
            with pytest.raises(ConnectionRejected, match="authentication failed"):
                await agent.start()
        assert site.failed_authentications == 2


async def test_the_secret_never_appears_in_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "correct-horse-battery-staple"
    errors: list[str] = []
    async with FlareSite("site-1", secret=secret) as site:
        url = await site.listen("memory://")
        for guess in ("wrong-guess", None):
            agent = AsyncFlareAgent(url, agent_id="a1", site_name="site-1", secret=guess)
            with pytest.raises(ConnectionRejected) as info:
                await agent.start()
            errors.append(str(info.value))
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1", secret=secret) as agent:
            errors.append(repr(agent._protocol))
            await run_one_task(site, agent)
    assert caplog.text and all(secret not in text for text in [caplog.text, *errors])


def test_bad_secrets_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        AsyncFlareAgent("memory://x", agent_id="a1", site_name="s", secret="")
    with pytest.raises(TypeError, match="bytes or str"):
        FlareSite("s", secret={"a1": 42})  # type: ignore[dict-item]


def test_proofs_are_bound_to_both_nonces_and_to_the_direction() -> None:
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        agent_id="a1",
        site_name="s",
        instance_id="i",
        nonce=b"agent-nonce",
    )
    proof = agent_proof(b"k", hello, b"site-nonce")
    assert verify(proof, agent_proof(b"k", hello, b"site-nonce"))
    assert not verify(proof, agent_proof(b"k", hello, b"other-site-nonce"))
    replayed = Hello(**{**{f: getattr(hello, f) for f in hello.__struct_fields__}, "nonce": b"x"})
    assert not verify(proof, agent_proof(b"k", replayed, b"site-nonce"))
    assert not verify(proof, site_proof(b"k", hello, b"site-nonce"))
    assert not verify(proof, agent_proof(b"other key", hello, b"site-nonce"))
    assert not verify(proof, "not bytes")


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def site_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def agent_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


async def test_tls_between_site_and_agent(
    site_ssl: ssl.SSLContext, agent_ssl: ssl.SSLContext
) -> None:
    async with FlareSite("site-1") as site:
        url = await site.listen("tls://127.0.0.1:0", ssl_context=site_ssl)
        assert url.startswith("tls://127.0.0.1:")
        async with AsyncFlareAgent(
            url, agent_id="a1", site_name="site-1", ssl_context=agent_ssl
        ) as a:
            assert (await run_one_task(site, a)).data == {"ok": True}


async def test_a_site_certificate_from_an_unknown_ca_is_refused(site_ssl: ssl.SSLContext) -> None:
    stranger = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    trustme.CA().configure_trust(stranger)
    async with FlareSite("site-1") as site:
        url = await site.listen("tls://127.0.0.1:0", ssl_context=site_ssl)
        agent = AsyncFlareAgent(
            url, agent_id="a1", site_name="site-1", ssl_context=stranger, connect_timeout=0.2
        )
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            await agent.start()


def test_tls_urls_need_an_ssl_context() -> None:
    with pytest.raises(ValueError, match="needs an ssl_context"):
        AsyncFlareAgent("tls://127.0.0.1:1", agent_id="a1", site_name="s")


@pytest.fixture(scope="module")
def pem_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(folder / "site.pem")
    )
    ca.issue_cert("agent-1").private_key_and_cert_chain_pem.write_to_path(str(folder / "agent.pem"))
    return folder


async def test_mutual_tls_lets_in_only_agents_with_a_certificate(pem_files: Path) -> None:
    site_context = server_context(pem_files / "site.pem", client_ca=pem_files / "ca.pem")
    with_cert = client_context(pem_files / "ca.pem", certfile=pem_files / "agent.pem")
    without_cert = client_context(pem_files / "ca.pem")
    async with FlareSite("site-1") as site:
        url = await site.listen("tls://127.0.0.1:0", ssl_context=site_context)
        anonymous = AsyncFlareAgent(
            url, agent_id="a0", site_name="site-1", ssl_context=without_cert, connect_timeout=0.2
        )
        with pytest.raises((TransportError, ConnectionRejected)):
            await anonymous.start()
        assert site.agents == frozenset()
        async with AsyncFlareAgent(
            url, agent_id="a1", site_name="site-1", ssl_context=with_cert
        ) as a:
            assert (await run_one_task(site, a)).data == {"ok": True}
