"""Device tier: decoded records (tensors) in the router process's memory.

Owns: the in-process key -> `Record` map, its exact LRU byte accounting (tensor bytes) and its
`generation` (+1 on every change of the map). Thread-safe (one lock). Records it keeps own
their memory: a borrowed record (tensors viewing a Redis value or a memory-mapped segment) is
copied on the way in.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvcache.lru import ByteLRU
from kvcache.record import Record
from kvcache.tier import Tier


class DeviceTier(Tier):
    name = "device"
    stores_bytes = False

    def __init__(self, budget_bytes: int):
        self._lru = ByteLRU(budget_bytes)
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._generation = 0  # +1 whenever a key is stored, replaced, evicted or deleted

    def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        with self._lock:
            out = [self._records.get(key) for key in keys]
            self._lru.touch_many(key for key, record in zip(keys, out) if record is not None)
        return out

    def put_many(self, items: Sequence[tuple[str, Record]], *, is_collecting_evicted: bool = False
                 ) -> list[tuple[str, Record]]:
        evicted = []
        with self._lock:
            for key, record in items:
                if not self._lru.fits(record.num_bytes):
                    continue
                self._records[key] = record.owned()
                self._lru.add(key, record.num_bytes)
                self._generation += 1
            for key in self._lru.pop_over_budget():
                evicted.append((key, self._records.pop(key)))
                self._generation += 1
        return evicted if is_collecting_evicted else []

    def generation(self) -> int:
        return self._generation

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._records for key in keys]

    def delete_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                if self._records.pop(key, None) is not None:
                    self._generation += 1
                self._lru.remove(key)

