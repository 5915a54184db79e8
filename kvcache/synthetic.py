"""Synthetic per-sequence state dicts that follow the model's export contract (tests, benchmarks).

Owns no state. `synthetic_state(layout, token_ids, num_tokens)` returns what
``state.export()`` returns after `num_tokens` tokens, with the contract's names and shapes; every
row is a deterministic function of the token prefix it summarises, so two sequences that share a
prefix share its entries, as with a real model. Values are not a model's, only its layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcache import layout


@dataclass(frozen=True)
class SyntheticLayout:
    compress_rates: tuple[int, ...] = (0, 4, 128, 4)  # per layer: 0 sliding, 4 CSA, 128 HCA
    head_dim: int = 64
    index_head_dim: int = 32
    sliding_window: int = 128
    dtype: torch.dtype = torch.float32
    csa_rate: int = 4
    index_rate: int = 4

    @property
    def entry_rates(self) -> dict[str, int]:
        return layout.entry_rates(self.compress_rates, csa_rate=self.csa_rate, index_rate=self.index_rate)

    @classmethod
    def from_model_config(cls, cfg, dtype: torch.dtype = torch.float32) -> SyntheticLayout:
        """The layout of a model config (duck-typed `model_shards.ModelConfig`: `num_layers`,
        `compress_rate(i)`, `csa_rate`, `head_dim`, `index_head_dim`, `sliding_window`)."""
        return cls(
            compress_rates=tuple(cfg.compress_rate(i) for i in range(cfg.num_layers)),
            head_dim=cfg.head_dim, index_head_dim=cfg.index_head_dim, sliding_window=cfg.sliding_window,
            dtype=dtype, csa_rate=cfg.csa_rate, index_rate=cfg.csa_rate,
        )


def _prefix_codes(token_ids, num_tokens: int) -> np.ndarray:
    """One float per position t that depends on every token in [0, t]."""
    tokens = np.asarray(token_ids, dtype=np.uint64)[:num_tokens]
    if len(tokens) < num_tokens:
        raise ValueError(f"{len(tokens)} token ids for a state of {num_tokens} tokens")
    weights = np.random.default_rng(1234).integers(1, 2**63, size=num_tokens, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        mixed = np.cumsum((tokens + np.uint64(0x9E3779B9)) * weights, dtype=np.uint64)
    return (mixed >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def _rows(codes: np.ndarray, positions: np.ndarray, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    freqs = np.arange(1, width + 1, dtype=np.float64) * 0.7 + seed * 0.1
    values = np.sin(codes[positions][:, None] * 997.0 * freqs[None, :] + seed) * (1 + seed % 3)
    return torch.from_numpy(values.reshape(len(positions), width)).to(dtype)


def synthetic_state(lay: SyntheticLayout, token_ids, num_tokens: int) -> dict[str, torch.Tensor]:
    codes = _prefix_codes(token_ids, num_tokens)
    n = num_tokens
    state: dict[str, torch.Tensor] = {"num_tokens": torch.tensor(n, dtype=torch.int64)}

    def span(start: int, stop: int) -> np.ndarray:
        return np.arange(max(start, 0), stop, dtype=np.int64)

    def compressor(prefix: str, rate: int, width: int, tail_width: int, overlap: bool, seed: int) -> None:
        state[f"{prefix}.entries"] = _rows(codes, span(0, n // rate) * rate + rate - 1, width, seed, lay.dtype)
        tail = span(n - n % rate, n)
        state[f"{prefix}.tail_kv"] = _rows(codes, tail, tail_width, seed + 1, lay.dtype)
        state[f"{prefix}.tail_gate"] = _rows(codes, tail, tail_width, seed + 2, lay.dtype)
        if overlap:
            last = (n // rate) * rate
            rows = span(last - rate, last) if n >= rate else span(0, 0)
            state[f"{prefix}.overlap_kv"] = _rows(codes, rows, width, seed + 3, lay.dtype)
            state[f"{prefix}.overlap_gate"] = _rows(codes, rows, width, seed + 4, lay.dtype)

    for i, rate in enumerate(lay.compress_rates):
        window = span(n - (lay.sliding_window - 1), n)
        state[f"{i}.window"] = _rows(codes, window, lay.head_dim, 10 * i, lay.dtype)
        if not rate:
            continue
        is_csa = rate == lay.csa_rate
        tail_width = 2 * lay.head_dim if is_csa else lay.head_dim
        compressor(f"{i}.comp", rate, lay.head_dim, tail_width, is_csa, 10 * i + 1)
        if is_csa:
            compressor(f"{i}.index", lay.index_rate, lay.index_head_dim, 2 * lay.index_head_dim, True, 10 * i + 6)
    return state


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes."""
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(raw(a[k]), raw(b[k]))
        for k in a
    )
