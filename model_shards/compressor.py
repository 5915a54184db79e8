"""KV compressors of CSA (m=4, overlapping windows) and HCA (m'=128), and the Lightning Indexer.

Owns: the compressor weights and the math that turns projected tokens into compressed entries.
The per-sequence tensors they update live in `state.CompressorState`.

Pooling (paper §2.3.1 / §2.3.2). Each token t projects to kv_t and gate logits z_t. A window of
`rate` tokens becomes one entry  C_w = RMSNorm( Σ_j softmax_j(z_j + B_j) ⊙ kv_j )  (softmax over the
window's slots, per channel; B is the learned position bias `ape`), then RoPE at position w*rate
with the "compress" rope. HCA windows do not overlap. CSA projects to 2*dim: the Cb half of window
w and the Ca half of window w-1 form 2*rate slots (width 2m, stride m); window 0 of a sequence has
no predecessor, so its Ca slots get gate -inf (weight 0). The Ca half of the last full window is
kept in the state so that the next call continues exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .cpu_kernels import linear
from .ops import rms_norm, rope_, rope_real, rope_table
from .state import CompressorState

if TYPE_CHECKING:
    from .batch import PooledCompressor


class RMSNormWeight(nn.Module):
    """Holds an RMSNorm weight (named `<module>.weight` in checkpoints)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Compressor(nn.Module):
    """Weights of one compressor: `wkv`, `wgate` [in_dim, hidden], `ape` [rate, in_dim], `norm` [dim]."""

    def __init__(self, hidden: int, dim: int, rate: int, is_overlapping: bool, eps: float):
        super().__init__()
        self.dim, self.rate, self.is_overlapping = dim, rate, is_overlapping
        self.in_dim = 2 * dim if is_overlapping else dim
        self.wkv = nn.Linear(hidden, self.in_dim, bias=False)
        self.wgate = nn.Linear(hidden, self.in_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(rate, self.in_dim))
        self.norm = RMSNormWeight(dim, eps)

    def push(self, cs: CompressorState, kv: torch.Tensor, gate: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Append one sequence's new projected tokens ([S, in_dim]); emit every completed entry."""
        if cs.num_tail:
            kv = torch.cat([cs.tail_kv, kv])
            gate = torch.cat([cs.tail_gate, gate])
        usable = (kv.shape[0] // self.rate) * self.rate
        cs.set_tail(kv[usable:], gate[usable:])
        if usable == 0:
            return
        num_windows = usable // self.rate
        win_kv = kv[:usable].view(num_windows, self.rate, self.in_dim)
        win_gate = gate[:usable].view(num_windows, self.rate, self.in_dim) + self.ape
        prev_kv = prev_gate = None
        if self.is_overlapping:  # window w reads the Ca half of window w-1 (of the state for w = 0)
            d = self.dim
            prev_kv = torch.cat([cs._overlap_kv.unsqueeze(0), win_kv[:-1, :, :d]])     # [W, m, d]
            prev_gate = torch.cat([cs._overlap_gate.unsqueeze(0), win_gate[:-1, :, :d]])  # -inf: no window
            cs.set_overlap(win_kv[-1, :, :d], win_gate[-1, :, :d])
        positions = (cs.num_entries + torch.arange(num_windows, device=kv.device)) * self.rate
        cs.append_entries(self._pool(win_kv, win_gate, prev_kv, prev_gate, positions, inv_freq))

    def push_decode(self, states: list[CompressorState], kv: torch.Tensor, gate: torch.Tensor,
                    inv_freq: torch.Tensor, pooled: "PooledCompressor | None" = None) -> None:
        """One new token for each of B sequences (kv / gate [B, in_dim]): each row goes into its
        state's tail in place; the sequences whose window completes pool it together. `pooled`:
        the sequences' buffers live in a StatePool, so each update is one indexed op for all B
        (and `states` is not touched: their counters advance after the step)."""
        if pooled is not None:
            self.push_pooled(kv, gate, inv_freq, pooled)
            return
        for b, cs in enumerate(states):
            n = cs.num_tail
            cs._tail_kv[n] = kv[b]
            cs._tail_gate[n] = gate[b]
            cs.num_tail = n + 1
        full = [cs for cs in states if cs.num_tail == self.rate]
        if not full:
            return
        win_kv = torch.stack([cs._tail_kv for cs in full])                      # [F, rate, in_dim]
        win_gate = torch.stack([cs._tail_gate for cs in full]) + self.ape
        prev_kv = prev_gate = None
        if self.is_overlapping:
            prev_kv = torch.stack([cs._overlap_kv for cs in full])               # [F, rate, dim]
            prev_gate = torch.stack([cs._overlap_gate for cs in full])
        positions = torch.tensor([cs.num_entries * self.rate for cs in full], device=kv.device)
        entries = self._pool(win_kv, win_gate, prev_kv, prev_gate, positions, inv_freq)   # [F, d]
        for f, cs in enumerate(full):
            cs.num_tail = 0
            if self.is_overlapping:
                cs.set_overlap(win_kv[f, :, : self.dim], win_gate[f, :, : self.dim])
            cs.append_entries(entries[f: f + 1])

    def push_pooled(self, kv, gate, inv_freq, p: "PooledCompressor", pool_fn=None) -> None:
        """Buffer writes only: the states' counters advance after the step (DecodePlan.advance).
        Fixed shape (`p.completes` None): every row pools its tail as if complete; the rows that
        are not write their entry to the scratch page and keep their overlap (torch.where).
        `pool_fn`: `pool_pushed` or a compiled form of it (regions.DecodeRegions)."""
        if p.completes is not None and not p.completes:   # no window completes: the tail writes only
            p.tail_kv[p.slot_ids, p.tail_rows] = kv
            p.tail_gate[p.slot_ids, p.tail_rows] = gate
            return
        pool_fn = pool_fn or pool_pushed
        pool_fn(kv, gate, p.tail_kv, p.tail_gate, p.overlap_kv, p.overlap_gate, p.entry_pages_store, p.slot_ids,
                p.tail_rows, p.complete_slot_ids, p.entry_positions, p.entry_page_ids, p.entry_rows, p.complete_mask,
                self.ape, self.norm.weight, inv_freq, self.dim, self.norm.eps)

    def _pool(self, win_kv, win_gate, prev_kv, prev_gate, positions, inv_freq) -> torch.Tensor:
        return pool_windows(win_kv, win_gate, prev_kv, prev_gate, positions, inv_freq, self.norm.weight,
                            self.dim, self.norm.eps)


def pool_windows(win_kv, win_gate, prev_kv, prev_gate, positions, inv_freq, norm_w, dim: int,
                 eps: float) -> torch.Tensor:
    """Windows [N, rate, in_dim] (gates with the position bias), for CSA (`prev_kv` given) with the
    previous windows' Ca halves [N, rate, dim] -> entries [N, dim] with the compress rope at `positions`."""
    if prev_kv is not None:  # 2*rate slots: Ca of the previous window, then Cb of this one
        win_kv = torch.cat([prev_kv, win_kv[..., dim:]], dim=1)                     # [N, 2m, d]
        win_gate = torch.cat([prev_gate, win_gate[..., dim:]], dim=1)
    weights = win_gate.softmax(dim=1, dtype=torch.float32).to(win_kv.dtype)
    pooled = rms_norm((win_kv * weights).sum(dim=1), norm_w, eps)                    # [N, d]
    return rope_real(pooled, rope_table(inv_freq, positions))


def pool_pushed(kv, gate, tail_kv, tail_gate, overlap_kv, overlap_gate, pages, slot_ids, tail_rows,
                complete_slot_ids, entry_positions, entry_page_ids, entry_rows, complete_mask, ape, norm_w,
                inv_freq, dim: int, eps: float) -> None:
    """A pooled decode step of one compressor, buffer writes only (`Compressor.push_pooled`;
    also a compiled decode region). Rows b write kv / gate [B, in_dim] into tail row tail_rows[b] of
    slot slot_ids[b]; the completing slots [F] pool their windows (with
    `complete_mask` [F], the fixed shape: every row pools, only the masked ones keep their overlap
    and the rest write the scratch page) into (entry_page_ids, entry_rows) of `pages`."""
    tail_kv[slot_ids, tail_rows] = kv
    tail_gate[slot_ids, tail_rows] = gate
    win_kv, win_gate = tail_kv[complete_slot_ids], tail_gate[complete_slot_ids] + ape   # [F, rate, in_dim]
    prev_kv = prev_gate = None
    if overlap_kv is not None:
        prev_kv, prev_gate = overlap_kv[complete_slot_ids], overlap_gate[complete_slot_ids]   # [F, rate, d]
        new_kv, new_gate = win_kv[:, :, :dim], win_gate[:, :, :dim]
        if complete_mask is not None:
            done = complete_mask.view(-1, 1, 1)
            new_kv, new_gate = torch.where(done, new_kv, prev_kv), torch.where(done, new_gate, prev_gate)
        overlap_kv[complete_slot_ids] = new_kv
        overlap_gate[complete_slot_ids] = new_gate
    pages[entry_page_ids, entry_rows] = pool_windows(win_kv, win_gate, prev_kv, prev_gate, entry_positions,
                                                     inv_freq, norm_w, dim, eps)


class Indexer(nn.Module):
    """Lightning Indexer of a CSA layer: its own compressor at index_head_dim, query heads and weights.

    score(t, s) = Σ_h w_{t,h} · ReLU(q_{t,h} · K_s) · d_I^-1/2, with w_{t,h} = weights_proj(x_t)_h · n_I^-1/2.
    """

    def __init__(self, hidden: int, q_lora_rank: int, num_heads: int, head_dim: int, rate: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.wq_b = nn.Linear(q_lora_rank, num_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(hidden, num_heads, bias=False)
        self.compressor = Compressor(hidden, head_dim, rate, True, eps)
        self.is_half_gemm = True     # 16-bit dot products on GPUs (index_dots); False: float32 (A/B runs)

    def queries(self, q_residual: torch.Tensor, weight_logits: torch.Tensor, cis: torch.Tensor):
        """q_residual [T, q_lora], weight_logits = weights_proj(x) [T, n_I] -> q [T, n_I, d_I]
        (compress rope at the query positions), head weights [T, n_I] (float32)."""
        q = linear(q_residual, self.wq_b.weight).unflatten(-1, (self.num_heads, self.head_dim))
        q = rope_(q, cis.unsqueeze(-2))
        return q, weight_logits.float() * self.num_heads ** -0.5


def _is_half_gemm_ok(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """bmm with a float32 out_dtype: CUDA, both operands bf16 (or both fp16), the same leading
    (batch) dims, outside torch.compile (whose own lowering handles the upcast form)."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and keys.dtype == q.dtype
            and q.shape[:-3] == keys.shape[:-2] and not torch.compiler.is_compiling())


def index_dots(q: torch.Tensor, keys: torch.Tensor, is_half_gemm: bool = True) -> torch.Tensor:
    """q [..., S, n_I, d_I] . keys [..., N, d_I] -> [..., S, n_I, N] float32 (every head's dot products)."""
    if torch.compiler.is_compiling() and q.device.type == "cpu":
        # compiled on a CPU: a reduction Inductor fuses with the gather of the keys (a decode
        # step's few rows make MKL's batched GEMM mostly call overhead, and its input a copy)
        return (q.float().unsqueeze(-2) * keys.float().unsqueeze(-3).unsqueeze(-4)).sum(-1)
    if is_half_gemm and _is_half_gemm_ok(q, keys):
        # 16-bit q and keys on a GPU: a tensor-core GEMM accumulating and writing float32. Each
        # product of two bf16 / fp16 values is exact in float32, so this differs from upcasting
        # first (a SIMT float32 GEMM, ~10x slower: 11 ms of an 8K-token prefill on an H100) only
        # in the order of the float32 sums. (DeepSeek's own indexer runs in FP8.)
        *lead, S, H, D = q.shape
        N = keys.shape[-2]
        return torch.bmm(q.reshape(-1, S * H, D), keys.reshape(-1, N, D).transpose(1, 2),
                         out_dtype=torch.float32).view(*lead, S, H, N)
    return torch.einsum("...shd,...nd->...shn", q.float(), keys.float())


def weigh_heads(dots: torch.Tensor, head_weights: torch.Tensor, head_dim: int) -> torch.Tensor:
    """score(t, s) = Σ_h w_{t,h} ReLU(dots_{t,h,s}) d_I^-1/2: dots [..., S, n_I, N], head_weights
    [..., S, n_I] -> [..., S, N] float32."""
    return (dots.relu() * head_dim ** -0.5 * head_weights.unsqueeze(-1)).sum(dim=-2)


def index_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor,
                 is_half_gemm: bool = True) -> torch.Tensor:
    """The indexer's scores: q [..., S, n_I, d_I], head_weights [..., S, n_I], keys [..., N, d_I]
    -> [..., S, N] float32."""
    return weigh_heads(index_dots(q, keys, is_half_gemm), head_weights, q.shape[-1])
