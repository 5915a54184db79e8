"""The tier hierarchy: device, then Redis, then disk; promotion, demotion and write-through.

Owns: the ordered tiers, the record codec settings (fingerprint, checksum), the background
writer and the per-tier counters. Policy:

- put: the device tier synchronously; every lower tier through the background writer
  (write-through, so other processes and later restarts see every commit). A lower tier only
  receives keys it lacks; keys it already has become most recently used there.
- eviction moves a record down: device evictions are written to the lower tiers that lack
  them, Redis evictions (GET+DEL) to the disk.
- get: tiers in order; a hit below the device is decoded (tensors borrowed from the fetched
  bytes, no copy), verified and promoted: into the device synchronously (which copies what it
  keeps), into the byte tiers above it through the writer. With ``defer_verify`` (the restore
  path) the checksum pass and the promotion wait for `settle`, which the caller runs on each
  record right before it copies the record's bytes (so they are read from memory once).
- a record failing verification (`RecordError`) is deleted from its tier, counted as corrupt,
  and the search continues below: a miss, never a wrong answer. (A deferred check that fails in
  `settle` deletes and counts the same way; the caller then asks again.)
- index records (checkpoint offsets of one block) are merged by union when written and read
  as the union over all tiers, so checkpoints committed by other processes are found.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kvcache.checksum import DEFAULT_ALGORITHM as DEFAULT_CHECKSUM
from kvcache.keys import INDEX_PREFIX
from kvcache.record import Record, RecordError, decode_record, encode_record
from kvcache.stats import TierCounters, TierStats
from kvcache.tier import Tier
from kvcache.writer import BackgroundWriter

log = logging.getLogger(__name__)
INDEX_OFFSETS = "offsets"


@dataclass
class Hit:
    record: Record
    tier: str
    num_bytes: int
    pending: tuple[int, str, object] | None = None  # (tier depth, key, fetched bytes) until `settle`


class _Pending:
    """A record on its way to lower tiers: decoded, encoded, or both (each made lazily)."""

    def __init__(self, key: str, record: Record | None = None, data=None):
        self.key, self._record, self._data = key, record, data

    @property
    def is_index(self) -> bool:
        return self.key.startswith(INDEX_PREFIX)

    @property
    def num_bytes(self) -> int:
        return self._record.num_bytes if self._record is not None else memoryview(self._data).nbytes

    def record(self, stack: TierStack) -> Record:
        if self._record is None:
            self._record = decode_record(self._data, stack.fingerprint, expected_key=self.key, is_borrowed=True)
        return self._record

    def data(self, stack: TierStack):
        if self._data is None:
            self._data = encode_record(self._record, stack.fingerprint, checksum=stack.checksum)
        return self._data


def index_record(key: str, offsets: Iterable[int]) -> Record:
    values = torch.tensor(sorted(set(int(o) for o in offsets)), dtype=torch.int32)
    return Record(kind="index", key=key, tensors={INDEX_OFFSETS: values})


def index_offsets(record: Record | None) -> set[int]:
    if record is None or record.kind != "index" or INDEX_OFFSETS not in record.tensors:
        return set()
    return set(record.tensors[INDEX_OFFSETS].tolist())


class TierStack:
    def __init__(self, tiers: Sequence[Tier], fingerprint: str, *, checksum: str = DEFAULT_CHECKSUM,
                 max_pending_bytes: int = 1 << 30):
        if not tiers or tiers[0].stores_bytes or any(not t.stores_bytes for t in tiers[1:]):
            raise ValueError("the first tier must be the device tier, the others byte tiers")
        self.tiers = list(tiers)
        self.fingerprint = fingerprint
        self.checksum = checksum
        self.counters = {tier.name: TierCounters() for tier in self.tiers}
        self.writer = BackgroundWriter(max_pending_bytes=max_pending_bytes)

    @property
    def device(self) -> Tier:
        return self.tiers[0]

    # -- reads --------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str], *, defer_verify: bool = False, trace: list | None = None
                 ) -> list[Hit | None]:
        """First valid copy of each key, promoting hits from lower tiers (keys in LRU order:
        the last key ends most recently used). With `defer_verify`, hits from byte tiers come
        back parsed but with their checksum pass and promotion pending: call `settle` on each
        before using its bytes."""
        return self.fetch([], keys, defer_verify=defer_verify, trace=trace)[1]

    def get_index_offsets(self, keys: Sequence[str], *, trace: list | None = None) -> list[set[int]]:
        """Union of the checkpoint offsets stored under each index key in every tier."""
        return self.fetch(keys, [], trace=trace)[0]

    def generations(self) -> tuple[int, ...] | None:
        """Every tier's `Tier.generation` (each tier first catches up with what other processes
        changed), or None if a tier has none: while this tuple is unchanged, reading the same
        keys again gives the same values (restore_plan.py)."""
        generations = tuple(tier.generation() for tier in self.tiers)
        return None if None in generations else generations

    def fetch(self, index_keys: Sequence[str], keys: Sequence[str], *, defer_verify: bool = False,
              trace: list | None = None) -> tuple[list[set[int]], list[Hit | None]]:
        """`get_index_offsets(index_keys)` and `get_many(keys)` together, in ONE read per tier
        (one pipelined MGET for Redis): the index keys first, then the keys its tiers above lacked.
        `trace` (optional) gets what this read changed besides its results, as events that
        `replay` repeats: ``("get", call)`` per tier read (`Tier.get_replay`), ``("count", tier
        name, hits, misses, bytes)`` and ``("touch", depth, keys)``."""
        offsets: list[set[int]] = [set() for _ in index_keys]
        hits: list[Hit | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for depth, tier in enumerate(self.tiers):
            if not (pending or index_keys) or not tier.is_available():
                continue
            start = time.perf_counter()
            asked = [*index_keys, *(keys[i] for i in pending)]
            values = self._tier_get(tier, asked)
            if trace is not None:
                trace.append(("get", tier.get_replay(asked, values)))
            for i, value in enumerate(values[:len(index_keys)]):
                if value is not None:
                    record = value if not tier.stores_bytes else self._decode(tier, index_keys[i], value)
                    offsets[i] |= index_offsets(record)
            if not pending:
                continue
            promoted = []
            for i, value in zip(pending, values[len(index_keys):]):
                if value is None:
                    continue
                if depth == 0:
                    hits[i] = Hit(value, tier.name, value.num_bytes)
                    continue
                record = self._decode(tier, keys[i], value, verify=not defer_verify)
                if record is None:
                    continue
                hits[i] = Hit(record, tier.name, memoryview(value).nbytes)
                if defer_verify:
                    hits[i].pending = (depth, keys[i], value)
                else:
                    promoted.append(_Pending(keys[i], record, value))
            remaining = [i for i in pending if hits[i] is None]
            num_bytes = sum(hits[i].num_bytes for i in pending if hits[i] is not None)
            self.counters[tier.name].add_reads(
                len(pending) - len(remaining), len(remaining), num_bytes, time.perf_counter() - start)
            if trace is not None:
                trace.append(("count", tier.name, len(pending) - len(remaining), len(remaining), num_bytes))
            if promoted:
                self._promote(depth, promoted)
            pending = remaining
        if keys and len(self.tiers) > 1:  # the device's LRU order follows `keys`, wherever each hit came from
            found = [key for key, hit in zip(keys, hits) if hit is not None]
            self.device.touch_many(found)
            if trace is not None:
                self.trace_touch(trace, found)
        return offsets, hits

    def trace_touch(self, trace: list, keys: Sequence[str]) -> None:
        """Add a ``("touch", 0, keys)`` event of a `device.touch_many(keys)` to `trace`: only the
        keys the device tier holds (touching another is nothing, and while its generation is
        unchanged it holds the same keys), no event if none."""
        held = [key for key, is_held in zip(keys, self.device.contains_many(keys)) if is_held]
        if held:
            trace.append(("touch", 0, held))

    def replay(self, events: Sequence[tuple]) -> None:
        """Repeat what the reads that traced `events` changed (LRU order, counters, readahead),
        without reading: a restore plan's lookup (restore_plan.py), valid while `generations`
        is what it was when they were traced."""
        seconds = 0.0
        for event in events:
            if event[0] == "get":
                start = time.perf_counter()
                event[1]()
                seconds = time.perf_counter() - start
            elif event[0] == "count":
                self.counters[event[1]].add_reads(event[2], event[3], event[4], seconds)
            else:
                self.tiers[event[1]].touch_many(event[2])

    @staticmethod
    def _tier_get(tier: Tier, keys: Sequence[str]) -> list:
        """A tier's values, or all misses if it fails unexpectedly (a tier never fails a read)."""
        try:
            return tier.get_many(keys)
        except Exception:
            log.exception("kvcache: %s tier read failed; treating it as a miss", tier.name)
            return [None] * len(keys)

    def _decode(self, tier: Tier, key: str, value, *, verify: bool = True) -> Record | None:
        try:
            return decode_record(value, self.fingerprint, expected_key=key, is_borrowed=True, verify=verify)
        except RecordError as exc:
            self._drop(tier, key, exc)
            return None

    def _drop(self, tier: Tier, key: str, exc: RecordError) -> None:
        # the message, not the exception: a kept log record must not keep its frames (and the state being loaded) alive
        log.warning("kvcache: %s tier record %s unusable (%s); deleting it", tier.name, key, str(exc))
        self.counters[tier.name].add_corrupt(1)
        tier.delete_many([key])
        if hasattr(tier, "collect_garbage"):
            self.writer.submit(tier.collect_garbage)

    def settle(self, hit: Hit, column_sums=None) -> bool:
        """Finish a `get_many(..., defer_verify=True)` hit: verify its record and promote it as
        `get_many` would have. False if it is corrupt: then it is deleted from its tier and
        counted, and the caller must not use it (asking again searches the tiers below).
        `column_sums`: the record's colsum64 column sums from a pass that copied its bytes
        (`Record.verify`), checked instead of a checksum pass of its own."""
        if hit.pending is None:
            return True
        depth, key, value = hit.pending
        try:
            hit.record.verify(column_sums)
        except RecordError as exc:
            self._drop(self.tiers[depth], key, exc)
            return False
        hit.pending = None
        if depth > 1 or self.device.budget_bytes > 0:   # (else promoting it moves nothing)
            self._promote(depth, [_Pending(key, hit.record, value)])
        return True

    def _promote(self, depth: int, items: list[_Pending]) -> None:
        if self.device.budget_bytes > 0:  # (a device tier of no budget takes nothing)
            evicted = self.device.put_many([(p.key, p.record(self)) for p in items], is_collecting_evicted=True)
            if evicted:
                self._submit([_Pending(key, record) for key, record in evicted], first_depth=1)
        if depth > 1:
            self._submit(items, first_depth=1, last_depth=depth - 1)

    # -- writes -------------------------------------------------------------------------------

    def put_many(self, records: Sequence[Record]) -> bool:
        """Store `records` in order (the last ends most recently used): device now, the lower
        tiers in the background. Index records are merged with what each tier holds."""
        items = []
        for record in records:
            if record.kind == "index":
                (current,) = self.device.get_many([record.key])
                merged = index_offsets(current) | index_offsets(record)
                record = index_record(record.key, merged)
            items.append((record.key, record))
        is_known = self.device.contains_many([key for key, _ in items])
        num_new_bytes = sum(r.num_bytes for (_, r), known in zip(items, is_known) if not known)
        evicted = self.device.put_many(items, is_collecting_evicted=True)
        self.counters[self.device.name].add_writes(len(items) - sum(is_known), num_new_bytes)
        pending = [_Pending(key, record) for key, record in evicted + items]
        return self._submit(pending, first_depth=1, num_bytes=num_new_bytes)

    def _submit(self, items: list[_Pending], *, first_depth: int, last_depth: int | None = None,
                num_bytes: int | None = None) -> bool:
        """Queue lower-tier writes; `num_bytes` is the memory they keep alive (default: all)."""
        if not items or first_depth >= len(self.tiers):
            return True
        num_bytes = sum(p.num_bytes for p in items) if num_bytes is None else num_bytes
        return self.writer.submit(lambda: self._store(items, first_depth, last_depth), num_bytes)

    def _store(self, items: list[_Pending], first_depth: int, last_depth: int | None) -> None:
        """Writer thread: write `items` to tiers first_depth..last_depth; whatever those tiers
        evict continues down to the tiers below."""
        carried: list[_Pending] = []
        for depth in range(first_depth, len(self.tiers)):
            is_in_range = last_depth is None or depth <= last_depth
            batch = (items if is_in_range else []) + carried
            if not batch:
                return
            tier = self.tiers[depth]
            if tier.is_available():
                carried = self._store_in(tier, depth, batch)

    def _store_in(self, tier: Tier, depth: int, items: list[_Pending]) -> list[_Pending]:
        items = list({p.key: p for p in items}.values())  # one write per key
        plain = [p for p in items if not p.is_index]
        present = tier.contains_many([p.key for p in plain])
        tier.touch_many([p.key for p, is_present in zip(plain, present) if is_present])
        writes = [p for p, is_present in zip(plain, present) if not is_present]
        writes += self._merged_indexes(tier, [p for p in items if p.is_index])
        encoded = []
        for pending in writes:
            try:
                encoded.append((pending.key, pending.data(self)))
            except RecordError:  # an evicted value that no longer verifies: let it go
                continue
        is_last = depth == len(self.tiers) - 1
        evicted = tier.put_many(encoded, is_collecting_evicted=not is_last)
        self.counters[tier.name].add_writes(len(encoded), sum(memoryview(v).nbytes for _, v in encoded))
        return [_Pending(key, data=value) for key, value in evicted]

    def _merged_indexes(self, tier: Tier, items: list[_Pending]) -> list[_Pending]:
        """Index records to write to `tier`: each the union with the tier's current copy
        (None where the tier already knows every offset)."""
        if not items:
            return []
        merged = []
        for pending, value in zip(items, tier.get_many([p.key for p in items])):
            try:
                offsets = index_offsets(pending.record(self))
            except RecordError:
                continue
            current = self._decode(tier, pending.key, value) if value is not None else None
            known = index_offsets(current)
            if not offsets <= known:
                merged.append(_Pending(pending.key, index_record(pending.key, offsets | known)))
        return merged

    # -- housekeeping -------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        return self.writer.flush(timeout)

    def close(self) -> None:
        self.writer.close()
        for tier in self.tiers:
            tier.close()

    def tier_stats(self) -> dict[str, TierStats]:
        out = {}
        for tier in self.tiers:
            c = self.counters[tier.name]
            out[tier.name] = TierStats(
                name=tier.name, is_available=tier.is_available(), num_hits=c.num_hits,
                num_misses=c.num_misses, num_corrupt=c.num_corrupt, num_records=tier.num_records,
                num_bytes=tier.num_bytes, budget_bytes=tier.budget_bytes,
                num_bytes_loaded=c.num_bytes_loaded, load_seconds=c.load_seconds,
                num_records_written=c.num_records_written, num_bytes_written=c.num_bytes_written,
            )
        return out
