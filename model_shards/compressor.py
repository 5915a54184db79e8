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

import torch
from torch import nn

from .ops import apply_rope, rms_norm, rope_cos_sin
from .state import CompressorState


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

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (kv, gate) [T, in_dim] for every token of a step at once."""
        return self.wkv(x), self.wgate(x)

    def push(self, cs: CompressorState, kv: torch.Tensor, gate: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Append one sequence's new projected tokens ([S, in_dim]); emit every completed entry."""
        if cs.tail_kv.shape[0]:
            kv = torch.cat([cs.tail_kv, kv])
            gate = torch.cat([cs.tail_gate, gate])
        usable = (kv.shape[0] // self.rate) * self.rate
        cs.tail_kv, cs.tail_gate = kv[usable:].clone(), gate[usable:].clone()
        if usable == 0:
            return
        num_windows = usable // self.rate
        win_kv = kv[:usable].view(num_windows, self.rate, self.in_dim)
        win_gate = gate[:usable].view(num_windows, self.rate, self.in_dim) + self.ape
        if self.is_overlapping:
            d, r = self.dim, self.rate
            slots_kv = win_kv.new_zeros(num_windows, 2 * r, d)                    # [W, 2m, d]
            slots_gate = win_gate.new_full((num_windows, 2 * r, d), float("-inf"))
            slots_kv[:, r:], slots_gate[:, r:] = win_kv[..., d:], win_gate[..., d:]  # Cb of window w
            slots_kv[1:, :r], slots_gate[1:, :r] = win_kv[:-1, :, :d], win_gate[:-1, :, :d]  # Ca of w-1
            if cs.overlap_kv is not None:
                slots_kv[0, :r], slots_gate[0, :r] = cs.overlap_kv, cs.overlap_gate
            cs.overlap_kv = win_kv[-1, :, :d].clone()
            cs.overlap_gate = win_gate[-1, :, :d].clone()
            win_kv, win_gate = slots_kv, slots_gate
        weights = win_gate.softmax(dim=1, dtype=torch.float32).to(win_kv.dtype)
        pooled = self.norm((win_kv * weights).sum(dim=1))                          # [W, d]
        positions = (cs.num_entries + torch.arange(num_windows, device=pooled.device)) * self.rate
        cos, sin = rope_cos_sin(inv_freq, positions, dtype=torch.float32)
        cs.append_entries(apply_rope(pooled, cos, sin))


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

    def queries(self, q_residual: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> q [T, n_I, d_I] (compress rope at the query positions), head weights [T, n_I] (float32)."""
        q = self.wq_b(q_residual).unflatten(-1, (self.num_heads, self.head_dim))
        q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        weights = self.weights_proj(x).float() * self.num_heads ** -0.5
        return q, weights

    def scores(self, q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q [..., S, n_I, d_I], head_weights [..., S, n_I], keys [..., N, d_I] -> [..., S, N] float32."""
        dots = torch.einsum("...shd,...nd->...shn", q.float(), keys.float())
        return (dots.relu() * self.head_dim ** -0.5 * head_weights.unsqueeze(-1)).sum(dim=-2)
