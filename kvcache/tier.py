"""The interface every cache tier implements (device, Redis, disk).

Owns no state. A tier maps string keys to values with a byte budget and exact LRU eviction:
the device tier stores decoded `Record`s, the lower tiers store record bytes (see record.py).
Tiers never raise for an unavailable backend: a tier that cannot be reached reports
``is_available() == False`` and its reads miss and its writes are dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any


class Tier(ABC):
    name: str = "tier"
    stores_bytes: bool = True  # False for the device tier, which stores Records

    def is_available(self) -> bool:
        return True

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """Values for `keys` (None where absent); hits become most recently used."""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[str, Any]], *, is_collecting_evicted: bool = False
                 ) -> list[tuple[str, Any]]:
        """Store `items` in order (the last one ends most recently used) and evict to budget.

        Items larger than the whole budget are skipped. Returns the evicted ``(key, value)``
        pairs when `is_collecting_evicted` (so the caller can move them down), else ``[]``.
        """

    @abstractmethod
    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored, without changing the LRU order."""

    def touch_many(self, keys: Sequence[str]) -> None:
        """Make the known keys most recently used, in order."""
        with self._lock:
            self._lru.touch_many(keys)

    def generation(self) -> int | None:
        """A number that changes whenever a key of this tier may have come, gone or changed its
        value (this process's changes and, once seen, other processes'), or None when the tier
        cannot tell (Redis: other processes write it unseen). Restore plans (restore_plan.py)
        are replayed only while every tier's is what it was."""
        return None

    def get_replay(self, keys: Sequence[str], values: Sequence[Any | None]) -> Callable[[], None]:
        """A call that repeats what `get_many(keys)` returning `values` changed besides its result
        (the hits become most recently used), without reading: a restore plan replays a
        lookup's reads with it (valid while `generation` is unchanged)."""
        hits = [key for key, value in zip(keys, values) if value is not None]
        return (lambda: self.touch_many(hits)) if hits else (lambda: None)

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove keys (missing keys are ignored)."""

    # Every tier accounts its records in an exact LRU index (`self._lru`, guarded by `self._lock`).
    def lru_keys(self) -> list[str]:
        """Keys this process tracks, least to most recently used."""
        with self._lock:
            return self._lru.keys()

    @property
    def num_bytes(self) -> int:
        """Bytes currently accounted to this tier."""
        return self._lru.num_bytes

    @property
    def budget_bytes(self) -> int:
        """The byte budget."""
        return self._lru.budget_bytes

    @property
    def num_records(self) -> int:
        return len(self._lru)

    def close(self) -> None:
        """Release resources (connections, files)."""
