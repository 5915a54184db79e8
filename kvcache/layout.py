"""How a sequence's exported state dict is cut into block records and window checkpoints.

Owns no state. Works only on the tensor names of the model's export contract:

- ``"num_tokens"`` (int64, 0-d);
- ``"*.entries"`` tensors grow by one row per `rate` tokens and never change once written (CSA /
  HCA compressed entries, indexer keys). Block ``b`` owns rows ``[b*B/rate, (b+1)*B/rate)``.
- everything else (windows, compressor tails, overlap slices) is position-specific: it is kept
  only in checkpoints.

A run of consecutive blocks (one block record, or a span record of several) holds the entries
rows those blocks produced (`range_tensors`). A checkpoint at position ``P`` (``k = P // B``)
holds ``num_tokens``, every non-entry tensor and the rows of each entries tensor past the last
full block. ``assemble_state`` concatenates runs covering blocks ``[0, k)`` in order and the
checkpoint back into the exact state dict at ``P``; ``assemble_state_bytes`` does the same from
the runs' raw bytes (one byte copy per tensor of each record, no torch op), and
``state_row_blocks`` checks the same pieces but leaves each entries tensor as its list of row
blocks (the deferred restore: the engine's state load copies them once, straight into place).
All three check the pieces with `RunCheck`, which works on (dtype, shape) specs, so the restore
path checks records from their parsed layout without building tensors first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from kvcache.memory import cat_rows, empty

# a tensor as (a uint8 array of its contiguous bytes, dtype, shape): see `Record.byte_views`
ByteView = tuple[np.ndarray, torch.dtype, tuple[int, ...]]

NUM_TOKENS = "num_tokens"
ENTRIES_SUFFIX = ".entries"


def entry_rates(
    compress_rates: Sequence[int] | Mapping[int, int], *, csa_rate: int = 4, index_rate: int = 4
) -> dict[str, int]:
    """Tokens per row of every ``*.entries`` tensor, from the per-layer compression rates.

    `compress_rates[i]` is 0 for a sliding-window layer, `csa_rate` (4) for a CSA layer (which
    also has a Lightning Indexer with one key per `index_rate` tokens) and e.g. 128 for HCA.
    Stand-in for ``model_shards.entry_rates(config)``, which returns the same mapping.
    """
    items = compress_rates.items() if isinstance(compress_rates, Mapping) else enumerate(compress_rates)
    rates: dict[str, int] = {}
    for layer_id, rate in items:
        if not rate:
            continue
        rates[f"{layer_id}.comp.entries"] = int(rate)
        if rate == csa_rate:
            rates[f"{layer_id}.index.entries"] = index_rate
    return rates


def is_entries(name: str) -> bool:
    return name.endswith(ENTRIES_SUFFIX)


def state_num_tokens(state: Mapping[str, torch.Tensor]) -> int:
    if NUM_TOKENS not in state:
        raise ValueError("state has no 'num_tokens' tensor")
    return int(state[NUM_TOKENS])


def validate_state(
    state: Mapping[str, torch.Tensor], rates: Mapping[str, int], block_tokens: int
) -> int:
    """Check every entries tensor has a known rate and ``num_tokens // rate`` rows; return P."""
    num_tokens = state_num_tokens(state)
    for name, tensor in state.items():
        if not is_entries(name):
            continue
        if name not in rates:
            raise ValueError(f"no entry rate for {name!r}; pass it in entry_rates")
        rate = rates[name]
        if block_tokens % rate:
            raise ValueError(f"{name!r}: rate {rate} does not divide block_tokens {block_tokens}")
        if tensor.dim() < 1 or tensor.shape[0] != num_tokens // rate:
            raise ValueError(
                f"{name!r}: {tuple(tensor.shape)} rows, expected {num_tokens // rate} at {num_tokens} tokens"
            )
    return num_tokens


def range_tensors(
    state: Mapping[str, torch.Tensor], rates: Mapping[str, int], first_block_id: int, num_blocks: int,
    block_tokens: int,
) -> dict[str, torch.Tensor]:
    """The entries rows blocks ``[first_block_id, first_block_id + num_blocks)`` produced
    (copies). `state` must cover those blocks."""
    out = {}
    for name, tensor in state.items():
        if is_entries(name):
            rows = block_tokens // rates[name]
            out[name] = tensor[first_block_id * rows:(first_block_id + num_blocks) * rows].clone()
    return out


