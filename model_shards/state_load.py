"""Loading a `SequenceState` from exported row blocks: `SequenceState.load` and its copies.

Owns nothing: these helpers write into the states they are given (state.py owns those). A row block
is a [rows, dim] tensor or `ByteRows`, the KV cache's deferred restore form: its bytes, copied
into CPU pages as one numpy byte copy (no tensor built), or handed back to the caller as
`ByteCopies` (``SequenceState.load(copy_blocks=...)``: the KV cache verifies and copies them in
one pass). A `LoadPlan` (load_plan.py, ``SequenceState.plan_load``) keeps a load's checks and
copy plan for loading the same tensors again into fresh states of the same structure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .load_plan import LoadPlan
    from .state import CompressorState, LayerState, SequenceState

# A row block given as its bytes (the KV cache's deferred restore passes these, see
# `SequenceState.load`): (a 1-D C-contiguous uint8 numpy array holding the rows' contiguous
# bytes, their dtype, their shape (rows, dim)). Never written.
ByteRows = tuple[np.ndarray, torch.dtype, tuple[int, int]]


_U8 = np.dtype(np.uint8)   # (a builtin dtype: one object, so `is` tells a uint8 array)


def block_rows(blocks, dim: int, key: str) -> int:
    """The rows of `blocks` in all (each a [rows, `dim`] tensor or `ByteRows`), -1 if a block
    has another width or its bytes do not match its shape; TypeError for anything else."""
    total = 0
    for b in blocks:
        if type(b) is tuple:   # ByteRows
            if len(b) != 3:
                raise TypeError(f"state tensor {key!r}: a row block must be a tensor or (bytes, dtype, shape)")
            data, dtype, shape = b
            if (type(data) is not np.ndarray or data.dtype is not _U8 or data.ndim != 1
                    or (data.strides[0] != 1 and data.size > 1) or type(dtype) is not torch.dtype):
                raise TypeError(f"state tensor {key!r}: a byte row block must be a 1-D contiguous uint8 array")
            if len(shape) != 2 or shape[1] != dim or data.nbytes != shape[0] * dim * dtype.itemsize:
                return -1
            total += shape[0]
        elif isinstance(b, torch.Tensor):
            if b.dim() != 2 or b.shape[1] != dim:
                return -1
            total += b.shape[0]
        else:
            raise TypeError(f"state tensor {key!r} must be a tensor or a list of row blocks")
    return total


def _as_byte_rows(block: torch.Tensor, dtype: torch.dtype) -> ByteRows | None:
    """A contiguous CPU tensor block of `dtype` as `ByteRows` viewing its bytes, else None."""
    if block.device.type != "cpu" or block.dtype is not dtype or not block.is_contiguous():
        return None
    return block.reshape(-1).view(torch.uint8).numpy(), block.dtype, tuple(block.shape)


def _byte_block_tensor(block: ByteRows) -> torch.Tensor:
    """A `ByteRows` block as a (read-only) tensor view of its bytes."""
    data, dtype, shape = block
    return torch.from_numpy(data).view(dtype).view(shape)


class RowSink:
    """Appends the row blocks of one `SequenceState.load` to a compressor whose entries are
    reserved: the destination views are computed once (`entry_rows`), each block is one copy
    (two where it straddles two runs of scattered pages). A `ByteRows` block of the state's
    dtype going to CPU memory is one numpy byte copy (a tensor block: one ``copy_``)."""

    def __init__(self, cs: CompressorState, num_entries: int,
                 runs: list[tuple[int, torch.Tensor]] | None = None):
        self.cs = cs
        self.runs = cs.entry_rows(cs.num_entries, num_entries) if runs is None else runs   # [(first entry, rows view)]
        self.run_id = 0
        self._byte_runs: list[tuple[int, np.ndarray]] | None = None   # the runs as flat byte arrays (made on first use)
        self._byte_dtype: torch.dtype | None = None   # the dtype byte blocks must have to be copied as bytes
        self._address_runs: list[tuple[int, int, int]] | None = None   # [(first entry, address, bytes)]

    def append(self, block) -> None:
        if type(block) is tuple:   # ByteRows
            self.append_bytes(block)
        else:
            self.append_tensor(block)

    def append_bytes(self, block: ByteRows) -> None:
        data, dtype, shape = block
        runs = self._byte_runs
        if runs is None:   # (once per load: the destination as bytes, when it is CPU memory)
            runs = self._byte_runs = []
            if self.runs and self.runs[0][1].device.type == "cpu":
                self._byte_dtype = self.runs[0][1].dtype
                runs += [(first, rows.view(torch.uint8).numpy().reshape(-1)) for first, rows in self.runs]
        if dtype is not self._byte_dtype:   # another dtype or device (or nothing to write)
            self.append_tensor(_byte_block_tensor(block))   # converted / moved by copy_
            return
        cs = self.cs
        n = shape[0]
        row_bytes = data.nbytes // n if n else 0
        done = 0
        while done < n:
            first, out = runs[self.run_id]
            offset = (cs.num_entries - first) * row_bytes
            take = min(n - done, (out.nbytes - offset) // row_bytes)
            end = offset + take * row_bytes
            out[offset:end] = data if take == n else data[done * row_bytes:(done + take) * row_bytes]
            cs.num_entries += take
            done += take
            if end == out.nbytes:
                self.run_id += 1

    def plan_bytes(self, block: ByteRows, block_id: int, out: list) -> bool:
        """Like `append_bytes`, but the copies are left to the caller: appends to `out` one
        ``(block, block_id, byte offset in the block's bytes, byte count, destination address)``
        per copy (two where the block straddles two runs of scattered pages) and counts the rows
        as appended. False (nothing done) when the block cannot be copied as plain bytes
        (another dtype, a non-CPU destination): `append` it instead. The caller must make the
        copies before the state is used (or discard the state)."""
        data, dtype, shape = block
        runs = self._address_runs if self._address_runs is not None else self._make_address_runs()
        if dtype is not self._byte_dtype:
            return False
        cs = self.cs
        n = shape[0]
        row_bytes = data.nbytes // n if n else 0
        done = 0
        while done < n:
            first, address, size = runs[self.run_id]
            offset = (cs.num_entries - first) * row_bytes
            take = min(n - done, (size - offset) // row_bytes)
            out.append((block, block_id, done * row_bytes, take * row_bytes, address + offset))
            cs.num_entries += take
            done += take
            if offset + take * row_bytes == size:
                self.run_id += 1
        return True

    def _make_address_runs(self) -> list[tuple[int, int, int]]:
        """The destination runs' addresses (once per load; none unless it is CPU memory)."""
        runs = self._address_runs = []
        if self.runs and self.runs[0][1].device.type == "cpu":
            self._byte_dtype = self.runs[0][1].dtype
            runs += [(first, rows.data_ptr(), rows.numel() * rows.element_size()) for first, rows in self.runs]
        return runs

    def plan_blocks(self, blocks: list, out: list) -> None:
        """Every block of this load, in order: each `ByteRows` block that `plan_bytes` can
        hand over goes to `out` (as there), and so does a contiguous CPU tensor block of the
        destination's dtype, as `ByteRows` viewing its bytes (the KV cache's device tier holds
        tensors: their copies then join the one call of byte copies); every other block is
        appended now (`append`: converted / moved by its copy)."""
        if self._address_runs is None:
            self._make_address_runs()
        dtype = self._byte_dtype
        for j, block in enumerate(blocks):
            if type(block) is not tuple and dtype is not None:
                block = _as_byte_rows(block, dtype) or block
            if type(block) is not tuple or not self.plan_bytes(block, j, out):
                self.append(block)

    def append_tensor(self, block: torch.Tensor) -> None:
        cs, done, n = self.cs, 0, block.shape[0]
        while done < n:
            first, rows = self.runs[self.run_id]
            offset = cs.num_entries - first
            take = min(n - done, rows.shape[0] - offset)
            rows[offset: offset + take].copy_(block[done: done + take] if take < n else block)
            cs.num_entries += take
            done += take
            if offset + take == rows.shape[0]:
                self.run_id += 1


def load_window(layer: LayerState, window: torch.Tensor, num_tokens: int) -> None:
    """`layer.set_window(window, num_tokens)` on a fresh layer as at most two slice copies (the
    ring slots of the last positions are consecutive modulo W): the same writes, converted to
    the ring's dtype and device by the copy."""
    W, S = layer.ring.shape[0], window.shape[0]
    keep = min(S, W)
    start = (num_tokens - keep) % W                 # the slot of position num_tokens - keep
    head = min(keep, W - start)
    if head:
        layer.ring[start:start + head] = window[S - keep:S - keep + head]
    if keep > head:
        layer.ring[:keep - head] = window[S - keep + head:]
    layer.num_tokens = num_tokens


class ByteCopies:
    """The byte copies ``SequenceState.load(copy_blocks=...)`` hands over, all in ONE call: copy
    i moves ``counts[i]`` bytes from byte ``offsets[i]`` of ``blocks[block_index[i]]`` (a
    `ByteRows`) to the address ``dests[i]``; ``block_ids[i]`` is the j of that block (block j
    of every entries tensor: in the KV cache, run record j). Arrays: int64, one entry per copy
    (a block straddling two runs of scattered pages is two copies). `layout`: what identifies
    everything but `dests` (a `LoadPlan`: its loads hand over the same blocks, offsets and
    counts, so a caller may keep what it derives from them), or None."""

    __slots__ = ("blocks", "block_index", "block_ids", "offsets", "counts", "dests", "layout")

    def __init__(self, blocks: list, block_index: np.ndarray, block_ids: np.ndarray, offsets: np.ndarray,
                 counts: np.ndarray, dests: np.ndarray, layout: object | None = None):
        self.blocks, self.block_index, self.block_ids = blocks, block_index, block_ids
        self.offsets, self.counts, self.dests, self.layout = offsets, counts, dests, layout

    @classmethod
    def of(cls, copies: list[tuple]) -> ByteCopies:
        """From `RowSink.plan_bytes` tuples ``(block, block_id, offset, count, dest)``."""
        blocks: list = []
        index_of: dict[int, int] = {}
        rows = []
        for block, block_id, offset, count, dest in copies:
            k = index_of.setdefault(id(block), len(blocks))
            if k == len(blocks):
                blocks.append(block)
            rows.append((k, block_id, offset, count, dest))
        table = np.array(rows, dtype=np.int64).reshape(-1, 5)
        return cls(blocks, table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4])

    def __len__(self) -> int:
        return len(self.dests)

    def items(self):
        """``(block, block_id, offset, count, dest)`` per copy."""
        for k, j, offset, count, dest in zip(self.block_index.tolist(), self.block_ids.tolist(),
                                             self.offsets.tolist(), self.counts.tolist(), self.dests.tolist()):
            yield self.blocks[k], j, offset, count, dest


