"""The tracking writers send what NVFlare's send, call for call: the same key, value, data type,
writer and step reach the site."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from conftest import site_thread

import flare_agent_async.client as flare
from flare_agent_async import LogRecord
from flare_agent_async.client import tracking

CALLS: list[tuple[str, str, tuple[Any, ...]]] = [
    ("SummaryWriter", "add_scalar", ("loss", 0.5, 3)),
    ("SummaryWriter", "add_scalar", ("loss", 0.25)),
    ("SummaryWriter", "add_scalars", ("losses", {"a": 1.0, "b": 2.0}, 4)),
    ("WandBWriter", "log", ({"acc": 0.9}, 5)),
    ("MLflowWriter", "log_param", ("lr", 0.1)),
    ("MLflowWriter", "log_params", ({"lr": 0.1, "batch": 32},)),
    ("MLflowWriter", "log_metric", ("acc", 0.9, 6)),
    ("MLflowWriter", "log_metrics", ({"acc": 0.9}, 7)),
    ("MLflowWriter", "log_text", ("hello", "notes/a.txt")),
    ("MLflowWriter", "set_tag", ("team", "blue")),
    ("MLflowWriter", "set_tags", ({"team": "blue"},)),
]


def plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def test_the_writers_send_what_nvflares_send(monkeypatch: pytest.MonkeyPatch) -> None:
    nvflare_tracking = pytest.importorskip(
        "nvflare.client.tracking", reason="needs NVFlare: pip install -e '.[test]'"
    )
    theirs: list[tuple[Any, ...]] = []

    def record(key: str, value: Any, data_type: Any, ctx: Any = None, **kwargs: Any) -> None:
        options = {name: plain(option) for name, option in kwargs.items()}
        theirs.append((key, value, plain(data_type), options))

    monkeypatch.setattr(nvflare_tracking, "log", record)
    for writer, method, arguments in CALLS:
        getattr(getattr(nvflare_tracking, writer)(ctx=object()), method)(*arguments)

    records: list[LogRecord] = []
    with site_thread(on_log=records.append) as site:
        flare.init(site=site.url, agent_id="a1", site_name="site-1")
        try:
            for writer, method, arguments in CALLS:
                getattr(getattr(tracking, writer)(), method)(*arguments)
        finally:
            flare.shutdown()  # the records are delivered before the goodbye
    ours = [(r.key, r.value, r.data_type, r.options) for r in records]
    assert ours == theirs
    assert [r.step for r in records] == [3, None, 4, 5, None, None, 6, 7, None, None, None]


def test_data_types_and_writer_names_are_nvflares() -> None:
    analytix = pytest.importorskip("nvflare.apis.analytix", reason="needs NVFlare")
    assert {t.name: t.value for t in tracking.AnalyticsDataType} == {
        t.name: t.value for t in analytix.AnalyticsDataType
    }
    assert {w.name: w.value for w in tracking.LogWriterName} == {
        w.name: w.value for w in analytix.LogWriterName
    }
