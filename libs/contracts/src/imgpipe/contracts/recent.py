"""A bounded, in-memory set of recently seen ids: what a process may remember to skip
repeated work. Losing it (a restart) costs one more idempotent round trip, never
correctness."""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    """The last `size` ids added (least recently added or seen ones drop out first)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or key not in self._ids:
            return False
        self._ids.move_to_end(key)
        return True