def block_tensors(
    state: Mapping[str, torch.Tensor], rates: Mapping[str, int], block_id: int, block_tokens: int
) -> dict[str, torch.Tensor]:
    """The entries rows block `block_id` produced (copies). `state` must cover the block."""
    return range_tensors(state, rates, block_id, 1, block_tokens)


def checkpoint_tensors(
    state: Mapping[str, torch.Tensor], rates: Mapping[str, int], block_tokens: int
) -> dict[str, torch.Tensor]:
    """Everything of `state` not held by its full blocks (copies)."""
    num_full_blocks = state_num_tokens(state) // block_tokens
    out = {}
    for name, tensor in state.items():
        if is_entries(name):
            start = num_full_blocks * (block_tokens // rates[name])
            out[name] = tensor[start:].clone()
        else:
            out[name] = tensor.clone()
    return out


def assemble_state(
    runs: Sequence[Mapping[str, torch.Tensor]],
    checkpoint: Mapping[str, torch.Tensor],
    rates: Mapping[str, int],
    block_tokens: int,
) -> dict[str, torch.Tensor]:
    """The state dict at the checkpoint's position ``P`` from runs of blocks (block or span
    records, in order) covering exactly its ``P // B`` preceding blocks.

    Every output tensor is fresh memory (one copy of each input byte; inputs may be read-only
    views). Raises ValueError if the pieces do not fit together (wrong count, names or shapes).
    """
    blocks = state_row_blocks(runs, checkpoint, rates, block_tokens)   # the checks, no copies
    return {name: cat_rows(v) if isinstance(v, list) else v.clone() for name, v in blocks.items()}


def state_row_blocks(
    runs: Sequence[Mapping[str, torch.Tensor]],
    checkpoint: Mapping[str, torch.Tensor],
    rates: Mapping[str, int],
    block_tokens: int,
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """`assemble_state` without its copy: the same checks, then the state dict with every
    entries tensor as the list of its row blocks (each run's rows in order, then the
    checkpoint's), which ``SequenceState.load`` copies once, straight into place. Nothing is
    copied: every tensor is one of the inputs or a view of one."""
    check = RunCheck(checkpoint, rates, block_tokens)
    check.finish(sum(check.add({name: (t.dtype, tuple(t.shape)) for name, t in run.items()}) for run in runs))
    return {name: [run[name] for run in runs] + [tensor] if name in check.rows_per_block else tensor
            for name, tensor in checkpoint.items()}


class RunCheck:
    """Whether runs of blocks (block or span records, in order) fit a checkpoint at ``P``:
    each run holds exactly the checkpoint's entries tensors, each a whole number of blocks (the
    same number for all of them) with the checkpoint's dtype and row shape, and together the
    runs cover exactly the ``P // B`` blocks before it. Runs are given as specs (name ->
    (dtype, shape)), so records are checked without building their tensors. ValueError if not.
    """

    def __init__(self, checkpoint: Mapping[str, torch.Tensor], rates: Mapping[str, int], block_tokens: int):
        self.num_tokens = state_num_tokens(checkpoint)
        self.block_tokens = block_tokens
        self.rows_per_block: dict[str, int] = {}  # every entries tensor of the checkpoint
        self._expected: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        for name, tensor in checkpoint.items():
            if not is_entries(name):
                continue
            if name not in rates:
                raise ValueError(f"no entry rate for {name!r}")
            rate = rates[name]
            if tensor.dim() < 1 or tensor.shape[0] != self.num_tokens % block_tokens // rate:
                raise ValueError(f"{name!r}: the checkpoint's {tuple(tensor.shape)} rows at {self.num_tokens} tokens")
            self.rows_per_block[name] = block_tokens // rate
            self._expected[name] = (block_tokens // rate, tensor.dtype, tuple(tensor.shape[1:]))
        self._last: tuple[Mapping, int] | None = None  # the last run checked and its count

    def add(self, run: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
        """Check one run, given as its tensors' (dtype, shape); returns its number of blocks.
        (A run with the same specs as the one before, e.g. every full span, is one compare.)"""
        if self._last is not None and run == self._last[0]:
            return self._last[1]
        count = self._count(run)
        self._last = (run, count)
        return count

    def _count(self, run: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
        if run.keys() != self._expected.keys():
            raise ValueError("a run's tensors do not match the checkpoint's entries")
        count = -1
        for name, (dtype, shape) in run.items():
            rows_per_block, expected_dtype, trailing = self._expected[name]
            if not shape or shape[0] % rows_per_block:
                raise ValueError(f"{name!r}: {tuple(shape)} is not a whole number of blocks")
            if dtype != expected_dtype or tuple(shape[1:]) != trailing:
                raise ValueError(f"{name!r}: the runs' rows do not match the checkpoint's")
            if count < 0:
                count = shape[0] // rows_per_block
            elif shape[0] // rows_per_block != count:
                raise ValueError(f"a run's tensors disagree on its length ({name!r})")
        if count < 0:
            raise ValueError("a run holds no tensors")
        return count

    def finish(self, num_blocks: int) -> int:
        """Check that the runs cover exactly the checkpoint's preceding blocks; returns ``P``."""
        if num_blocks != self.num_tokens // self.block_tokens:
            raise ValueError(f"{num_blocks} blocks for a checkpoint at {self.num_tokens} tokens")
        return self.num_tokens


def leading_rows(view: ByteView, num_rows: int) -> ByteView:
    """The first `num_rows` rows of a byte view (all of them if it has fewer)."""
    data, dtype, shape = view
    if not shape or num_rows >= shape[0]:
        return view
    row_bytes = data.nbytes // shape[0] if shape[0] else 0
    return data[:num_rows * row_bytes], dtype, (num_rows, *shape[1:])


def assemble_state_bytes(
    runs: Sequence[Mapping[str, ByteView]],
    checkpoint: Mapping[str, torch.Tensor],
    rates: Mapping[str, int],
    block_tokens: int,
    *,
    before_run: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """`assemble_state` with the runs given as byte views: the same checks, then every output
    tensor is allocated once and filled by plain byte copies, run by run from the last to the
    first. `before_run(i)` is called right before run ``i``'s bytes are copied (the caller
    verifies that run's record there, so its bytes are still in cache for the copy); whatever
    it raises propagates."""
    check = RunCheck(checkpoint, rates, block_tokens)
    check.finish(sum(check.add({name: (dtype, shape) for name, (_, dtype, shape) in run.items()}) for run in runs))
    state: dict[str, torch.Tensor] = {}
    outputs: dict[str, np.ndarray] = {}
    for name, tensor in checkpoint.items():
        if name not in check.rows_per_block:
            state[name] = tensor.clone()
            continue
        state[name] = empty((check.num_tokens // rates[name], *tensor.shape[1:]), tensor.dtype)
        outputs[name] = state[name].view(-1).view(torch.uint8).numpy()
    starts = []  # where each run's bytes go in each output
    positions = dict.fromkeys(outputs, 0)
    for run in runs:
        starts.append(dict(positions))
        for name, (data, _, _) in run.items():
            positions[name] += data.nbytes
    for name, out in outputs.items():
        # (a device-tier checkpoint of a GPU engine holds CUDA tensors: bytes come to the host)
        out[positions[name]:] = checkpoint[name].cpu().contiguous().view(-1).view(torch.uint8).numpy()
    for i in reversed(range(len(runs))):  # the head last: what `before_run` touches ends fresher
        if before_run is not None:
            before_run(i)
        for name, (data, _, _) in runs[i].items():
            outputs[name][starts[i][name]:starts[i][name] + data.nbytes] = data
    return state


def checkpoint_positions(num_prompt_tokens: int, num_tokens: int, checkpoint_tokens: int) -> list[int]:
    """Positions to export state at: every `checkpoint_tokens`, the end of the prompt, the end."""
    positions = set(range(checkpoint_tokens, num_tokens + 1, checkpoint_tokens))
    positions.update(p for p in (num_prompt_tokens, num_tokens) if 0 < p <= num_tokens)
    return sorted(positions)
