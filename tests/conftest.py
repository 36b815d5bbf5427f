from __future__ import annotations

import os

import pytest

#: The event loops async tests run on; ``FLARE_AGENT_ASYNC_BACKENDS=trio`` narrows it (nox does).
BACKENDS = os.environ.get("FLARE_AGENT_ASYNC_BACKENDS", "asyncio,trio").split(",")


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on each backend."""
    return str(request.param)
