"""The package's public names, locked: changing them is a decision, not an accident."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import flare_agent_async
from flare_agent_async import exceptions

EXPECTED_ALL = [
    "AgentClosed",
    "AgentGone",
    "AsyncFlareAgent",
    "CallStateError",
    "Coming",
    "ConnectionRejected",
    "FlareAgent",
    "FlareAgentError",
    "FlareSite",
    "HeldResult",
    "LocalProtocolError",
    "LogRecord",
    "MetaKey",
    "MsgHeader",
    "PayloadKey",
    "ProtocolError",
    "RC",
    "RemoteProtocolError",
    "SiteError",
    "SyncFlareAgent",
    "Task",
    "TaskAborted",
    "TaskLost",
    "TaskResult",
    "TransportError",
    "UnknownAgent",
    "agent_site_fqcn",
]

_DOCUMENTED = [
    name
    for name in flare_agent_async.__all__
    if inspect.isclass(obj := getattr(flare_agent_async, name, None)) or inspect.isroutine(obj)
]

_EXCEPTION_CLASSES = [
    obj
    for obj in vars(exceptions).values()
    if inspect.isclass(obj)
    and issubclass(obj, BaseException)
    and obj.__module__ == exceptions.__name__
]


def test_all_is_locked() -> None:
    assert sorted(flare_agent_async.__all__) == EXPECTED_ALL
    assert len(set(flare_agent_async.__all__)) == len(flare_agent_async.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from flare_agent_async import *", namespace)
    assert sorted(name for name in namespace if name != "__builtins__") == EXPECTED_ALL


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_exported_name_exists(name: str) -> None:
    assert hasattr(flare_agent_async, name)


@pytest.mark.parametrize("name", _DOCUMENTED)
def test_exported_name_has_docstring(name: str) -> None:
    doc = getattr(flare_agent_async, name).__doc__
    assert doc
    assert doc.strip()


def test_exceptions_module_finds_its_classes() -> None:
    names = {exc.__name__ for exc in _EXCEPTION_CLASSES}
    assert "FlareAgentError" in names
    assert names == set(exceptions.__all__)


@pytest.mark.parametrize("exc", _EXCEPTION_CLASSES, ids=lambda e: e.__name__)
def test_exception_is_drawn_in_module_docstring(exc: type[BaseException]) -> None:
    assert exceptions.__doc__
    assert re.search(rf"\b{exc.__name__}\b", exceptions.__doc__)


@pytest.mark.parametrize("exc", _EXCEPTION_CLASSES, ids=lambda e: e.__name__)
def test_exception_derives_from_flare_agent_error(exc: type[BaseException]) -> None:
    assert issubclass(exc, exceptions.FlareAgentError)


def test_py_typed_marker() -> None:
    assert (Path(flare_agent_async.__file__).parent / "py.typed").is_file()
