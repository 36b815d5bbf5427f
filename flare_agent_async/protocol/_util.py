from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class RecentIds(Generic[V]):
    """The last ``capacity`` task ids seen, each with a value; the oldest is forgotten first.

    Resends only ever repeat the last few tasks (an agent works on one at a time), so a small
    window dedupes them without letting a long-running agent or site grow: 128 ids are about
    13 KiB, which thousands of agents on one site can afford.
    """

    def __init__(self, capacity: int = 128) -> None:
        self._items: OrderedDict[str, V] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._items

    def get(self, task_id: str) -> V | None:
        return self._items.get(task_id)

    def add(self, task_id: str, value: V) -> None:
        self._items[task_id] = value
        self._items.move_to_end(task_id)
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)
