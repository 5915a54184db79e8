"""Memory for restored state: recycled, warm, and backed by transparent huge pages where the
kernel allows.

Owns: `POOL`, the process's pool of buffers that restored tensors live in. Restoring a context
writes its whole state into new memory; memory that was never touched costs page faults, which
here cost more than the copy itself (measured: a copy into fresh 4 KiB pages runs at ~2 GB/s,
into fresh huge pages at ~6.7 GB/s, into warm memory at ~11 GB/s). Whether glibc hands back warm
memory depends on what else the process allocated in between (redis-py's reply buffers, for
one), so `empty` does not leave it to chance: a tensor of at least `MIN_POOLED_BYTES` is a view
of a pooled anonymous mapping (advised ``MADV_HUGEPAGE``, a no-op where THP is off). The tensor
keeps its buffer busy (through the buffer protocol) until the last view of it dies; the buffer
then goes back to the pool, warm, for the next restore. Idle buffers beyond `max_idle_bytes` are
unmapped, least recently used first. Smaller tensors come from torch's allocator.
"""

from __future__ import annotations

import mmap
import sys
import threading
import warnings

import torch

MIN_POOLED_BYTES = 1 << 20
MAX_IDLE_BYTES = 256 << 20
_HUGE_PAGE = 2 << 20
_HAS_MADVISE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap.mmap, "madvise")


def _new_mapping(num_bytes: int) -> mmap.mmap:
    mapping = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _HAS_MADVISE:
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP unavailable: ordinary pages
    return mapping


def _idle_refs() -> int:
    """`sys.getrefcount` of a pooled buffer nobody else holds, as `BufferPool.take` sees it."""
    held = [object()]
    for item in held:
        return sys.getrefcount(item)
    raise AssertionError


class BufferPool:
    """Anonymous mappings handed out as tensors and taken back once no tensor uses them.

    A buffer is busy while any tensor made from it lives (torch holds the buffer through the
    buffer protocol), so it is reused only after every view of the tensors it backed is gone:
    never two live tensors on the same memory. Thread-safe.
    """

    _IDLE_REFS = _idle_refs()

    def __init__(self, *, max_idle_bytes: int = MAX_IDLE_BYTES):
        self.max_idle_bytes = max_idle_bytes
        self._buffers: list[mmap.mmap] = []  # least recently taken first
        self._lock = threading.Lock()
        self.num_taken = self.num_reused = 0

    def take(self, num_bytes: int) -> torch.Tensor:
        """A uint8 tensor of `num_bytes` on pooled memory (contents undefined)."""
        with self._lock:
            self.num_taken += 1
            buffer = self._reusable(num_bytes)
            if buffer is None:
                buffer = _new_mapping(max(_HUGE_PAGE, -(-num_bytes // _HUGE_PAGE) * _HUGE_PAGE))
            else:
                self._buffers.remove(buffer)
                self.num_reused += 1
            self._buffers.append(buffer)
            with warnings.catch_warnings():  # a MAP_PRIVATE mapping is writable; torch need not warn
                warnings.simplefilter("ignore")
                tensor = torch.frombuffer(buffer, dtype=torch.uint8, count=num_bytes)
            self._trim()
        return tensor

    def _reusable(self, num_bytes: int) -> mmap.mmap | None:
        """The smallest idle buffer that holds `num_bytes` without wasting most of itself."""
        best = None
        for buffer in self._buffers:
            size = len(buffer)
            if (sys.getrefcount(buffer) == self._IDLE_REFS and num_bytes <= size <= 2 * num_bytes + _HUGE_PAGE
                    and (best is None or size < len(best))):
                best = buffer
        return best

    def _trim(self) -> None:
        idle = [b for b in self._buffers if sys.getrefcount(b) == self._IDLE_REFS]
        excess = sum(len(b) for b in idle) - self.max_idle_bytes
        for buffer in idle:  # least recently taken first
            if excess <= 0:
                break
            self._buffers.remove(buffer)
            excess -= len(buffer)
        del idle  # the last references: their mappings are unmapped now

    @property
    def num_idle_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._buffers if sys.getrefcount(b) == self._IDLE_REFS)

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._buffers)


POOL = BufferPool()


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor; pooled memory from `MIN_POOLED_BYTES` up."""
    numel = 1
    for size in shape:
        numel *= size
    num_bytes = numel * dtype.itemsize
    if num_bytes < MIN_POOLED_BYTES:
        return torch.empty(shape, dtype=dtype)
    return POOL.take(num_bytes).view(dtype).view(shape)


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, dim=0)`` into memory from `empty`."""
    rows = sum(p.shape[0] for p in parts)
    out = empty((rows, *parts[0].shape[1:]), parts[0].dtype)
    return torch.cat(parts, dim=0, out=out)
