"""The ``nvflare-ipc://`` scheme: what its URLs may say, and that it is for agents only."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("nvflare", reason="needs NVFlare: pip install -e '.[test]'")

from flare_agent_async.nvflare import IPCConnector
from flare_agent_async.transports import connector_for, create_listener

pytestmark = pytest.mark.anyio


def test_an_nvflare_ipc_url_names_the_parent_cell_and_its_options() -> None:
    connector = connector_for(
        "nvflare-ipc://127.0.0.1:8002?heartbeat_timeout=5&resend_interval=0.5"
    )
    assert isinstance(connector, IPCConnector)
    assert connector.parent_url == "tcp://127.0.0.1:8002"
    assert (connector.heartbeat_timeout, connector.resend_interval) == (5.0, 0.5)
    assert connector.submit_timeout == 30.0
    assert IPCConnector("nvflare-ipc://[::1]:8002").parent_url == "tcp://[::1]:8002"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nvflare-ipc://127.0.0.1", "host:port"),
        ("nvflare-ipc://127.0.0.1:8002?colour=blue", "unknown nvflare-ipc options"),
        ("nvflare-ipc://127.0.0.1:8002?heartbeat_timeout=soon", "number of seconds"),
        ("nvflare-ipc://127.0.0.1:8002?submit_timeout=0", "positive"),
    ],
)
def test_bad_nvflare_ipc_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        connector_for(url)


async def test_nothing_listens_at_an_nvflare_ipc_url() -> None:
    with pytest.raises(ValueError, match="an NVFlare job is the site"):
        await create_listener("nvflare-ipc://127.0.0.1:8002")


def test_without_nvflare_the_core_works_and_the_scheme_says_what_to_install() -> None:
    code = """
import sys
sys.modules["nvflare"] = None  # as if NVFlare were not installed
import anyio
from flare_agent_async import AsyncFlareAgent, FlareSite
from flare_agent_async.transports import connector_for

async def main():
    async with FlareSite("s") as site:
        await site.listen("memory://no-nvflare")
        async with AsyncFlareAgent("memory://no-nvflare", agent_id="a", site_name="s"):
            await site.wait_for_agent("a", timeout=10)
    print("core works")

anyio.run(main)
try:
    connector_for("nvflare-ipc://127.0.0.1:8002")
except ValueError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [
        "core works",
        "'nvflare-ipc://127.0.0.1:8002' needs NVFlare: pip install 'flare-agent-async[nvflare]'",
    ]
