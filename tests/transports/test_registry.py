"""URL schemes: the registry, entry points, and errors that list what is known."""

from __future__ import annotations

import pytest

from flare_agent_async.transports import (
    Connector,
    MemoryConnector,
    MemoryListener,
    MessageListener,
    MessageStream,
    Scheme,
    connector_for,
    create_listener,
    known_schemes,
    register_scheme,
)

pytestmark = pytest.mark.anyio


def test_memory_is_built_in() -> None:
    assert "memory" in known_schemes()
    assert isinstance(connector_for("memory://x"), MemoryConnector)


def test_a_connector_object_is_used_as_it_is() -> None:
    connector = MemoryConnector("memory://x")
    assert connector_for(connector) is connector


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("pigeon://loft", r"unknown transport scheme 'pigeon' in 'pigeon://loft'; known: .*memory"),
        ("no-scheme", "not a transport URL"),
    ],
)
def test_bad_urls_fail_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        connector_for(url)


def test_a_target_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected a URL or a Connector"):
        connector_for(42)  # type: ignore[arg-type]


class _Echo(Connector):
    def __init__(self, url: str) -> None:
        self.url = url

    async def connect(self) -> MessageStream:
        raise NotImplementedError


async def test_register_scheme_adds_a_scheme() -> None:
    async def listen(url: str) -> MessageListener:
        return MemoryListener("memory://")

    register_scheme("echo-test", Scheme(_Echo, listen))
    assert "echo-test" in known_schemes()
    connector = connector_for("echo-test://here")
    assert isinstance(connector, _Echo) and connector.url == "echo-test://here"
    listener = await create_listener("echo-test://here")
    assert listener.url.startswith("memory://")
    await listener.aclose()


def test_schemes_come_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import flare_agent_async.transports as transports

    class FakeEntryPoint:
        name = "plugin-test"

        def load(self) -> Scheme:
            return Scheme(_Echo, create_listener)

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        assert group == "flare_agent_async.transports"
        return [FakeEntryPoint()]

    monkeypatch.setattr(transports, "entry_points", fake_entry_points)
    monkeypatch.setattr(transports, "_entry_points_loaded", False)
    monkeypatch.setattr(transports, "_schemes", dict(transports._schemes))
    assert isinstance(connector_for("plugin-test://x"), _Echo)
