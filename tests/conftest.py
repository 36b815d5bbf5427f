from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest

from flare_agent_async import AsyncFlareAgent, FlareSite, SyncFlareAgent, Task, TaskResult
from flare_agent_async.protocol import TaskAssign

#: The event loops async tests run on; ``FLARE_AGENT_ASYNC_BACKENDS=trio`` narrows it (nox does).
BACKENDS = os.environ.get("FLARE_AGENT_ASYNC_BACKENDS", "asyncio,trio").split(",")


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on each backend."""
    return str(request.param)


class SyncDriver:
    """Drives a `SyncFlareAgent` from async tests, each blocking call in a worker thread, so the
    same test runs through the async agent and through the synchronous facade."""

    def __init__(self, agent: SyncFlareAgent) -> None:
        self.agent = agent

    @property
    def agent_id(self) -> str:
        return self.agent.agent_id

    @property
    def connected(self) -> bool:
        return self.agent.connected

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.agent.start)

    async def stop(self) -> None:
        await anyio.to_thread.run_sync(self.agent.stop)

    async def __aenter__(self) -> SyncDriver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def get_task(self, timeout: float | None = None) -> Task | None:
        return await anyio.to_thread.run_sync(self.agent.get_task, timeout)

    async def submit_result(self, result: TaskResult) -> bool:
        return await anyio.to_thread.run_sync(self.agent.submit_result, result)

    async def log(
        self,
        key: str,
        value: Any,
        step: int | None = None,
        *,
        data_type: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        log = functools.partial(self.agent.log, data_type=data_type, options=options)
        await anyio.to_thread.run_sync(log, key, value, step)

    async def tasks(self) -> AsyncIterator[Task]:
        iterator = self.agent.tasks()
        while (task := await anyio.to_thread.run_sync(next, iterator, None)) is not None:
            yield task


Agent = AsyncFlareAgent | SyncDriver


@pytest.fixture(params=["async", "sync"])
def driver(request: pytest.FixtureRequest) -> str:
    """Which agent the behaviour tests drive: the async agent, or the synchronous facade."""
    return str(request.param)


@pytest.fixture
def listen_url(driver: str) -> str:
    """Where sites listen: in memory for the async agent; the sync facade has a loop of its own,
    so it needs a real transport."""
    return "memory://" if driver == "async" else "tcp://127.0.0.1:0"


@pytest.fixture
def make_agent(driver: str, anyio_backend: str) -> Callable[..., Agent]:
    """Make the agent under test: ``make_agent(url_or_connector, agent_id=..., ...)``."""

    def make(site: Any, **options: Any) -> Agent:
        if driver == "async":
            return AsyncFlareAgent(site, **options)
        return SyncDriver(SyncFlareAgent(site, backend=anyio_backend, **options))

    return make


def assign(task_id: str, data: object = None, meta: object = None) -> TaskAssign:
    """A task message as a scripted site sends it (meta may be anything: tests send bad ones)."""
    meta = meta if meta is not None else {}
    return TaskAssign(task_id=task_id, task_name="train", meta=meta, data=data)  # type: ignore[arg-type]


class SiteThread:
    """A FlareSite on an event loop in a background thread, called from the test's thread."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, site: FlareSite, url: str):
        self.portal, self.site, self.url = portal, site, url

    def run_task_soon(self, agent_id: str, data: Any, **options: Any) -> Future[TaskResult]:
        async def run() -> TaskResult:
            return await self.site.run_task(agent_id, "train", data, **options)

        return self.portal.start_task_soon(run)

    def wait_for_agent(self, agent_id: str) -> None:
        self.portal.call(lambda: self.site.wait_for_agent(agent_id, timeout=10))

    def wait_until_no_agent(self) -> None:
        """Wait (bounded polling across threads) until the site has let every agent go."""
        deadline = time.monotonic() + 10
        while self.portal.call(lambda: self.site.agents):
            assert time.monotonic() < deadline, "the site never saw the agent leave"
            time.sleep(0.01)


@contextmanager
def site_thread(**site_options: Any) -> Iterator[SiteThread]:
    """A ``FlareSite("site-1", ...)`` listening on TCP in a thread of its own, for tests whose
    agents block (the synchronous agent, the Client API's functions)."""
    with anyio.from_thread.start_blocking_portal() as portal:
        site = FlareSite("site-1", **site_options)
        with portal.wrap_async_context_manager(site):
            url = portal.call(site.listen, "tcp://127.0.0.1:0")
            yield SiteThread(portal, site, url)


CELL_OPTIONS: dict[str, Any] = {
    "create_internal_listener": False,
    "secure": False,
    "credentials": {},
}
"""For the NVFlare cells the tests make in their own process."""


@pytest.fixture(scope="session")
def server_cell() -> Iterator[tuple[Any, str]]:
    """NVFlare's root cell ("server") in this process, and its URL, for job cells to join.

    NVFlare keeps every cell it made by name for the life of the process, and routes in-process
    messages by name, so the tests of one run share one."""
    cell_module = pytest.importorskip("nvflare.fuel.f3.cellnet.cell")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    root = cell_module.Cell(fqcn="server", root_url=url, **CELL_OPTIONS)
    root.start()
    yield root, url
    root.stop()
