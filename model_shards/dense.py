"""DenseModel: every weight of DeepSeek-V4 except the routed experts (the router's share).

Owns: embedding, per-layer attention / mHC / norms / gate / shared expert, hc_head, final norm and
head; and the step API the serving router drives layer by layer:

    batch = dense.begin_step(states, token_ids)          # embed + rope tables      h: [T, hc, hidden]
    for i in layers:
        h = dense.attention_sublayer(i, h, batch)        # mHC pre -> norm -> attention -> mHC post
        work = dense.moe_begin(i, h, batch)              # mHC pre -> norm -> gate (x, expert ids, weights)
        routed = <experts>(i, work.x, work.expert_ids, work.weights)   # local bank or remote shards
        h = dense.moe_end(work, routed)                  # + shared expert -> mHC post
    logits = dense.finish_step(h, batch)                 # hc_head -> norm -> head; states advance

The residual streams are mHC's (model_shards/mhc.py). Also owns `regions` (regions.DecodeRegions,
off unless enabled): when on, decode-only pooled steps run these same calls as compiled regions;
and `prefill_mhc` / `prefill_attention` / `prefill_indexer` (prefill_compiled.py; on for CUDA):
steps with a prefill segment run mHC, and large query blocks their attention and indexer top-k,
as compiled functions (every Attention layer holds a reference to the one `prefill_attention`
and `prefill_indexer`; `warm_up_prefill` compiles all three).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention
from .batch import DecodeMeta, StepBatch
from .compressor import RMSNormWeight
from .config import ModelConfig
from .cpu_kernels import linear
from .fused import Sinkhorn
from .moe import Gate, SharedExpert
from .mhc import hc_args, hc_merge, hc_weights
from .prefill_compiled import PrefillAttention, PrefillIndexer, PrefillMHC
from .ops import linear_f32, rms_norm, rope_cis, rope_inv_freq
from .regions import DecodeRegions
from .state import SequenceState
from .state_pool import StatePool


class Block(nn.Module):
    """One decoder layer's dense weights (official names: attn, ffn.gate, ffn.shared_experts, ...)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        hc, mix = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult
        self.attn = Attention(cfg, layer_id)
        self.ffn = nn.Module()
        self.ffn.gate = Gate(cfg, layer_id)
        self.ffn.shared_experts = SharedExpert(cfg)
        self.attn_norm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_attn_fn = nn.Parameter(torch.zeros(mix, hc * cfg.hidden_size))
        self.hc_attn_base = nn.Parameter(torch.zeros(mix))
        self.hc_attn_scale = nn.Parameter(torch.ones(3))
        self.hc_ffn_fn = nn.Parameter(torch.zeros(mix, hc * cfg.hidden_size))
        self.hc_ffn_base = nn.Parameter(torch.zeros(mix))
        self.hc_ffn_scale = nn.Parameter(torch.ones(3))


@dataclass
class MoEWork:
    """What a layer's MoE needs between gating and combine (router-side)."""
    layer_id: int
    x: torch.Tensor           # [T, hidden] normed MoE input (dispatched to experts)
    expert_ids: torch.Tensor  # [T, k] int64 global expert ids
    weights: torch.Tensor     # [T, k] float32 routing weights
    h: torch.Tensor           # [T, hc, hidden] residual streams before the MoE
    post: torch.Tensor        # [T, hc]
    comb: torch.Tensor        # [T, hc, hc]
    # the step, when DecodeRegions made this: its shared expert and combine (with the next layer's
    # attn_in) run there too
    region_batch: StepBatch | None = None
    is_compiled_mhc: bool = False   # mHC through PrefillMHC (the merge must match the weights' path)

    @property
    def is_region(self) -> bool:
        return self.region_batch is not None


class DenseModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hc = cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * cfg.hidden_size))
        self.hc_head_base = nn.Parameter(torch.zeros(hc))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.state_pool: StatePool | None = None   # made on the first new_state(), on the weights' device
        self.sinkhorn = Sinkhorn()                 # mHC's Sinkhorn (fused on GPUs)
        self.regions = DecodeRegions(is_enabled=False)   # compiled decode regions (off until enabled)
        self.prefill_mhc = PrefillMHC()            # mHC of large eager steps, compiled (GPUs)
        self.prefill_attention = PrefillAttention()   # large prefill query blocks' attention, compiled (GPUs)
        self.prefill_indexer = PrefillIndexer()       # large prefill query blocks' indexer top-k, compiled (GPUs)
        for block in self.layers:
            block.attn.prefill_attention = self.prefill_attention
            block.attn.prefill_indexer = self.prefill_indexer
        self.register_buffer("main_inv_freq", rope_inv_freq(cfg.main_rope, cfg.qk_rope_head_dim), persistent=False)
        self.register_buffer("compress_inv_freq", rope_inv_freq(cfg.compress_rope, cfg.qk_rope_head_dim), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_state(self) -> SequenceState:
        """A fresh state in this model's StatePool (batched decode reads / writes it in place)."""
        if self.state_pool is None or self.state_pool.dtype != self.dtype or self.state_pool.device != self.device:
            self.state_pool = StatePool(self.cfg, self.dtype, self.device)
        return self.state_pool.new_state()

    def warm_up_prefill(self) -> None:
        """Compile prefill's compiled pieces now (GPUs; nothing elsewhere): engines call it at
        start, so that the first prompt does not wait for the compiler."""
        self.prefill_mhc.warm_up(self)
        self.prefill_attention.warm_up(self)
        self.prefill_indexer.warm_up(self)

    # ---- step API ----------------------------------------------------------------------------
    def begin_step(self, states: list[SequenceState], token_ids: list[torch.Tensor],
                   offsets: list[int] | None = None) -> tuple[torch.Tensor, StepBatch]:
        """`offsets`: segment k's tokens start `offsets[k]` past its state's counter (a later part of
        a prefill cut across micro-batches; see StepBatch.build)."""
        batch = StepBatch.build(states, token_ids, self.device, vocab_size=self.cfg.vocab_size, offsets=offsets)
        if batch.decode_segments:
            dec_states = [states[k] for k in batch.decode_segments]
            batch.decode = DecodeMeta.build(dec_states, self.device, self.cfg.sliding_window)
        return self.embed_step(batch), batch

    def embed_step(self, batch: StepBatch) -> torch.Tensor:
        """Device work only (a CUDA graph captures it): the step's rope tables and h [T, hc, hidden]."""
        batch.rope["main"] = rope_cis(self.main_inv_freq, batch.positions, self.cfg.main_rope.attention_factor)
        batch.rope["compress"] = rope_cis(self.compress_inv_freq, batch.positions,
                                              self.cfg.compress_rope.attention_factor)
        h = self.embed(batch.token_ids)                                          # [T, hidden]
        return h.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()

    def attention_sublayer(self, layer_id: int, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if self.regions.can_run(batch):
            return self.regions.attention(self, layer_id, h, batch)
        block = self.layers[layer_id]
        is_compiled_mhc = self.prefill_mhc.can_run(h, batch)
        collapsed, post, comb = self._hc_weights(h, block.hc_attn_fn, block.hc_attn_base, block.hc_attn_scale,
                                                 is_compiled_mhc)
        layer_states = [s.layers[layer_id] for s in batch.states]
        out = block.attn(block.attn_norm(collapsed), batch, layer_states, self.compress_inv_freq)
        return self._hc_merge(out, h, post, comb, is_compiled_mhc)

    def _hc_weights(self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                    is_compiled_mhc: bool = False):
        if is_compiled_mhc:
            return self.prefill_mhc.weights(h, fn, base, scale, *hc_args(self.cfg))
        return hc_weights(h, fn, base, scale, *hc_args(self.cfg), self.sinkhorn)

    def _hc_merge(self, out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                  is_compiled_mhc: bool = False) -> torch.Tensor:
        if is_compiled_mhc:
            return self.prefill_mhc.merge(out, h, post, comb)
        return hc_merge(out, h, post, comb)

    def moe_begin(self, layer_id: int, h: torch.Tensor, batch: StepBatch) -> MoEWork:
        if self.regions.can_run(batch):
            x, expert_ids, weights, post, comb = self.regions.moe_begin(self, layer_id, h, batch)
            return MoEWork(layer_id, x, expert_ids, weights, h, post, comb, region_batch=batch)
        block = self.layers[layer_id]
        is_compiled_mhc = self.prefill_mhc.can_run(h, batch)
        collapsed, post, comb = self._hc_weights(h, block.hc_ffn_fn, block.hc_ffn_base, block.hc_ffn_scale,
                                                 is_compiled_mhc)
        x = block.ffn_norm(collapsed)
        expert_ids, weights = block.ffn.gate(x, batch.token_ids)
        return MoEWork(layer_id, x, expert_ids, weights, h, post, comb, is_compiled_mhc=is_compiled_mhc)

    def shared_expert(self, work: MoEWork) -> torch.Tensor:
        if work.is_region:
            return self.regions.shared_expert(self, work)
        return self.layers[work.layer_id].ffn.shared_experts(work.x)

    def moe_end(self, work: MoEWork, routed: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
        if work.is_region:
            return self.regions.moe_end(self, work, routed, shared)
        if shared is None:
            shared = self.shared_expert(work)
        return self._hc_merge(routed + shared, work.h, work.post, work.comb, work.is_compiled_mhc)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """hc_head collapse + final norm: [T, hc, hidden] -> [T, hidden]."""
        flat = rms_norm(h.flatten(1).float(), None, self.cfg.rms_norm_eps)
        pre = torch.sigmoid(linear_f32(flat, self.hc_head_fn) * self.hc_head_scale.float() + self.hc_head_base.float())
        pre = pre + self.cfg.hc_eps
        return self.norm((pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype))

    def finish_step(self, h: torch.Tensor, batch: StepBatch, rows: torch.Tensor | None = None,
                    return_hidden: bool = False):
        """Logits of `rows` (default: all tokens) and advance every state by its segment length."""
        hidden = self.final_hidden(h if rows is None else h[rows])
        logits = linear(hidden, self.head.weight)
        self.advance(batch)
        return (logits, hidden) if return_hidden else logits

    @staticmethod
    def advance(batch: StepBatch) -> None:
        """Every state moves past its segment (pooled decode rows also get their per-layer
        counters here: the step itself only wrote their buffers)."""
        if batch.decode is not None:
            batch.decode.plan.advance([batch.states[k] for k in batch.decode_segments])
        for state, n in zip(batch.states, batch.lengths):
            state.num_tokens += n
