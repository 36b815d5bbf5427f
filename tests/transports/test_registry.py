"""URL schemes: the registry, entry points, and errors that list what is known."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from flare_agent_async.protocol import Limits
from flare_agent_async.transports import (
    Connector,
    MemoryConnector,
    MemoryListener,
    MessageListener,
    MessageStream,
    Scheme,
    TransportOptions,
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


async def _listen_in_memory(url: str, options: TransportOptions) -> MessageListener:
    return MemoryListener("memory://")


ECHO = Scheme(lambda url, options: _Echo(url), _listen_in_memory, frozenset())
"""A scheme, as an entry point names it (``test_registry:ECHO``)."""


async def test_register_scheme_adds_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    import flare_agent_async.transports as transports

    monkeypatch.setattr(transports, "_schemes", dict(transports._schemes))  # registered here only
    register_scheme("echo-test", ECHO)
    assert "echo-test" in known_schemes()
    connector = connector_for("echo-test://here")
    assert isinstance(connector, _Echo) and connector.url == "echo-test://here"
    listener = await create_listener("echo-test://here")
    assert listener.url.startswith("memory://")
    await listener.aclose()


def use_entry_points(monkeypatch: pytest.MonkeyPatch, **named: str) -> None:
    import flare_agent_async.transports as transports

    class FakeEntryPoint:
        def __init__(self, name: str, value: str) -> None:
            self.name, self.value = name, value

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        assert group == "flare_agent_async.transports"
        return [FakeEntryPoint(name, value) for name, value in named.items()]

    monkeypatch.setattr(transports, "entry_points", fake_entry_points)
    monkeypatch.setattr(transports, "_entry_points_loaded", False)
    monkeypatch.setattr(transports, "_schemes", dict(transports._schemes))


def test_schemes_come_from_entry_points_loaded_when_first_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_entry_points(monkeypatch, **{"plugin-test": f"{__name__}:ECHO"})
    assert "plugin-test" in known_schemes()  # named, not imported yet
    assert isinstance(connector_for("plugin-test://x"), _Echo)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_here:ECHO", "cannot be loaded from no_such_module_here:ECHO"),
        (f"{__name__}:_Echo", "is not a Scheme"),
    ],
)
def test_an_entry_point_that_names_no_scheme_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, target: str, message: str
) -> None:
    use_entry_points(monkeypatch, **{"broken-test": target})
    with pytest.raises(ValueError, match=message):
        connector_for("broken-test://x")


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        (
            "tcp://127.0.0.1:1",
            {"ssl_context": ssl.create_default_context()},
            "ssl_context does not apply to tcp://",
        ),
        ("memory://x", {"ssl_context": ssl.create_default_context()}, "ssl_context .*memory://"),
    ],
)
def test_an_option_a_scheme_does_not_use_is_refused_by_name(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        connector_for(url, **options)


async def test_options_for_an_object_are_refused_it_has_its_own() -> None:
    with pytest.raises(ValueError, match="limits applies to URLs"):
        connector_for(MemoryConnector("memory://x"), limits=Limits())
    listener = MemoryListener("memory://")
    with pytest.raises(ValueError, match="ssl_context applies to URLs"):
        await create_listener(listener, ssl_context=ssl.create_default_context())
    await listener.aclose()


def test_an_unknown_option_is_a_type_error_that_names_it() -> None:
    with pytest.raises(TypeError, match="ssl_contxt"):
        connector_for("tls://127.0.0.1:1", ssl_contxt=None)  # type: ignore[call-arg]
