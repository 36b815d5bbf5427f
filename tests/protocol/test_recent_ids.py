"""What a session remembers of finished tasks is bounded and small."""

from __future__ import annotations

import sys

from flare_agent_async.protocol._util import RecentIds


def test_a_long_run_remembers_only_the_last_few_task_ids() -> None:
    recent: RecentIds[None] = RecentIds()
    ids = [f"{n:032x}" for n in range(10_000)]
    for task_id in ids:
        recent.add(task_id, None)
    assert ids[-1] in recent and ids[-128] in recent
    assert ids[-129] not in recent and ids[0] not in recent
    kept = sys.getsizeof(recent._items) + sum(sys.getsizeof(task_id) for task_id in ids[-128:])
    assert kept < 32 * 1024  # thousands of agents per site, each with one of these both ways


def test_seeing_an_id_again_makes_it_the_newest() -> None:
    recent: RecentIds[int] = RecentIds(capacity=2)
    recent.add("a", 1)
    recent.add("b", 2)
    recent.add("a", 3)
    recent.add("c", 4)
    assert "a" in recent and recent.get("a") == 3
    assert "b" not in recent
