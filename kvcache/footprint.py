"""Stored bytes per token of a model's compressed state, computed from its layout (no weights).

Owns no state. For a `SyntheticLayout` (the export contract's shapes for a model config) and a
value width, `state_footprint` gives:

- the bytes per token of the compressed entries (what block / span records hold: CSA entries,
  Lightning-Indexer keys, HCA entries; one row per `rate` tokens, so a constant per token);
- the bytes of one window checkpoint at a block boundary (there every compressor tail is empty
  and no entries row is unblocked): per layer the ``W - 1`` window latents, plus the overlap
  slices (``rate`` rows each) of the overlapping CSA compressors (main and indexer);
- their sum per token of a long context with a checkpoint every `checkpoint_tokens`.

With ``is_fp8`` the ``*.window`` / ``*.comp.entries`` rows cost ``D - rope`` e4m3 bytes, one
float32 scale per 64 of them, and ``rope`` values as computed (see fp8.py); indexer keys, tails
and overlap slices stay as computed. Record framing (Arrow metadata, 16-byte padding) is not
counted: it is a few hundred bytes per record.

Baselines, both in values per token (multiply by the value width):
- plain full-attention KV: ``2 * num_layers * num_heads * head_dim`` (separate K and V for every
  query head of every layer, no sharing, no compression);
- V3.2-style MLA: ``num_layers * (512 + 64)`` (one 512-dim latent and one 64-dim rope key per
  token per layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvcache.fp8 import BLOCK_SIZE
from kvcache.synthetic import SyntheticLayout

FP8_SCALE_BYTES = 4
MLA_VALUES_PER_TOKEN_PER_LAYER = 512 + 64


@dataclass(frozen=True)
class StateFootprint:
    entry_bytes_per_token: float
    checkpoint_bytes: int
    checkpoint_tokens: int

    @property
    def bytes_per_token(self) -> float:
        """Entries plus the periodic checkpoints, per token of a long context."""
        return self.entry_bytes_per_token + self.checkpoint_bytes / self.checkpoint_tokens


def _row_bytes(width: int, value_bytes: int, rope_dim: int, is_fp8: bool) -> float:
    if not is_fp8 or width <= rope_dim:
        return width * value_bytes
    quantized = width - rope_dim
    return quantized + math.ceil(quantized / BLOCK_SIZE) * FP8_SCALE_BYTES + rope_dim * value_bytes


def state_footprint(lay: SyntheticLayout, *, value_bytes: int, rope_dim: int, checkpoint_tokens: int,
                    is_fp8: bool = False) -> StateFootprint:
    latent_row = _row_bytes(lay.head_dim, value_bytes, rope_dim, is_fp8)
    entry_bytes = 0.0
    checkpoint_bytes = 0.0
    for rate in lay.compress_rates:
        checkpoint_bytes += (lay.sliding_window - 1) * latent_row
        if not rate:
            continue
        entry_bytes += latent_row / rate
        if rate == lay.csa_rate:  # overlapping pooling: indexer keys and both overlap slices
            entry_bytes += lay.index_head_dim * value_bytes / lay.index_rate
            checkpoint_bytes += rate * lay.head_dim * value_bytes * 2           # comp overlap kv, gate
            checkpoint_bytes += lay.index_rate * lay.index_head_dim * value_bytes * 2
    return StateFootprint(entry_bytes, int(checkpoint_bytes), checkpoint_tokens)


def full_attention_values_per_token(num_layers: int, num_heads: int, head_dim: int) -> int:
    return 2 * num_layers * num_heads * head_dim


def mla_values_per_token(num_layers: int) -> int:
    return num_layers * MLA_VALUES_PER_TOKEN_PER_LAYER
