"""MTP (multi-token prediction) module: proposes the token after next for speculative decoding.

Owns: the `mtp.{j}.*` weights and one small per-sequence state (its block's sliding window).
Given the main model's final hidden state at position t (after the final norm) and the token at
t+1, it predicts the token at t+2:
    x = e_proj(enorm(embed(token_{t+1}))) + h_proj(hnorm(hidden_t))
    -> hc_mult streams -> one V4 block (sliding attention, learned-gate MoE with its own experts)
    -> hc_head collapse -> norm -> the main model's head.
The embedding and head are shared with the main model (passed in, never copied).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .compressor import RMSNormWeight
from .config import MOE, SLIDING, ModelConfig
from .dense import Block
from .mhc import hc_args, hc_merge, hc_weights
from .moe import ExpertBank
from .ops import rms_norm, rope_cis, rope_inv_freq
from .state import SequenceState


def mtp_config(cfg: ModelConfig) -> ModelConfig:
    """The one-layer config of an MTP block."""
    return dataclasses.replace(cfg, num_hidden_layers=1, layer_types=[SLIDING], mlp_layer_types=[MOE])


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = mtp_config(cfg)
        D, hc = cfg.hidden_size, cfg.hc_mult
        self.block = Block(self.cfg, 0)
        self.experts = ExpertBank(self.cfg, list(range(cfg.n_routed_experts)))
        self.enorm = RMSNormWeight(D, cfg.rms_norm_eps)
        self.hnorm = RMSNormWeight(D, cfg.rms_norm_eps)
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.norm = RMSNormWeight(D, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * D))
        self.hc_head_base = nn.Parameter(torch.zeros(hc))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.register_buffer("main_inv_freq", rope_inv_freq(cfg.main_rope, cfg.qk_rope_head_dim), persistent=False)

    def new_state(self) -> SequenceState:
        return SequenceState.new(self.cfg, self.e_proj.weight.dtype, self.e_proj.weight.device)

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, state: SequenceState,
                embed: nn.Embedding, head: nn.Linear) -> torch.Tensor:
        """hidden [S, D] (main model, positions p..p+S-1), next_ids [S] -> logits [S, vocab] for p+2..."""
        from .batch import StepBatch

        batch = StepBatch.build([state], [next_ids])
        batch.rope["main"] = rope_cis(self.main_inv_freq, batch.positions, self.cfg.main_rope.attention_factor)
        batch.rope["compress"] = batch.rope["main"]
        x = self.e_proj(self.enorm(embed(next_ids))) + self.h_proj(self.hnorm(hidden))
        h = x.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        b = self.block
        collapsed, post, comb = hc_weights(h, b.hc_attn_fn, b.hc_attn_base, b.hc_attn_scale, *hc_args(self.cfg))
        h = hc_merge(b.attn(b.attn_norm(collapsed), batch, [state.layers[0]], self.main_inv_freq), h, post, comb)
        collapsed, post, comb = hc_weights(h, b.hc_ffn_fn, b.hc_ffn_base, b.hc_ffn_scale, *hc_args(self.cfg))
        xm = b.ffn_norm(collapsed)
        ids, w = b.ffn.gate(xm, next_ids)
        h = hc_merge(self.experts(0, xm, ids, w) + b.ffn.shared_experts(xm), h, post, comb)
        flat = rms_norm(h.flatten(1).float(), None, self.cfg.rms_norm_eps)
        pre = torch.sigmoid(flat @ self.hc_head_fn.float().T * self.hc_head_scale.float() + self.hc_head_base.float())
        out = self.norm(((pre + self.cfg.hc_eps).unsqueeze(-1) * h).sum(dim=1).to(h.dtype))
        state.num_tokens += next_ids.numel()
        return head(out)
