"""Disk tier: record bytes in append-only segment files under a directory (see segments.py).

Owns: the in-memory index key -> (segment, batch, row), the per-segment live-key sets, the exact
LRU over live record bytes (the byte budget), a small cache of memory-mapped readers, and the
`generation` (+1 whenever the index or the set of readers changes: a key comes, goes or moves,
a segment is loaded, forgotten or removed, a reader is dropped; restore_plan.py).

- The index is rebuilt on start by scanning every segment in name (= creation) order; a later
  copy of a key wins; unreadable segments are deleted. The same scan runs again whenever the
  directory changes, so records another process commits become visible.
- Each `put_many` writes one or more new segments (temp + rename), each laid out in the order a
  restore reads its records (`restore_order`: a cold restore then reads the file forward and
  overlaps its checksum passes and copies with the disk), their LRU order recorded in the
  segment so that a restart rebuilds it. Evicted or deleted records
  only leave the index; `collect_garbage` (run after writes) unlinks segments with no live
  records and rewrites segments that are mostly dead, that held a deleted (corrupt) record, or
  too many small ones, into new segments. So a deleted record is gone from disk after the next
  garbage collection and never comes back on restart.
- One process is expected to write a directory at a time; others may read it concurrently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from kvcache.keys import CHECKPOINT_PREFIX, INDEX_PREFIX
from kvcache.lru import ByteLRU
from kvcache.segments import (
    SegmentReader, is_segment_name, new_segment_name, prefetch_ranges, prefetch_segments, remove_stale_temps,
    write_segment,
)
from kvcache.tier import Tier

log = logging.getLogger(__name__)


def restore_order(keys: Sequence[str]) -> list[int]:
    """The order of a segment's records in its file (indices into `keys`, which are in LRU
    order, least recently used first): the order a restore reads them, so that a cold
    restore's reads go forward through the file and arrive in the order they are used
    (segments.py `prefetch_segments`). A restore reads index records, then its checkpoint,
    then the block and span records of its prefix head first; a commit puts them tail first
    with the index records last (the head ends most recently used; a lookup touches them in
    the same order), so: index records, then checkpoints, then the other records most recently
    used first. Any order reads the same records; this one only makes cold reads faster."""
    index = [i for i, key in enumerate(keys) if key.startswith(INDEX_PREFIX)]
    checkpoints = [i for i, key in enumerate(keys) if key.startswith(CHECKPOINT_PREFIX)]
    runs = [i for i, key in enumerate(keys) if not key.startswith((INDEX_PREFIX, CHECKPOINT_PREFIX))]
    return index + checkpoints + runs[::-1]


@dataclass
class _Location:
    segment: str
    batch_id: int
    row_id: int
    num_bytes: int


@dataclass
class _Segment:
    file_bytes: int
    live_keys: set[str] = field(default_factory=set)
    dead_bytes: int = 0
    is_rewrite_due: bool = False


class DiskTier(Tier):
    name = "disk"

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        budget_bytes: int,
        max_segment_bytes: int = 256 << 20,
        max_open_segments: int = 64,
        compact_dead_fraction: float = 0.5,
        max_small_segments: int = 32,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_segment_bytes = max_segment_bytes
        self.max_open_segments = max_open_segments
        self.compact_dead_fraction = compact_dead_fraction
        self.max_small_segments = max_small_segments
        self._lock = threading.RLock()
        self._index: dict[str, _Location] = {}
        self._segments: dict[str, _Segment] = {}
        self._readers: OrderedDict[str, SegmentReader] = OrderedDict()
        self._lru = ByteLRU(budget_bytes)
        self._scanned_mtime_ns: int | None = None
        self._own_writes: set[str] = set()  # segments this instance is writing right now
        self._generation = 0  # see the module docstring
        self._is_write_warned = False
        remove_stale_temps(self.directory)
        self.refresh()  # no eviction here: a process that only reads never deletes files

    # -- index --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pick up segments other processes added or removed since the last scan."""
        try:
            mtime_ns = os.stat(self.directory).st_mtime_ns
            recent = time.time_ns() - mtime_ns < 1_000_000_000  # coarse timestamps: look again
            if mtime_ns == self._scanned_mtime_ns and not recent:
                return
            with self._lock:
                known = set(self._segments)  # only these can be judged gone by the listing
            names = sorted(n for n in os.listdir(self.directory) if is_segment_name(n))
        except OSError as exc:
            log.warning("disk tier: cannot list %s (%s)", self.directory, exc)
            return
        with self._lock:
            self._scanned_mtime_ns = mtime_ns
            for name in known - set(names):
                if name in self._segments:
                    self._forget_segment(name)
            for name in names:
                if name not in self._segments and name not in self._own_writes:
                    self._load_segment(name)

    def _load_segment(self, name: str) -> None:
        path = self.directory / name
        try:
            reader = SegmentReader(path)
            rows = reader.scan()
            file_bytes = path.stat().st_size
        except FileNotFoundError:
            return
        except Exception as exc:
            log.warning("disk tier: deleting unreadable segment %s (%s)", path, exc)
            path.unlink(missing_ok=True)
            return
        self._segments[name] = _Segment(file_bytes=file_bytes)
        self._cache_reader(name, reader)
        for row in rows:
            self._set_location(row.key, _Location(name, row.batch_id, row.row_id, row.num_bytes))

    def _set_location(self, key: str, location: _Location) -> None:
        self._unlink_key(key)
        self._generation += 1
        self._index[key] = location
        self._segments[location.segment].live_keys.add(key)
        self._lru.add(key, location.num_bytes)

    def _unlink_key(self, key: str, *, is_rewrite_due: bool = False) -> None:
        location = self._index.pop(key, None)
        self._lru.remove(key)
        if location is None:
            return
        self._generation += 1
        if location.segment not in self._segments:
            return
        segment = self._segments[location.segment]
        segment.live_keys.discard(key)
        segment.dead_bytes += location.num_bytes
        segment.is_rewrite_due |= is_rewrite_due

    def _forget_segment(self, name: str) -> None:
        self._generation += 1
        segment = self._segments.pop(name)
        self._readers.pop(name, None)
        for key in segment.live_keys:
            self._index.pop(key, None)
            self._lru.remove(key)

    def _cache_reader(self, name: str, reader: SegmentReader) -> None:
        self._readers[name] = reader
        self._readers.move_to_end(name)
        while len(self._readers) > self.max_open_segments:
            self._readers.popitem(last=False)  # the map closes when no buffer uses it
            self._generation += 1   # (a restore plan's buffers must be views of the current maps)

    def _reader(self, name: str) -> SegmentReader:
        reader = self._readers.get(name)
        if reader is None:
            reader = SegmentReader(self.directory / name)
        self._cache_reader(name, reader)
        return reader

    def _read(self, key: str) -> pa.Buffer | None:
        location = self._index.get(key)
        if location is None:
            return None
        try:
            return self._reader(location.segment).read(location.batch_id, location.row_id)
        except FileNotFoundError:
            self._forget_segment(location.segment)
        except Exception as exc:
            log.warning("disk tier: cannot read %s from %s (%s)", key, location.segment, exc)
            self._unlink_key(key, is_rewrite_due=True)
        return None

    # -- Tier interface -----------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[pa.Buffer | None]:
        """The record bytes of `keys` (zero-copy slices of the segment maps; None where
        missing). If they are not in memory they are read ahead (`prefetch_segments`: each
        record's head, waited for, then the records whole in file order, in the background; a
        few us of probing when they are in memory), so the caller decodes them and verifies
        and copies the first ones while the disk reads the rest."""
        self.refresh()
        with self._lock:
            out = [self._read(key) for key in keys]
            reads = self._touch(keys, out)
        prefetch_segments(reads)  # (outside the lock: it may wait for the heads)
        return out

    def get_replay(self, keys: Sequence[str], values: Sequence[pa.Buffer | None]) -> Callable[[], None]:
        """`get_many`'s LRU touches and readahead probe for `values` it returned, as a call (a
        restore plan's lookup, valid while `generation` is unchanged: the same keys in the same
        maps, so the ranges are worked out once, here)."""
        hits = [key for key, value in zip(keys, values) if value is not None]
        with self._lock:
            reads = [(reader, reader.ranges(buffers)) for reader, buffers in self._segment_reads(keys, values)]

        def replay() -> None:
            with self._lock:
                self._lru.touch_many(hits)
            prefetch_ranges(reads)
        return replay

    def _touch(self, keys: Sequence[str], values: Sequence[pa.Buffer | None]) -> list:
        """(Under the lock) the hits among `keys` become most recently used; returns the reads
        to hand `prefetch_segments` (`_segment_reads`)."""
        self._lru.touch_many(key for key, value in zip(keys, values) if value is not None)
        return self._segment_reads(keys, values)

    def _segment_reads(self, keys: Sequence[str], values: Sequence[pa.Buffer | None]) -> list:
        """(Under the lock) each segment's reader and its buffers among `values`."""
        by_segment: dict[str, list[pa.Buffer]] = {}
        for key, value in zip(keys, values):
            if value is not None:
                by_segment.setdefault(self._index[key].segment, []).append(value)
        return [(self._readers[name], buffers) for name, buffers in sorted(by_segment.items())
                if name in self._readers]

    def generation(self) -> int:
        """See the module docstring; other processes' segments are picked up first (`refresh`)."""
        self.refresh()
        return self._generation

    def put_many(self, items: Sequence[tuple[str, object]], *, is_collecting_evicted: bool = False
                 ) -> list[tuple[str, object]]:
        items = [(key, value) for key, value in items if self._lru.fits(memoryview(value).nbytes)]
        for group in self._groups(items):
            if not self._write(group):
                break
        with self._lock:
            self._evict_over_budget()
        self.collect_garbage()
        return []

    def _groups(self, items: list[tuple[str, object]]):
        group, group_bytes = [], 0
        for key, value in items:
            size = memoryview(value).nbytes
            if group and group_bytes + size > self.max_segment_bytes:
                yield group
                group, group_bytes = [], 0
            group.append((key, value))
            group_bytes += size
        if group:
            yield group

    def _write(self, items: list[tuple[str, object]], *, relocated_from: set[str] | None = None) -> bool:
        """Write `items` (in LRU order, least recently used first) as a new segment, laid out
        in restore order (`restore_order`), their LRU order kept in it (``kv.lru_rows``: a
        restart rebuilds it). With `relocated_from` (garbage collection), only keys still
        living in those segments move, keeping their LRU position."""
        name = new_segment_name()
        with self._lock:
            self._own_writes.add(name)
        order = restore_order([key for key, _ in items])
        lru_rows = [0] * len(order)
        for row_id, i in enumerate(order):
            lru_rows[i] = row_id
        try:
            rows, file_bytes = write_segment(self.directory, name, [items[i] for i in order], lru_rows=lru_rows)
            rows = [rows[row_id] for row_id in lru_rows]  # (LRU order again)
        except OSError as exc:  # a full or broken disk drops the write, never fails the caller
            if not self._is_write_warned:
                log.warning("disk tier: cannot write to %s (%s); dropping writes", self.directory, exc)
                self._is_write_warned = True
            with self._lock:
                self._own_writes.discard(name)
            return False
        self._is_write_warned = False
        with self._lock:
            self._own_writes.discard(name)
            segment = self._segments[name] = _Segment(file_bytes=file_bytes)
            for row in rows:
                location = _Location(name, row.batch_id, row.row_id, row.num_bytes)
                if relocated_from is None:
                    self._set_location(row.key, location)
                    continue
                old = self._index.get(row.key)
                if old is None or old.segment not in relocated_from:
                    segment.dead_bytes += row.num_bytes  # deleted or rewritten meanwhile
                    continue
                self._segments[old.segment].live_keys.discard(row.key)
                self._segments[old.segment].dead_bytes += old.num_bytes
                self._index[row.key] = location
                self._generation += 1
                segment.live_keys.add(row.key)
        return True

    def _evict_over_budget(self) -> None:
        for key in self._lru.pop_over_budget():
            self._unlink_key(key)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        self.refresh()
        with self._lock:
            return [key in self._index for key in keys]

    def delete_many(self, keys: Sequence[str]) -> None:
        """Drop keys now; their bytes leave the files at the next `collect_garbage`."""
        with self._lock:
            for key in keys:
                self._unlink_key(key, is_rewrite_due=True)

    @property
    def num_file_bytes(self) -> int:
        with self._lock:
            return sum(s.file_bytes for s in self._segments.values())

    def drop_cached_pages(self) -> None:
        """Evict every segment file of this tier from memory (the process's mappings and the
        OS page cache; `SegmentReader.drop_cached_pages`): the next reads come from disk. For
        benchmarks and tests of a cold read; nothing about the records changes."""
        with self._lock:
            for name in sorted(self._segments):
                self._reader(name).drop_cached_pages()

    def segment_names(self) -> list[str]:
        with self._lock:
            return sorted(self._segments)

    # -- garbage collection -------------------------------------------------------------------

    def collect_garbage(self) -> None:
        """Unlink dead segments; rewrite mostly-dead, corrupt-holding or too many small ones."""
        with self._lock:
            empty = [n for n, s in self._segments.items() if not s.live_keys]
            rewrite = [
                n for n, s in self._segments.items() if s.live_keys and (
                    s.is_rewrite_due or s.dead_bytes >= self.compact_dead_fraction * s.file_bytes)
            ]
            small = [
                n for n, s in self._segments.items()
                if s.live_keys and n not in rewrite and s.file_bytes < self.max_segment_bytes // 8
            ]
            if len(small) > self.max_small_segments:
                rewrite += small
            for name in empty:
                self._remove_file(name)
            live = {key for name in rewrite for key in self._segments[name].live_keys}
            moved = [(key, self._read(key)) for key in self._lru.keys() if key in live] if live else []  # (LRU order)
        moved = [(key, value) for key, value in moved if value is not None]
        for group in self._groups(moved):
            if not self._write(group, relocated_from=set(rewrite)):
                return  # keep the old segments; try again later
        with self._lock:
            for name in rewrite:
                if name in self._segments and not self._segments[name].live_keys:
                    self._remove_file(name)

    def _remove_file(self, name: str) -> None:
        self._generation += 1
        self._segments.pop(name, None)
        self._readers.pop(name, None)
        try:
            (self.directory / name).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("disk tier: cannot delete %s (%s)", name, exc)
