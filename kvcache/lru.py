"""Exact LRU order with byte accounting, shared by every tier.

Owns: the key -> size map of one tier, ordered least to most recently used, and its byte total.
Not thread-safe on its own; each tier holds it under the tier's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class ByteLRU:
    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def fits(self, num_bytes: int) -> bool:
        return num_bytes <= self.budget_bytes

    def add(self, key: str, num_bytes: int) -> None:
        """Insert or resize `key` as most recently used."""
        self.remove(key)
        self._sizes[key] = int(num_bytes)
        self.num_bytes += int(num_bytes)

    def touch(self, key: str) -> bool:
        """Mark `key` most recently used; False if unknown."""
        if key not in self._sizes:
            return False
        self._sizes.move_to_end(key)
        return True

    def touch_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.touch(key)

    def remove(self, key: str) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.num_bytes -= size
        return size

    def pop_over_budget(self) -> list[str]:
        """Remove least recently used keys until within budget; return them, oldest first."""
        victims = []
        while self.num_bytes > self.budget_bytes and self._sizes:
            key, size = self._sizes.popitem(last=False)
            self.num_bytes -= size
            victims.append(key)
        return victims

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._sizes)

    def clear(self) -> None:
        self._sizes.clear()
        self.num_bytes = 0
