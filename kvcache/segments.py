"""Disk segment files: Arrow IPC files that group many records, written atomically.

Owns no state beyond one open file per `SegmentReader`. A segment is an Arrow IPC *file* with
columns ``key`` (utf8) and ``record`` (large_binary: the record bytes of record.py, unchanged).
Segments are immutable: written to ``.<name>.<pid>.tmp`` then renamed into place, so readers
only ever see complete files; they are read through `pyarrow.memory_map` (zero-copy).
Names sort by creation time: ``<time_ns>-<pid>-<seq>.kvseg``.
"""

from __future__ import annotations

import itertools
import os
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


def write_segment(directory: Path, name: str, items: Sequence[tuple[str, object]]) -> tuple[list[SegmentRow], int]:
    """Write `items` ((key, record bytes)) as the new segment `name`; return (rows, file bytes)."""
    tmp_path = directory / f".{name}.{os.getpid()}.tmp"
    views = [memoryview(value).cast("B") for _, value in items]
    offsets = np.zeros(len(views) + 1, dtype=np.int64)
    np.cumsum([v.nbytes for v in views], out=offsets[1:])
    records = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(views), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(views))]
    )
    batch = pa.record_batch([pa.array([key for key, _ in items], pa.utf8()), records], schema=SEGMENT_SCHEMA)
    try:
        with pa.OSFile(str(tmp_path), "wb") as sink, pa.ipc.new_file(sink, SEGMENT_SCHEMA) as writer:
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
        self._offsets = []
        self._data: list[pa.Buffer | None] = []  # each batch's record bytes (the memory map)
        for batch in self._batches:
            column = batch.column(1)
            self._offsets.append(np.frombuffer(
                column.buffers()[1], dtype=np.int64, count=len(column) + 1, offset=8 * column.offset
            ))
            self._data.append(column.buffers()[2])

    def scan(self) -> list[SegmentRow]:
        rows = []
        for batch_id, (batch, offsets) in enumerate(zip(self._batches, self._offsets)):
            batch.column(0).validate(full=True)
            sizes = np.diff(offsets)
            for row_id, key in enumerate(batch.column(0).to_pylist()):
                rows.append(SegmentRow(key, batch_id, row_id, int(sizes[row_id])))
        return rows

    def read(self, batch_id: int, row_id: int) -> pa.Buffer:
        """The record bytes at (batch, row): a zero-copy slice of the memory map."""
        start, end = self._offsets[batch_id][row_id:row_id + 2].tolist()
        data = self._data[batch_id]
        if data is None or start < 0 or end > data.size or end < start:
            raise ValueError(f"{self.path.name}: row {row_id} out of bounds")
        return data.slice(start, end - start)
