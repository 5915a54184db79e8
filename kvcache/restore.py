"""Deferred restore: a looked-up state whose bytes are verified and copied once, straight into
the engine's state (``KVCacheService.lookup(..., is_deferred=True)``; resume.py loads it).

Owns: one hit's tensors until they are loaded, the verification of its block and span
records, and (shared with the other replays of its restore plan, if any) `caches`. Why: a restore that assembles the state dict (one copy) which the engine then loads
into its pooled state (a second copy), with a checksum pass before, reads every byte three
times; here `SequenceState.load` copies every row block once into its final place (pool
pages), and each record's checksum pass runs right before its rows are copied (``before_block``
of ``SequenceState.load``: block j of every entries tensor comes from run record j), so the copy
reads bytes the checksum pass just brought into cache. Where a memory-mapped file's pages
already sit in cache, that is one read from there, one from L2 and one write.

With the byte kernels (model_shards/byte_kernels.py: C, built once per machine) the check and
the copy are ONE pass (``copy_blocks`` of ``SequenceState.load``): the load plans every block
and hands over all the byte copies at once, and ONE `colsum64_copy_many` call reads each word
of every run record's data region once, adding it to its ``colsum64`` column sum and storing
it into the state's pages in the same loop (words outside the copied rows, e.g. the blocks a
cut span does not use, are only summed); each record is then verified from its sums
(`Record.verify`, the same digest as checksum.py) and promoted, in block order. One read and
one write per byte, as a plain ``read()`` of the file, and a fixed cost per load rather than
per record. The kernel shares the records out over `num_threads` threads (whole records, about
equal bytes, >= 1 MiB each; ``KVCacheConfig.restore_threads``, default min(4, usable CPUs)):
one core's copy is bound by its own load / store throughput, not by the memory system (12.9 MB
on 2 cores: 1.2 -> 0.7 ms); each record's sums do not depend on how they are shared out.
Already verified records are plain copies (over the same threads), records with another
checksum keep their own checksum pass; without a C compiler (warned once) every record does. The
DeferredStates a restore plan hands out (restore_plan.py) share `caches`: the engine state's
`LoadPlan` (its checks and copy plan, ``SequenceState.plan_load``) and the kernel's copy layout,
made at the first load and used by every replay's.

The checkpoint record (the window, tails, overlaps and the entries rows past the last full
block) is small and verified by the lookup itself; the run records (block or span records,
borrowed views of the fetched bytes) are verified during the load. A run that fails its check
is deleted from its tier and counted as corrupt (`TierStack.settle`), `load_into` stops (the
runs after it stay unverified and unpromoted) and returns False, and the caller must discard
the state it was loading into (partly written, with unverified bytes; in the fused pass every
run's bytes, the corrupt record's too): a miss, never a wrong answer. Asking the service again
then finds the next copy below, a shorter prefix, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from model_shards import byte_kernels
from model_shards.state_load import ByteCopies


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
                 settle: Callable[..., bool], sources: dict[int, int] | None = None, caches: dict | None = None,
                 num_threads: int = 1):
        self.tensors = tensors
        self.runs = list(runs)
        self._settle = settle
        self._sources = {} if sources is None else sources  # id(byte view) -> its first byte's address
        self._num_settled = 0  # runs [0, _num_settled) are verified (`load` goes in block order)
        # what loads of `tensors` plan (the state's `LoadPlan`s, each one's `_CopyLayout`), shared by
        # the DeferredStates of one restore plan (restore_plan.py), which load the same tensors; None:
        # this one is loaded once, so nothing is kept (planning it would only cost)
        self.caches = caches
        self.num_threads = num_threads   # of the fused verify + copy (records shared out over threads)

    @property
    def num_runs(self) -> int:
        return len(self.runs)

    @property
    def sources(self) -> dict[int, int]:
        """id(byte view) -> its first byte's address (read-only; shared with restore plans)."""
        return self._sources

    def _before_block(self, block_id: int) -> None:
        """`SequenceState.load`'s hook: verify run `block_id` (and any before it not yet
        verified) right before its rows are copied."""
        while self._num_settled <= block_id and self._num_settled < len(self.runs):
            hit = self.runs[self._num_settled]
            if not self._settle(hit):
                raise CorruptRun(hit.record.key)
            self._num_settled += 1

    def _copy_blocks(self, copies: ByteCopies) -> None:
        """`SequenceState.load`'s hook when fused: every byte copy of the load (`copies`, see
        ``SequenceState.load``: block j's come from run record j). The pending runs with a
        ``colsum64`` check and something to copy are copied in ONE kernel call that sums each
        record's words by columns while copying (byte_kernels.colsum64_copy_many: every byte of
        those records read once); then, in block order, each run is verified (`TierStack.settle`:
        from its sums, or its own checksum pass) and the rest copied (verified bytes). A
        corrupt record raises `CorruptRun` after the copies: the state then holds unverified
        bytes and must be discarded (`load_into`)."""
        runs = self.runs
        is_kept = copies.layout is not None and self.caches is not None
        layout = self.caches.get(copies.layout) if is_kept else None
        if layout is None:
            layout = _CopyLayout(copies, self._sources, len(runs))
            if is_kept:
                self.caches[copies.layout] = layout
        segments = layout.segments(copies.dests)   # [copies, 3]: sorted by run, then by source
        bounds = layout.bounds                     # run j's copies: segments[bounds[j]:bounds[j + 1]]
        records: list[int] = []     # (base, num_words, width, num_segments) per fused record
        fused_at: dict[int, tuple[int, int]] = {}   # run id -> (where its sums start, how many)
        others: list[int] = []      # runs whose copies are plain (verified, or verified by their own pass)
        num_sums = 0
        for j, hit in enumerate(runs):
            num_copies = bounds[j + 1] - bounds[j]
            fused = hit.record.fused_check() if num_copies and hit.pending is not None else None
            if fused is None:
                others.append(j)
                continue
            records += (*fused, num_copies)
            fused_at[j] = (num_sums, fused[2])
            num_sums += fused[2]
        if records:
            fused_segments = segments[:bounds[len(runs)]] if not others else np.concatenate(
                [segments[bounds[j]:bounds[j + 1]] for j in fused_at])
            sums = byte_kernels.colsum64_copy_many(records, fused_segments, self.num_threads)
            if sums is None:   # (ranges outside a record: never, the views are slices of them)
                raise ValueError("row blocks outside their records")
        for j, hit in enumerate(runs):   # in block order: settled (and promoted) as without the kernel
            if j < self._num_settled:
                continue
            at = fused_at.get(j)
            if not (self._settle(hit) if at is None else self._settle(hit, sums[at[0]:at[0] + at[1]])):
                raise CorruptRun(hit.record.key)
            self._num_settled += 1
        plain = segments[bounds[len(runs)]:]   # (the checkpoint's blocks: none in practice, it holds tensors)
        if others:
            plain = np.concatenate([plain, *(segments[bounds[j]:bounds[j + 1]] for j in others)])
        byte_kernels.copy_segments(plain, self.num_threads)

    def _load_plan(self, state):
        """`state`'s `LoadPlan` of `tensors` (``state.plan_load``; kept in `caches`), or None
        without `caches` or for a state without load plans."""
        if self.caches is None or not hasattr(state, "plan_load"):
            return None
        plans = self.caches.setdefault("load_plans", [])
        for plan in plans:
            if plan.fits(state):
                return plan
        plan = state.plan_load(self.tensors)   # (shape errors raise here, before `state` changes)
        plans.append(plan)
        return plan

    def load_into(self, state) -> bool:
        """Load into `state` (a fresh engine state: ``SequenceState.load`` with the row blocks).
        False if a run record failed its checksum on the way (deleted from its tier): `state`
        is then partly loaded and must be discarded. Shape errors raise before `state` changes.
        With the byte kernels (`_fused_enabled`) the run records' bytes are verified in the
        pass that copies them (`_copy_blocks`); without, each record's checksum pass runs right
        before its rows are copied (`_before_block`)."""
        try:
            if _fused_enabled():
                plan = self._load_plan(state)
                if plan is None:
                    state.load(self.tensors, copy_blocks=self._copy_blocks)
                else:
                    state.load(self.tensors, copy_blocks=self._copy_blocks, plan=plan)
            else:
                state.load(self.tensors, before_block=self._before_block)
            self._before_block(len(self.runs) - 1)  # runs no entries tensor used (none in practice)
        except CorruptRun:
            return False
        return True


class _CopyLayout:
    """A load's `ByteCopies` but their destinations, arranged for the kernel: the copies sorted by
    run (block id; blocks past the runs last), then by source address, with their sources and
    byte counts, and where each run's copies start (`bounds`, ``num_runs + 2`` entries). The
    same for every load of one `LoadPlan` (`DeferredState.caches`)."""

    def __init__(self, copies: ByteCopies, sources: dict[int, int], num_runs: int):
        starts = np.array([sources.get(id(block)) or _address(block) for block in copies.blocks], dtype=np.int64)
        src = starts[copies.block_index] + copies.offsets if len(copies) else np.zeros(0, np.int64)
        ids = np.minimum(copies.block_ids, num_runs)
        self.order = np.lexsort((src, ids))
        self.sources, self.counts = src[self.order], copies.counts[self.order]
        self.bounds = np.searchsorted(ids[self.order], np.arange(num_runs + 2)).tolist()

    def segments(self, dests: np.ndarray) -> np.ndarray:
        """[copies, 3] int64: (source address, byte count, destination address), in order."""
        out = np.empty((len(self.order), 3), dtype=np.int64)
        out[:, 0], out[:, 1], out[:, 2] = self.sources, self.counts, dests[self.order]
        return out
