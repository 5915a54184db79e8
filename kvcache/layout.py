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
checkpoint back into the exact state dict at ``P``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvcache.memory import cat_rows

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


def num_run_blocks(run: Mapping[str, torch.Tensor], rates: Mapping[str, int], block_tokens: int) -> int:
    """How many blocks a run's tensors cover; ValueError unless every tensor agrees."""
    counts = set()
    for name, tensor in run.items():
        if name not in rates:
            raise ValueError(f"no entry rate for {name!r}")
        rows_per_block = block_tokens // rates[name]
        if tensor.dim() < 1 or tensor.shape[0] % rows_per_block:
            raise ValueError(f"{name!r}: {tuple(tensor.shape)} is not a whole number of blocks")
        counts.add(tensor.shape[0] // rows_per_block)
    if len(counts) != 1:
        raise ValueError(f"a run's tensors disagree on its length ({sorted(counts)} blocks)")
    return counts.pop()


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
    num_tokens = state_num_tokens(checkpoint)
    num_blocks = sum(num_run_blocks(run, rates, block_tokens) for run in runs)
    if num_blocks != num_tokens // block_tokens:
        raise ValueError(f"{num_blocks} blocks for a checkpoint at {num_tokens} tokens")
    entry_names = {name for name in checkpoint if is_entries(name)}
    if any(run.keys() != entry_names for run in runs):
        raise ValueError("a run's tensors do not match the checkpoint's entries")
    state = {}
    for name, tensor in checkpoint.items():
        if not is_entries(name):
            state[name] = tensor.clone()
            continue
        if name not in rates:
            raise ValueError(f"no entry rate for {name!r}")
        parts = [run[name] for run in runs] + [tensor]
        if any(p.dim() != tensor.dim() or p.shape[1:] != tensor.shape[1:] or p.dtype != tensor.dtype for p in parts):
            raise ValueError(f"{name!r}: the runs' rows do not match the checkpoint's")
        state[name] = cat_rows(parts)
        if state[name].shape[0] != num_tokens // rates[name]:
            raise ValueError(f"{name!r}: {state[name].shape[0]} rows at {num_tokens} tokens")
    return state


def checkpoint_positions(num_prompt_tokens: int, num_tokens: int, checkpoint_tokens: int) -> list[int]:
    """Positions to export state at: every `checkpoint_tokens`, the end of the prompt, the end."""
    positions = set(range(checkpoint_tokens, num_tokens + 1, checkpoint_tokens))
    positions.update(p for p in (num_prompt_tokens, num_tokens) if 0 < p <= num_tokens)
    return sorted(positions)