def checked_load(state: SequenceState, tensors: dict) -> tuple[int, list]:
    """`SequenceState.load`'s checks of `tensors` (nothing changes): (num_tokens, [(layer id,
    "comp" | "index", compressor, its `checked_parts`)]); KeyError / ValueError / TypeError."""
    if "num_tokens" not in tensors:
        raise KeyError("state tensor 'num_tokens' missing")
    cfg = state.config
    n = int(tensors["num_tokens"])
    w = min(n, cfg.sliding_window - 1)
    for i in range(len(state.layers)):
        win = tensors.get(f"{i}.window")
        if win is None:
            raise KeyError(f"state tensor '{i}.window' missing")
        if tuple(win.shape) != (w, cfg.head_dim):
            raise ValueError(f"state tensor '{i}.window' has shape {tuple(win.shape)}, expected {(w, cfg.head_dim)}")
    comps = [(i, name, cs, cs.checked_parts(f"{i}.{name}", tensors, n)) for i, layer in enumerate(state.layers)
             for name, cs in (("comp", layer.comp), ("index", layer.index)) if cs is not None]
    return n, comps


def load_state(state: SequenceState, tensors: dict, before_block=None, copy_blocks=None,
               plan: LoadPlan | None = None) -> None:
    """`SequenceState.load` (see there); `plan`: a `LoadPlan` of `tensors` (its checks are not
    repeated; ValueError if it was made for another state structure)."""
    if before_block is not None and copy_blocks is not None:
        raise ValueError("load() takes before_block or copy_blocks, not both")
    if plan is None:
        n, comps = checked_load(state, tensors)
    elif not plan.fits(state):
        raise ValueError("load plan made for another state structure")
    else:
        n, comps = plan.num_tokens, [(i, name, getattr(state.layers[i], name), parts) for i, name, parts in plan.comps]
    if any(cs.num_entries for _, _, cs, _ in comps):
        raise ValueError("load() needs a fresh state")
    if plan is None or not plan.copy_fixed(state, comps):   # (the plan: one C call of byte copies)
        for i, layer in enumerate(state.layers):
            load_window(layer, tensors[f"{i}.window"], n)
        for _, _, cs, parts in comps:
            cs.set_fixed(parts)
    for _, _, cs, _ in comps:
        cs.reserve_entries(n // cs.rate)
    # every compressor reserved first: a page growth re-allocates the pages of its whole rate
    runs_of: dict[int, list] = {}   # id(page list) -> its runs (shared by a rate's compressors)
    page_runs = []                  # each compressor's `page_runs` (None: a growth buffer)
    for _, _, cs, _ in comps:
        runs = None
        if cs._paged is not None:
            runs = runs_of.get(id(cs._paged[2]))
            if runs is None:
                runs = runs_of[id(cs._paged[2])] = cs.page_runs(0, n // cs.rate)
        page_runs.append(runs)
    if copy_blocks is not None:   # (no per-block hook: one plan, one hand-over)
        copies = None if plan is None else plan.byte_copies(comps, page_runs)
        if copies is None:   # block by block (scattered pages, tensor blocks, no plan)
            planned: list[tuple] = []
            for (_, _, cs, parts), runs in zip(comps, page_runs):
                RowSink(cs, n // cs.rate, cs.entry_rows(0, n // cs.rate, runs)).plan_blocks(parts["entries"], planned)
            copies = ByteCopies.of(planned)
        copy_blocks(copies)
        state.num_tokens = n
        return
    sinks = [(RowSink(cs, n // cs.rate, cs.entry_rows(0, n // cs.rate, runs)), parts["entries"])
             for (_, _, cs, parts), runs in zip(comps, page_runs)]
    for j in range(max((len(blocks) for _, blocks in sinks), default=0)):
        if before_block is not None:
            before_block(j)
        for sink, blocks in sinks:
            if j < len(blocks):
                sink.append(blocks[j])
    state.num_tokens = n
