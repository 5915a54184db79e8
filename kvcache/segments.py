"""Disk segment files: Arrow IPC files that group many records, written atomically.

Owns no state beyond one open file per `SegmentReader` and the process's readahead thread. A
segment is an Arrow IPC *file* with columns ``key`` (utf8) and ``record`` (large_binary: the
record bytes of record.py, unchanged). Segments are immutable: written to
``.<name>.<pid>.tmp`` then renamed into place, so readers only ever see complete files; they
are read through `pyarrow.memory_map` (zero-copy). Names sort by creation time:
``<time_ns>-<pid>-<seq>.kvseg``. The writer picks the rows' order in the file (disk_tier.py lays
them out in the order a restore reads them) and may record the records' LRU order separately,
as the schema metadata ``kv.lru_rows`` (row ids, least recently used first; optional: readers
that ignore it read the same records, `SegmentReader.scan` returns the rows in that order).

Cold reads: `prefetch_segments` reads ahead a lookup's records when a probe finds them missing
from memory: the head of every record first (what a decode parses), waited for, then every
record whole in file order, asked of the kernel by a background thread (POSIX_FADV_WILLNEED);
the caller meanwhile decodes, verifies and copies the records through the map, each page fault
waiting only for its own page. With records laid out in the order they are read, the checksum
passes and copies of a cold restore run while the disk reads the records after them.

Page cache (Linux): `page_cache_fraction` says how much of a file is in the OS page cache
(mincore) and `SegmentReader.drop_cached_pages` evicts one (the process's mapped pages are
released, then the kernel drops the file's cached pages): how a benchmark or test reads a
segment "from disk" with a warm process.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

SEGMENT_SUFFIX = ".kvseg"
SEGMENT_SCHEMA = pa.schema([
    pa.field("key", pa.utf8(), nullable=False),
    pa.field("record", pa.large_binary(), nullable=False),
])
_sequence = itertools.count()
_MADV_DONTNEED = 4  # <sys/mman.h> (Linux)
_PAGE = mmap.PAGESIZE
PROBE_STRIDE = 2 << 20  # `SegmentReader.is_resident` looks at one page per 2 MiB
HEAD_BYTES = 16 << 10   # `prefetch_segments` reads each record's first bytes first (a decode parses its framing there)
LRU_ROWS = b"kv.lru_rows"  # schema metadata: the rows' LRU order (`write_segment`)
log = logging.getLogger(__name__)


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


@functools.cache
def _readahead_bytes(device: int) -> int:
    """The kernel's readahead window of a file system (its bdi's ``read_ahead_kb``; 128 KiB,
    the usual default, if unknown): a POSIX_FADV_WILLNEED reads at most this much per call."""
    try:
        with open(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb") as f:
            return max(int(f.read()) << 10, _PAGE)
    except (OSError, ValueError):
        return 128 << 10


def evict_file(path: str | os.PathLike) -> None:
    """Ask the kernel to drop `path` from the page cache (written back first). Pages some
    process has mapped and touched stay (see `SegmentReader.drop_cached_pages`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache_fraction(path: str | os.PathLike) -> float:
    """The fraction of `path`'s pages in the OS page cache now (mincore over a fresh mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        address = np.frombuffer(mapping, dtype=np.uint8).ctypes.data  # (nothing is read)
        resident = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
        if _libc().mincore(address, size, resident.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return float(np.count_nonzero(resident & 1)) / len(resident)
    finally:
        mapping.close()


def prefetch_segments(reads: Sequence[tuple[SegmentReader, Sequence[pa.Buffer]]]) -> int:
    """Read ahead records about to be read (`reads`: a segment's reader and the buffers its
    `SegmentReader.read` returned, per segment) where a probe finds them missing from memory:
    1. the first `HEAD_BYTES` of every record (a decode parses its framing there), then wait
       for them: queued reads are served in file (sector) order (mq-deadline here), so a head
       asked together with the whole records would wait for every record before it, and the
       lookup decodes every record before the load copies the first;
    2. every record whole, merged where adjacent, in file order, asked of the kernel by this
       process's readahead thread (its ~1.5 us per page of page-cache setup then runs beside
       the caller, who decodes and starts verifying and copying the first records meanwhile).
    Returns the bytes asked for (0 when everything was in memory). Advisory: where the calls
    are unavailable the reads fault their pages in as they go. `wait_for_readahead` waits
    for step 2."""
    return prefetch_ranges([(reader, reader.ranges(buffers)) for reader, buffers in reads])


def prefetch_ranges(reads: Sequence[tuple[SegmentReader, Sequence[tuple[int, int]]]]) -> int:
    """`prefetch_segments` of byte ranges (each segment's reader and `SegmentReader.ranges`)."""
    todo = [(reader, ranges) for reader, ranges in reads if not reader.is_resident(ranges)]
    if not todo:
        return 0
    for reader, ranges in todo:
        reader.advise(ranges, HEAD_BYTES)
    for reader, ranges in todo:
        reader.touch(ranges)
    _readahead().put(todo)
    return sum(end - start for _, ranges in todo for start, end in ranges)


def wait_for_readahead() -> None:
    """Return once the readahead thread has asked for everything queued so far."""
    if _start_readahead.cache_info().currsize:
        _readahead().join()


_readahead_lock = threading.Lock()


def _readahead() -> queue.Queue:
    """This process's readahead thread (a daemon) and its queue of ``[(reader, ranges)]``."""
    with _readahead_lock:
        return _start_readahead()


@functools.cache
def _start_readahead() -> queue.Queue:
    tasks: queue.Queue = queue.Queue()

    def advise(todo) -> None:
        try:
            for reader, ranges in todo:
                reader.advise(ranges)
        except Exception as exc:  # a reader closed meanwhile: its reads fault pages in instead
            log.debug("segment readahead failed (%s)", exc)

    def run() -> None:
        while True:
            advise(tasks.get())  # (holds no reader between tasks: a map closes when its tier drops it)
            tasks.task_done()

    threading.Thread(target=run, name="kvcache-readahead", daemon=True).start()
    return tasks


def _after_fork_in_child() -> None:  # a child has no readahead thread: it starts its own
    global _readahead_lock
    _readahead_lock = threading.Lock()
    _start_readahead.cache_clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class SegmentRow:
    key: str
    batch_id: int
    row_id: int
    num_bytes: int


def new_segment_name() -> str:
    return f"{time.time_ns():020d}-{os.getpid()}-{next(_sequence):06d}{SEGMENT_SUFFIX}"


def is_segment_name(name: str) -> bool:
    return name.endswith(SEGMENT_SUFFIX) and not name.startswith(".")


def write_segment(directory: Path, name: str, items: Sequence[tuple[str, object]], *,
                  lru_rows: Sequence[int] | None = None) -> tuple[list[SegmentRow], int]:
    """Write `items` ((key, record bytes)) as the new segment `name`, rows in that order;
    `lru_rows` (a permutation of the row ids, least recently used first) is kept as the
    ``kv.lru_rows`` metadata when it is not the row order. Returns (rows, file bytes)."""
    tmp_path = directory / f".{name}.{os.getpid()}.tmp"
    views = [memoryview(value).cast("B") for _, value in items]
    offsets = np.zeros(len(views) + 1, dtype=np.int64)
    np.cumsum([v.nbytes for v in views], out=offsets[1:])
    records = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(views), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(views))]
    )
    schema = SEGMENT_SCHEMA
    if lru_rows is not None and list(lru_rows) != list(range(len(items))):
        if sorted(lru_rows) != list(range(len(items))):
            raise ValueError("lru_rows must be a permutation of the row ids")
        schema = schema.with_metadata({LRU_ROWS: ",".join(map(str, lru_rows)).encode()})
    batch = pa.record_batch([pa.array([key for key, _ in items], pa.utf8()), records], schema=schema)
    try:
        with pa.OSFile(str(tmp_path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
        os.replace(tmp_path, directory / name)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    rows = [SegmentRow(key, 0, i, v.nbytes) for i, ((key, _), v) in enumerate(zip(items, views))]
    return rows, (directory / name).stat().st_size


def remove_stale_temps(directory: Path) -> None:
    """Delete temp files left by writers that are no longer running."""
    for path in directory.glob(".*.tmp"):
        pid = path.name.rsplit(".", 2)[-2]
        if pid.isdigit() and _is_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SegmentReader:
    """One memory-mapped segment. Raises (OSError, pyarrow errors) if the file is unreadable."""

    def __init__(self, path: Path):
        self.path = path
        self._file = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(self._file)
        if reader.schema.remove_metadata() != SEGMENT_SCHEMA:
            raise ValueError(f"{path.name}: not a KV segment (schema {reader.schema})")
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self._lru_rows = (reader.schema.metadata or {}).get(LRU_ROWS)
        self._offsets = []
        self._data: list[pa.Buffer | None] = []  # each batch's record bytes (the memory map)
        for batch in self._batches:
            column = batch.column(1)
            self._offsets.append(np.frombuffer(  # (copied: a read then touches only its record's pages)
                column.buffers()[1], dtype=np.int64, count=len(column) + 1, offset=8 * column.offset
            ).copy())
            self._data.append(column.buffers()[2])
        self._file.seek(0)
        self._whole = self._file.read_buffer(self._file.size())  # the whole mapping, zero-copy
        self._probe = np.zeros(1, dtype=np.uint8)  # mincore's output for one page

    def ranges(self, buffers: Sequence[pa.Buffer]) -> list[tuple[int, int]]:
        """Where `buffers` (slices `read` returned) lie in the file: (start, end) byte offsets,
        in file order."""
        base, size = self._whole.address, self._whole.size
        return sorted(r for r in ((b.address - base, b.address - base + b.size) for b in buffers if b.size)
                      if 0 <= r[0] <= r[1] <= size)

    def is_resident(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """Whether `ranges` (file order) seem to be in memory: a probe, mincore of one page per
        `PROBE_STRIDE` over the extent they span (a few us). True where it cannot tell."""
        if not ranges:
            return True
        try:
            mincore, probe, base = _libc().mincore, self._probe, self._whole.address
            address = probe.ctypes.data
            first, last = ranges[0][0], max(end for _, end in ranges) - 1
            pages = [*range(first - first % _PAGE, last, PROBE_STRIDE), last - last % _PAGE]
            return all(mincore(base + page, 1, address) == 0 and probe[0] & 1 for page in pages)
        except (AttributeError, OSError):
            return True

    def advise(self, ranges: Sequence[tuple[int, int]], limit: int | None = None) -> int:
        """POSIX_FADV_WILLNEED (asynchronous readahead) for `ranges` (file order; each cut to
        its first `limit` bytes if given), adjacent ones merged, one call per readahead window
        (the most the kernel reads per call). Returns the bytes asked for."""
        merged: list[list[int]] = []
        for start, end in ranges:
            start -= start % _PAGE
            end = end if limit is None else min(end, start + limit)
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        try:
            fd = self._file.fileno()
            window = _readahead_bytes(os.fstat(fd).st_dev)
            for start, end in merged:
                for chunk in range(start, end, window):
                    os.posix_fadvise(fd, chunk, min(window, end - chunk), os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):  # no posix_fadvise here
            return 0
        return sum(end - start for start, end in merged)

    def touch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Read one byte of the first page of each range through the map: returns once those
        pages are in memory (waiting for reads in flight)."""
        base = self._whole.address
        for start, _ in ranges:
            ctypes.c_char.from_address(base + start).value

    def prefetch(self, buffers: Sequence[pa.Buffer]) -> int:
        """`prefetch_segments` of this segment alone: the bytes asked for (0: in memory)."""
        return prefetch_segments([(self, buffers)])

    def drop_cached_pages(self) -> None:
        """Evict this segment from memory: release the process's mapped pages of it (read
        again, they fault in from the file) and drop the file from the page cache (`evict_file`).
        Nothing the reader returned changes: its buffers read the same bytes, from disk."""
        wait_for_readahead()  # (a readahead asked for after the eviction would undo it)
        whole = self._whole
        if whole.size and _libc().madvise(whole.address, whole.size, _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
        evict_file(self.path)

    def scan(self) -> list[SegmentRow]:
        """Every row, least recently used first: in the order ``kv.lru_rows`` records where it
        is valid (a permutation of the rows of a one-batch segment), else in file order."""
        rows = []
        for batch_id, (batch, offsets) in enumerate(zip(self._batches, self._offsets)):
            batch.column(0).validate(full=True)
            sizes = np.diff(offsets)
            for row_id, key in enumerate(batch.column(0).to_pylist()):
                rows.append(SegmentRow(key, batch_id, row_id, int(sizes[row_id])))
        order = self._lru_order(len(rows))
        return rows if order is None else [rows[i] for i in order]

    def _lru_order(self, num_rows: int) -> list[int] | None:
        if self._lru_rows is None or len(self._batches) != 1:
            return None
        try:
            order = [int(i) for i in self._lru_rows.split(b",")]
        except ValueError:
            return None
        return order if sorted(order) == list(range(num_rows)) else None

    def read(self, batch_id: int, row_id: int) -> pa.Buffer:
        """The record bytes at (batch, row): a zero-copy slice of the memory map."""
        start, end = self._offsets[batch_id][row_id:row_id + 2].tolist()
        data = self._data[batch_id]
        if data is None or start < 0 or end > data.size or end < start:
            raise ValueError(f"{self.path.name}: row {row_id} out of bounds")
        return data.slice(start, end - start)
