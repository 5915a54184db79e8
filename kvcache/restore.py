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

The checkpoint record (the window, tails, overlaps and the entries rows past the last full
block) is small and verified by the lookup itself; the run records (block or span records,
borrowed views of the fetched bytes) are verified during the load. A run that fails its check
is deleted from its tier and counted as corrupt (`TierStack.settle`), `load_into` stops and
returns False, and the caller must discard the state it was loading into (partly written, with
unverified bytes): a miss, never a wrong answer. Asking the service again then finds the next
copy below, a shorter prefix, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class CorruptRun(Exception):
    """A run record failed its checksum during a deferred load (it was deleted from its tier)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


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
                 settle: Callable[[object], bool]):
        self.tensors = tensors
        self.runs = list(runs)
        self._settle = settle
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

    def load_into(self, state) -> bool:
        """Load into `state` (a fresh engine state: ``SequenceState.load`` with the row blocks).
        False if a run record failed its checksum on the way (deleted from its tier): `state`
        is then partly loaded and must be discarded. Shape errors raise before `state` changes."""
        try:
            state.load(self.tensors, before_block=self._before_block)
            self._before_block(len(self.runs) - 1)  # runs no entries tensor used (none in practice)
        except CorruptRun:
            return False
        return True
