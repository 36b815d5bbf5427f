"""Agents and sites over real sockets: large payloads, liveness that counts bytes, progress,
limits, reconnects."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import numpy as np
import pytest

from flare_agent_async import (
    AgentClosed,
    AgentGone,
    AsyncFlareAgent,
    FlareSite,
    TaskResult,
    TransportError,
)
from flare_agent_async.protocol import Limits, Result
from flare_agent_async.testing import FaultyConnector
from flare_agent_async.transports import ByteStream, Progress, TCPConnector, connector_for
from flare_agent_async.transports._socket import SocketByteStream

pytestmark = pytest.mark.anyio


@pytest.fixture
def unix_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        yield f"unix://{Path(folder) / 'site.sock'}"


@pytest.fixture(params=["tcp", "unix"])
def listen_url(request: pytest.FixtureRequest, unix_url: str) -> str:
    return "tcp://127.0.0.1:0" if request.param == "tcp" else unix_url


def model(mebibytes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    count = mebibytes * 2**20 // 4 // 2
    return {
        "layer1": rng.random(count, dtype=np.float32),
        "layer2": rng.random(count, dtype=np.float32).reshape(-1, 64),
    }


async def test_a_model_goes_out_and_back_intact(listen_url: str) -> None:
    weights = model(16)
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen(listen_url)

        async def trainer() -> None:
            async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
                async for task in agent.tasks():
                    updated = {name: value + 1 for name, value in task.data.items()}
                    await agent.submit_result(TaskResult({"n": 1}, updated))

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=10)
        result = await site.run_task("a1", "train", weights, {"current_round": 1})
    for name, value in weights.items():
        assert result.data[name].dtype == value.dtype and result.data[name].shape == value.shape
        np.testing.assert_array_equal(result.data[name], value + 1)


async def test_a_large_result_survives_a_dropped_connection() -> None:
    weights = model(8)
    async with FlareSite("site-1") as site:
        faulty = FaultyConnector(connector_for(await site.listen("tcp://127.0.0.1:0")))
        faulty.drop_before(lambda message: isinstance(message, Result))
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await site.run_task("a1", "train", weights))

        agent = AsyncFlareAgent(faulty, agent_id="a1", site_name="site-1")
        async with agent, anyio.create_task_group() as group:
            group.start_soon(run)
            task = await agent.get_task(timeout=10)
            assert task is not None
            assert await agent.submit_result(TaskResult({}, task.data))
        assert faulty.connections == 2
    np.testing.assert_array_equal(results[0].data["layer2"], weights["layer2"])


class SlowLink(SocketByteStream):
    """A link that moves 64 KiB per 20 ms each way: slower than the heartbeat timeout allows
    for a whole frame, while bytes keep moving."""

    async def receive_into(self, buffer: memoryview) -> int:
        await anyio.sleep(0.02)
        count = await super().receive_into(buffer[: 64 * 1024])
        self.waited_to_receive = True
        return count

    async def send_some(self, buffers: Sequence[memoryview]) -> int:
        await anyio.sleep(0.02)  # the link drains: the peer read what was sent
        count = await super().send_some([buffers[0][: 64 * 1024]])
        self.waited_to_send = True
        return count


class SlowConnector(TCPConnector):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.connections = 0

        async def wrap(sock: socket.socket) -> ByteStream:
            self.connections += 1
            return SlowLink(sock)

        self._wrap = wrap


async def test_liveness_counts_bytes_so_a_slow_transfer_is_not_a_dead_peer() -> None:
    # About 640 ms each way on the slow link: beyond the 250 ms timeout, which a loaded machine's
    # scheduling delays between two 20 ms steps do not reach.
    weights = model(2)
    site_options = {"heartbeat_interval": 0.01, "heartbeat_timeout": 0.25}
    async with anyio.create_task_group() as group, FlareSite("site-1", **site_options) as site:
        connector = SlowConnector(await site.listen("tcp://127.0.0.1:0"))

        async def trainer() -> None:
            async with AsyncFlareAgent(connector, agent_id="a1", site_name="site-1") as agent:
                async for task in agent.tasks():
                    await agent.submit_result(TaskResult({}, task.data))

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=10)
        result = await site.run_task("a1", "train", weights)
    np.testing.assert_array_equal(result.data["layer1"], weights["layer1"])
    assert connector.connections == 1, "the transfer was taken for a dead peer"


async def test_progress_of_large_frames_is_reported_both_ways() -> None:
    site_progress: list[tuple[str, Progress]] = []
    agent_progress: list[Progress] = []
    weights = model(4)
    async with (
        anyio.create_task_group() as group,
        FlareSite("site-1", on_progress=lambda *event: site_progress.append(event)) as site,
    ):
        url = await site.listen("tcp://127.0.0.1:0")

        async def trainer() -> None:
            agent = AsyncFlareAgent(
                url, agent_id="a1", site_name="site-1", on_progress=agent_progress.append
            )
            async with agent:
                async for task in agent.tasks():
                    await agent.submit_result(TaskResult({}, task.data))

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=10)
        await site.run_task("a1", "train", weights, task_id="t1")
    for events, direction, kind in [
        ([p for _, p in site_progress if p.direction == "send"], "send", "TaskAssign"),
        ([p for p in agent_progress if p.direction == "receive"], "receive", "TaskAssign"),
        ([p for p in agent_progress if p.direction == "send"], "send", "Result"),
        ([p for _, p in site_progress if p.direction == "receive"], "receive", "Result"),
    ]:
        assert events, f"no {direction} progress for {kind}"
        assert {(p.kind, p.task_id) for p in events} == {(kind, "t1")}
        done = [p.done for p in events]
        assert done == sorted(done) and done[-1] == events[-1].total >= 4 * 2**20
    assert {agent_id for agent_id, _ in site_progress} == {"a1"}


async def test_a_result_beyond_the_sites_limit_closes_the_agent_and_says_why() -> None:
    limits = Limits(max_frame_bytes=2**20)
    async with FlareSite("site-1", limits=limits) as site:
        url = await site.listen("tcp://127.0.0.1:0")
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
            async with anyio.create_task_group() as group:
                errors: list[AgentGone] = []

                async def run() -> None:
                    with pytest.raises(AgentGone, match="exceeds the limit of 1048576 bytes") as e:
                        await site.run_task("a1", "train", 1)
                    errors.append(e.value)

                group.start_soon(run)
                assert await agent.get_task(timeout=10) is not None
                assert await agent.submit_result(TaskResult({}, model(2))) is False
            with pytest.raises(AgentClosed, match="exceeds the limit of 1048576 bytes"):
                await agent.get_task(timeout=1)
        assert len(errors) == 1


async def test_a_task_beyond_the_agents_limit_is_refused_and_reported_to_the_site() -> None:
    limits = Limits(max_frame_bytes=2**20)
    async with FlareSite("site-1") as site:
        url = await site.listen("tcp://127.0.0.1:0")
        async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1", limits=limits) as agent:
            with pytest.raises(AgentGone, match="exceeds the limit of 1048576 bytes"):
                await site.run_task("a1", "train", model(2))
            with pytest.raises(AgentClosed, match="exceeds the limit"):
                await agent.get_task(timeout=1)


async def test_garbage_on_the_wire_costs_only_that_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with anyio.create_task_group() as group, FlareSite("site-1") as site:
        url = await site.listen("tcp://127.0.0.1:0")
        host, port = url[len("tcp://") :].rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as rogue:
            await rogue.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
            with anyio.fail_after(5):
                try:
                    assert await rogue.receive() == b""
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass

        async def trainer() -> None:
            async with AsyncFlareAgent(url, agent_id="a1", site_name="site-1") as agent:
                async for task in agent.tasks():
                    await agent.submit_result(TaskResult({}, task.data))

        group.start_soon(trainer)
        await site.wait_for_agent("a1", timeout=10)
        assert (await site.run_task("a1", "train", {"ok": 1})).data == {"ok": 1}
    assert "not a flare_agent_async peer" in caplog.text


async def test_unreachable_sites_fail_with_a_clear_error(unix_url: str) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for url, message in [
        (f"tcp://127.0.0.1:{port}", "Connection refused"),
        (unix_url, "No such file or directory"),
        ("tcp://no-such-host.invalid:1", "cannot resolve"),
    ]:
        agent = AsyncFlareAgent(url, agent_id="a1", site_name="s", connect_timeout=1)
        with pytest.raises(TransportError, match=message) as info:
            await agent.start()
        assert f"could not connect to {url} within 1 s" in str(info.value)


def test_malformed_urls_fail_at_once() -> None:
    for url, message in [
        ("tcp://127.0.0.1", "needs a host and a port"),
        ("tcp://127.0.0.1:notaport", "bad port"),
        ("unix://", "needs a path"),
    ]:
        with pytest.raises(ValueError, match=message):
            AsyncFlareAgent(url, agent_id="a1", site_name="s")
