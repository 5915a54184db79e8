"""Loading a `SequenceState` from exported row blocks: the copies `SequenceState.load` makes.

Owns nothing: these helpers write into the compressor / layer states they are given (state.py owns
those). A row block is a [rows, dim] tensor or `ByteRows`, the KV cache's deferred restore form:
its bytes, copied into CPU pages as one numpy byte copy (no tensor built), or handed back to
the caller as (source offset, byte count, destination address) copies (`RowSink.plan_bytes`,
``SequenceState.load(copy_block=...)``: the KV cache verifies and copies them in one pass).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .state import CompressorState, LayerState

# A row block given as its bytes (the KV cache's deferred restore passes these, see
# `SequenceState.load`): (a 1-D C-contiguous uint8 numpy array holding the rows' contiguous
# bytes, their dtype, their shape (rows, dim)). Never written.
ByteRows = tuple[np.ndarray, torch.dtype, tuple[int, int]]


def block_rows(blocks, dim: int, key: str) -> int:
    """The rows of `blocks` in all (each a [rows, `dim`] tensor or `ByteRows`), -1 if a block
    has another width or its bytes do not match its shape; TypeError for anything else."""
    total = 0
    for b in blocks:
        if type(b) is tuple:   # ByteRows
            if len(b) != 3:
                raise TypeError(f"state tensor {key!r}: a row block must be a tensor or (bytes, dtype, shape)")
            data, dtype, shape = b
            if (type(data) is not np.ndarray or data.ndim != 1 or data.dtype.char != "B"
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

    def plan_bytes(self, block: ByteRows, out: list) -> bool:
        """Like `append_bytes`, but the copies are left to the caller: appends to `out` one
        ``(block, byte offset in the block's bytes, byte count, destination address)`` per copy
        (two where the block straddles two runs of scattered pages) and counts the rows as
        appended. False (nothing done) when the block cannot be copied as plain bytes (another
        dtype, a non-CPU destination): `append` it instead. The caller must make the copies
        before the state is used (or discard the state)."""
        data, dtype, shape = block
        runs = self._address_runs
        if runs is None:   # (once per load: the destination runs' addresses, when it is CPU memory)
            runs = self._address_runs = []
            if self.runs and self.runs[0][1].device.type == "cpu":
                self._byte_dtype = self.runs[0][1].dtype
                runs += [(first, rows.data_ptr(), rows.numel() * rows.element_size()) for first, rows in self.runs]
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
            out.append((block, done * row_bytes, take * row_bytes, address + offset))
            cs.num_entries += take
            done += take
            if offset + take * row_bytes == size:
                self.run_id += 1
        return True

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
