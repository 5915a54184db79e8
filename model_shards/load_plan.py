"""LoadPlan: `SequenceState.load`'s checks and copy plan of one tensors dict, kept to load the same
dict again into fresh states (``SequenceState.plan_load``; what a KV cache restore plan replays).

Owns only what it planned: the tensors it copies from (kept alive with it) and arrays of sizes
and offsets. The loads themselves write into the states they are given (state.py owns those);
the one-shot load path is state_load.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .byte_kernels import copy_segments, is_available as has_byte_kernels
from .state_load import ByteCopies, _as_byte_rows, checked_load

if TYPE_CHECKING:
    from .state import SequenceState


class LoadPlan:
    """`SequenceState.load`'s checks and copy plan of one tensors dict (``SequenceState.plan_load``),
    kept to load the same dict again into fresh states of the same structure (config, dtype,
    device: `fits`) without checking it again: what a KV cache restore plan loads per replay.

    Where every entries block is `ByteRows` of the state's dtype (or a contiguous CPU tensor of
    it: handed over too, as a byte view kept by the plan), the handed-over copies are planned
    once as arrays (each block: one copy, at a byte offset from its compressor's first
    entry), and a load whose compressors' entries are one run each (the usual case: one growth
    buffer, or consecutive pages) only adds each run's address (`byte_copies`). Where the fixed
    parts (windows, tails, overlaps) are contiguous CPU tensors of the state's dtype and the byte
    kernels are built, they are byte copies in one C call (`copy_fixed`). Holds the tensors it
    copies from (they stay alive with it)."""

    def __init__(self, state: SequenceState, tensors: dict):
        n, comps = checked_load(state, tensors)
        self.config, self.dtype, self.device = state.config, state.dtype, str(state.device)
        self.num_tokens = n
        self.comps = [(i, name, parts) for i, name, _, parts in comps]   # [(layer id, "comp" | "index", parts)]
        self.windows = [tensors[f"{i}.window"] for i in range(len(state.layers))]
        # the entries copies: block, its compressor k, its j, byte count, byte offset from the run's start
        table, blocks = [], []
        for k, (_, _, cs, parts) in enumerate(comps):
            row_bytes, row = cs.dim * state.dtype.itemsize, 0
            for j, block in enumerate(parts["entries"]):
                if type(block) is not tuple:   # a tensor block (e.g. the last rows, from a checkpoint)
                    block = _as_byte_rows(block, state.dtype)
                if block is None or block[1] is not state.dtype:
                    table = blocks = None
                    break
                table.append((len(blocks), k, j, block[0].nbytes, row * row_bytes))
                blocks.append(block)
                row += block[2][0]
            if blocks is None:
                break
        self.blocks = blocks   # None: some block is not a plain byte copy (planned block by block)
        table = np.array(table or [], dtype=np.int64).reshape(-1, 5)
        self.block_index, self.comp_of, self.block_ids = table[:, 0], table[:, 1], table[:, 2]
        self.counts, self.offsets_in_run, self.offsets = table[:, 3], table[:, 4], np.zeros(len(table), np.int64)
        self.fixed = self._plan_fixed(state, comps, n)

    def fits(self, state: SequenceState) -> bool:
        """Whether `state` has the structure this plan was made for."""
        return state.config is self.config and state.dtype is self.dtype and str(state.device) == self.device

    def _plan_fixed(self, state: SequenceState, comps: list, n: int) -> tuple | None:
        """The fixed parts as byte copies (`load_window` and `set_fixed` as bytes): ([(kind,
        layer id or compressor k)] of each destination tensor, [copies, 3] int64 of (source
        address, byte count, byte offset in its destination), each copy's destination index),
        or None if a source is not a contiguous CPU tensor of the state's dtype."""
        sources = [*self.windows, *(t for _, _, _, parts in comps for name, t in parts.items() if name != "entries")]
        if any(t.device.type != "cpu" or t.dtype is not state.dtype or not t.is_contiguous() for t in sources):
            return None
        size = state.dtype.itemsize
        dests, copies = [], []
        for i, (layer, window) in enumerate(zip(state.layers, self.windows)):
            W, S, row = layer.ring.shape[0], window.shape[0], window.shape[1] * size
            keep = min(S, W)
            start = (n - keep) % W                 # (as `load_window`)
            head = min(keep, W - start)
            src = window.data_ptr()
            copies += [(src + (S - keep) * row, head * row, start * row, len(dests)),
                       (src + (S - keep + head) * row, (keep - head) * row, 0, len(dests))]
            dests.append(("ring", i))
        for k, (_, _, cs, parts) in enumerate(comps):
            names = ["tail_kv", "tail_gate"] + (["overlap_kv", "overlap_gate"] if cs.is_overlapping
                                                and parts["overlap_kv"].shape[0] else [])
            for name in names:
                copies.append((parts[name].data_ptr(), parts[name].numel() * size, 0, len(dests)))
                dests.append(("_" + name, k))
        table = np.array([c for c in copies if c[1]] or [], dtype=np.int64).reshape(-1, 4)
        return dests, np.ascontiguousarray(table[:, :3]), table[:, 3]

    def copy_fixed(self, state: SequenceState, comps: list) -> bool:
        """`load_window` of every layer and `set_fixed` of every compressor as ONE call of byte
        copies; False (nothing done) where the plan or the state does not allow it."""
        if self.fixed is None or not self.device.startswith("cpu") or not has_byte_kernels():
            return False
        dests, table, dest_of = self.fixed
        bases = []
        for kind, at in dests:   # (the same shapes: the state `fits`)
            dest = state.layers[at].ring if kind == "ring" else getattr(comps[at][2], kind)
            if not dest.is_contiguous():
                return False
            bases.append(dest.data_ptr())
        segments = table.copy()
        segments[:, 2] += np.array(bases, dtype=np.int64)[dest_of]
        copy_segments(segments)
        for layer in state.layers:
            layer.num_tokens = self.num_tokens
        for _, _, cs, parts in comps:
            cs.num_tail = parts["tail_kv"].shape[0]
        return True

    def byte_copies(self, comps: list, page_runs: list) -> ByteCopies | None:
        """The handed-over copies of a load whose compressors' entries (their `page_runs`, None
        for a growth buffer) are one CPU run each (or none); None otherwise. Counts the entries
        as appended."""
        if self.blocks is None or not self.device.startswith("cpu"):
            return None
        bases = []
        for (_, _, cs, _), runs in zip(comps, page_runs):
            if runs is None:   # (the growth buffer: one run)
                bases.append(cs._entries.data_ptr())
            elif len(runs) > 1:
                return None
            else:              # (the run's first row in the page store; no run: no rows)
                pool, key, _ = cs._paged
                store = pool.pages[key]
                bases.append(store.data_ptr() + runs[0][2] * cs.dim * store.element_size() if runs else 0)
        for _, _, cs, _ in comps:
            cs.num_entries = self.num_tokens // cs.rate
        dests = np.array(bases, dtype=np.int64)[self.comp_of] + self.offsets_in_run
        return ByteCopies(self.blocks, self.block_index, self.block_ids, self.offsets, self.counts, dests, self)
