"""Deferred restore: a looked-up state whose bytes are verified and copied once, straight into
the engine's state (``KVCacheService.lookup(..., is_deferred=True)``; resume.py loads it).

Owns: one hit's tensors until they are loaded, and the verification of its block and span
records. Why: a restore that assembles the state dict (one copy) which the engine then loads
into its pooled state (a second copy), with a checksum pass before, reads every byte three
times; here `SequenceState.load` copies every row block once into its final place (pool
pages), and each record's checksum pass runs right before its rows are copied (``before_block``
of ``SequenceState.load``: block j of every entries tensor comes from run record j), so the copy
reads bytes the checksum pass just brought into cache. Where a memory-mapped file's pages
already sit in cache, that is one read from there, one from L2 and one write.

With the byte kernels (model_shards/byte_kernels.py: C, built once per machine) the check and
the copy are ONE pass (``copy_block`` of ``SequenceState.load``): the load hands over the byte
copies of block j, and `colsum64_copy` reads each word of run record j's data region once,
adding it to its ``colsum64`` column sum and storing it into the state's pages in the same loop
(words outside the copied rows, e.g. the blocks a cut span does not use, are only summed); the
record is then verified from those sums (`Record.verify`, the same digest as checksum.py) and
promoted. One read and one write per byte, as a plain ``read()`` of the file. Records with
another checksum, already verified ones and non-CPU destinations keep the two passes; without
a C compiler (warned once) every record does.

The checkpoint record (the window, tails, overlaps and the entries rows past the last full
block) is small and verified by the lookup itself; the run records (block or span records,
borrowed views of the fetched bytes) are verified during the load. A run that fails its check
is deleted from its tier and counted as corrupt (`TierStack.settle`), `load_into` stops and
returns False, and the caller must discard the state it was loading into (partly written, with
unverified bytes; in the fused pass the corrupt record's own bytes too): a miss, never a wrong
answer. Asking the service again then finds the next copy below, a shorter prefix, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model_shards import byte_kernels


class CorruptRun(Exception):
    """A run record failed its checksum during a deferred load (it was deleted from its tier)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _address(block) -> int:
    """The first byte of a byte row block (a `Record.byte_views` tuple) in memory."""
    return block[0].__array_interface__["data"][0]


def _fused_enabled() -> bool:
    """Whether `load_into` verifies and copies in one pass (model_shards/byte_kernels.py: a C
    kernel, built on first use; without a compiler, warned once, the numpy passes)."""
    return byte_kernels.is_available()


class DeferredState:
    """The state at one lookup position, its bytes not yet copied.

    `tensors`: the state dict in ``SequenceState.load`` form: non-entries tensors are views of
    the (verified) checkpoint record; each "*.entries" value is a list of row blocks, block j a
    view of run j's record (j < num_runs; unverified until settled): for a record decoded from
    bytes a byte view ``(uint8 array, dtype, shape)`` (``SequenceState.load`` copies it with one
    numpy byte copy, building no tensor), else a tensor; the last block the checkpoint's rows.
    `runs` are the lookup's hits (`hierarchy.Hit`) of the run records, in
    block order; ``settle(hit)`` (`TierStack.settle`) verifies (and promotes) one: False if it
    is corrupt (it was deleted from its tier).
    """

    def __init__(self, tensors: dict[str, torch.Tensor | list[torch.Tensor]], runs: Sequence,
                 settle: Callable[..., bool], sources: dict[int, int] | None = None):
        self.tensors = tensors
        self.runs = list(runs)
        self._settle = settle
        self._sources = {} if sources is None else sources  # id(byte view) -> its first byte's address
        self._num_settled = 0  # runs [0, _num_settled) are verified (`load` goes in block order)

    @property
    def num_runs(self) -> int:
        return len(self.runs)

    def _before_block(self, block_id: int) -> None:
        """`SequenceState.load`'s hook: verify run `block_id` (and any before it not yet
        verified) right before its rows are copied."""
        while self._num_settled <= block_id and self._num_settled < len(self.runs):
            hit = self.runs[self._num_settled]
            if not self._settle(hit):
                raise CorruptRun(hit.record.key)
            self._num_settled += 1

    def _copy_block(self, block_id: int, copies: list) -> None:
        """`SequenceState.load`'s hook when fused: copy the byte blocks `block_id` (``copies``,
        see ``SequenceState.load``: all from run record `block_id`) while summing the record's
        words by columns (byte_kernels.colsum64_copy: every byte of the record read once), then
        verify those sums (`TierStack.settle`). A corrupt record raises `CorruptRun` after its
        bytes were copied: the state then holds them and must be discarded (`load_into`)."""
        self._before_block(block_id - 1)   # (runs before it: settled by now, in block order)
        sources = self._sources
        segments = sorted(((sources.get(id(block)) or _address(block)) + offset, count, dest)
                          for block, offset, count, dest in copies)
        flat = [x for segment in segments for x in segment]
        if block_id >= len(self.runs) or self._num_settled > block_id:   # verified bytes: plain copies
            byte_kernels.copy_segments(flat)
            return
        hit = self.runs[block_id]
        fused = hit.record.fused_check() if copies and hit.pending is not None else None
        if fused is None:   # nothing pending (verified), another checksum, or nothing to copy: its own pass
            self._before_block(block_id)
            byte_kernels.copy_segments(flat)
            return
        base, num_words, width = fused
        sums = byte_kernels.colsum64_copy(base, num_words, width, flat)
        if sums is None:   # (ranges outside the record: never, the views are slices of it)
            raise ValueError(f"row blocks outside record {hit.record.key}")
        if not self._settle(hit, sums):
            raise CorruptRun(hit.record.key)
        self._num_settled += 1

    def load_into(self, state) -> bool:
        """Load into `state` (a fresh engine state: ``SequenceState.load`` with the row blocks).
        False if a run record failed its checksum on the way (deleted from its tier): `state`
        is then partly loaded and must be discarded. Shape errors raise before `state` changes.
        With the byte kernels (`_fused_enabled`) each run record's bytes are verified in the
        pass that copies them (`_copy_block`); without, each record's checksum pass runs right
        before its rows are copied (`_before_block`)."""
        try:
            if _fused_enabled():
                state.load(self.tensors, copy_block=self._copy_block)
            else:
                state.load(self.tensors, before_block=self._before_block)
            self._before_block(len(self.runs) - 1)  # runs no entries tensor used (none in practice)
        except CorruptRun:
            return False
        return True
