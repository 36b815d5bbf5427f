"""Which rank talks to the site, and the payload split that the ranks' broadcasts carry."""

from __future__ import annotations

import numpy as np
import pytest

from flare_agent_async.client import resolve_rank, share
from flare_agent_async.protocol import join_payload, split_payload


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_the_argument_then_the_launchers_global_rank_then_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve_rank() == "0"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == "3"
    assert resolve_rank(0) == "0" and resolve_rank("2") == "2"
    with pytest.raises(ValueError, match="rank must be a string or an integer"):
        resolve_rank(1.0)  # type: ignore[arg-type]


def test_a_local_rank_without_a_global_one_is_an_error_that_names_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_rank() == "0"  # one process: its local rank is its rank
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="LOCAL_RANK is set but RANK is not, with WORLD_SIZE=4"):
        resolve_rank()
    assert resolve_rank(1) == "1"  # the argument settles it


def test_a_split_payload_joins_into_the_same_value_in_new_memory() -> None:
    value = {"w": np.arange(6.0).reshape(2, 3), "n": np.int64(4), "b": b"x" * 4096, "s": [1, "a"]}
    header, buffers = split_payload(value, "value")
    destinations, finish = join_payload(header)
    assert [d.nbytes for d in destinations] == [b.nbytes for b in buffers]
    for destination, buffer in zip(destinations, buffers, strict=True):
        destination[:] = buffer
    joined = finish()
    np.testing.assert_array_equal(joined["w"], value["w"])
    assert joined["w"].ctypes.data != value["w"].ctypes.data
    assert (joined["n"], joined["b"], joined["s"]) == (4, value["b"], [1, "a"])
    with pytest.raises(ValueError, match="not a payload header"):
        join_payload(b"\x01\x02")


def test_share_without_a_process_group_is_the_value_itself() -> None:
    value = {"w": np.arange(3)}
    assert share(value) is value
