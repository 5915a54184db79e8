"""DecodeRegions: a pooled decode step's per-layer work as five pure tensor functions, each run as
one compiled unit (a transform in the gpt-fast sense: the math is the model files' own functions,
only how it is launched changes).

Why: a decode step is hundreds of tiny operators per layer (mHC's Sinkhorn, norms, rope, the
compressors' window pooling, gating). Eagerly each costs a CPU dispatch (~4 us) or a GPU kernel
launch; compiled, a region becomes a few fused loops / kernels around its matmuls. The regions of
layer i (every layer type shares them; weights are arguments, so one compilation serves all
layers of a kind):

    attn_in    mHC pre -> attn_norm -> in-projection -> q / kv / indexer queries (norms, rope)
    compress   one compressor: tail writes, window pooling, entry write (per compressor, only
               when some window completes; buffers are written in place)
    attn_out   ring write -> window + entry keys (indexer top-k) -> sink softmax -> inverse rope
               -> grouped output projection -> mHC merge
    moe_in     mHC pre -> ffn_norm -> gate (hash or learned)
    moe_out    shared expert (unless given) + routed -> mHC merge
The routed experts stay the ExpertBank's (their own compiled CPU path, or grouped GEMMs).

Owns: the compiled function of each region (one set per DenseModel). Only decode-only steps whose
states share the model's StatePool take this path (`can_run`); prefill keeps the eager modules.
If compiling fails (no compiler, an unsupported op) the region says so once and runs eagerly.
"""

from __future__ import annotations

import torch

from .attention import attend_keys, project_out, select_entries
from .compressor import pool_pushed
from .cpu_kernels import linear
from .fused import Compiled
from .mhc import hc_args, hc_merge, hc_weights
from .moe import gate, shared_expert
from .ops import rms_norm, rope_real, sinkhorn_rows, sinkhorn_torch


def _sinkhorn(h: torch.Tensor):
    """The Sinkhorn form that compiles best on h's device: the plain loop becomes one C++ loop on
    CPUs, while Triton needs the one-row form (ops.sinkhorn_rows) to avoid a kernel per pass."""
    return sinkhorn_rows if h.is_cuda else sinkhorn_torch


def attn_in(h, hc_fn, hc_base, hc_scale, norm_w, w_in, q_norm_w, wq_b, kv_norm_w, cs, idx_wq_b, idx_cs,
            sizes: tuple[int, ...], hc: int, num_iters: int, eps: float, hc_eps: float, num_heads: int,
            num_index_heads: int):
    """h [B, hc, hidden] -> (q [B, H, D], kv [B, D], compressor inputs (kv, gate, index kv, index
    gate; None where the layer has none), indexer queries [B, n_I, d_I] and weights [B, n_I] (or
    None), post, comb). `cs` / `idx_cs`: rope tables [B, half, 2] of the layer's / indexer's rope."""
    collapsed, post, comb = hc_weights(h, hc_fn, hc_base, hc_scale, hc, num_iters, eps, hc_eps, _sinkhorn(h))
    proj = linear(rms_norm(collapsed, norm_w, eps), w_in).split(sizes, dim=-1)
    q_residual = rms_norm(proj[0], q_norm_w, eps)                                # [B, q_lora]
    q = rms_norm(linear(q_residual, wq_b).unflatten(-1, (num_heads, -1)), None, eps)
    q = rope_real(q, cs.unsqueeze(-3))                                           # [B, H, D]
    kv = rope_real(rms_norm(proj[1], kv_norm_w, eps), cs)                        # [B, D]
    comp = tuple(proj[2:6]) + (None,) * (4 - len(proj[2:6]))
    idx_q = idx_w = None
    if idx_wq_b is not None:
        idx_q = rope_real(linear(q_residual, idx_wq_b).unflatten(-1, (num_index_heads, -1)), idx_cs.unsqueeze(-3))
        idx_w = proj[6].float() * num_index_heads ** -0.5
    return q, kv, comp, idx_q, idx_w, post, comb


def attn_out(q, kv, ring, slot_ids, ring_rows, window_ok, entry_pages, page_table, entry_ok, index_pages, idx_q,
             idx_w, attn_sink, cs, wo_a, wo_b, h, post, comb, num_groups: int, topk: int):
    """Attention of B decode rows over their window ring and (entry_pages given) compressed
    entries, then output projection and mHC merge -> h [B, hc, hidden]. Writes kv into the ring."""
    ring[slot_ids, ring_rows] = kv
    keys, key_ok = ring[slot_ids], window_ok                                      # [B, W, D], [B, W]
    if entry_pages is not None:
        entries = entry_pages[page_table].flatten(1, 2)                           # [B, pages*P, D]
        index_keys = None if index_pages is None else index_pages[page_table].flatten(1, 2)
        entries, entries_ok = select_entries(entries, entry_ok, index_keys, idx_q, idx_w, topk)
        keys, key_ok = torch.cat([keys, entries], dim=1), torch.cat([key_ok, entries_ok], dim=1)
    out = rope_real(attend_keys(q, keys, key_ok, attn_sink), cs.unsqueeze(-3), is_inverse=True)
    return hc_merge(project_out(out, wo_a, wo_b, num_groups), h, post, comb)


def moe_in(h, hc_fn, hc_base, hc_scale, norm_w, token_ids, gate_w, bias, tid2eid, hc: int, num_iters: int,
           eps: float, hc_eps: float, scoring: str, k: int, scaling: float):
    """h -> (x [B, hidden] normed MoE input, expert_ids [B, k], weights [B, k], post, comb)."""
    collapsed, post, comb = hc_weights(h, hc_fn, hc_base, hc_scale, hc, num_iters, eps, hc_eps, _sinkhorn(h))
    x = rms_norm(collapsed, norm_w, eps)
    expert_ids, weights = gate(x, token_ids, gate_w, bias, tid2eid, scoring, k, scaling)
    return x, expert_ids, weights, post, comb


def moe_out(routed, shared, x, w13, w2, h, post, comb, limit: float):
    """(routed + shared expert) merged into h; the shared expert runs here unless `shared` is given."""
    if shared is None:
        shared = shared_expert(x, w13, w2, limit)
    return hc_merge(routed + shared, h, post, comb)


def _dims(names: str) -> dict[str, tuple[int, ...]]:
    return {name: (0,) for name in names.split()}


class DecodeRegions:
    """The regions of one DenseModel, compiled (`is_compiled`) or plain. `is_enabled=False`: the
    model never takes this path (its eager modules run every step)."""

    def __init__(self, is_enabled: bool = True, is_compiled: bool = True):
        self.is_enabled = is_enabled
        self.is_compiled = is_compiled
        wrap = Compiled if is_compiled else (lambda fn, dims: fn)
        # the arguments whose sizes vary between steps (rows, slots, pages, page-table widths): dim 0
        # unless said; everything else (weights, constants) is compiled static
        self.attn_in = wrap(attn_in, _dims("h cs idx_cs"))
        self._wrap = wrap
        self._compress: dict[tuple, object] = {}    # one per compressor kind: `compress`
        self.attn_out = wrap(attn_out, {**_dims("q kv ring slot_ids ring_rows window_ok entry_pages index_pages idx_q "
                                                "idx_w cs h post comb"), "page_table": (0, 1), "entry_ok": (0, 1)})
        self.moe_in = wrap(moe_in, _dims("h token_ids"))
        self.moe_out = wrap(moe_out, _dims("routed shared x h post comb"))
        self.shared = wrap(shared_expert, _dims("x"))

    def compress(self, compressor):
        """The pooling region of this compressor's kind (rate, width, overlap): each kind compiles
        its own graphs, so that no kind's variants count against another's recompile limit."""
        kind = (compressor.rate, compressor.dim, compressor.is_overlapping)
        if kind not in self._compress:
            self._compress[kind] = self._wrap(pool_pushed, _dims(
                "kv gate tail_kv tail_gate overlap_kv overlap_gate pages slot_ids tail_rows complete_slot_ids "
                "entry_positions entry_page_ids entry_rows complete_mask"))
        return self._compress[kind]

    # ---- a layer's pieces, as DenseModel calls them (the arguments come from its modules) ----
    def attention(self, dense, layer_id: int, h: torch.Tensor, batch) -> torch.Tensor:
        """DenseModel.attention_sublayer of a decode-only pooled step."""
        cfg, block, meta = dense.cfg, dense.layers[layer_id], batch.decode
        attn, indexer = block.attn, block.attn.indexer
        cs = torch.view_as_real(batch.rope[attn.rope_name])                      # [B, half, 2]
        idx_cs = torch.view_as_real(batch.rope["compress"])
        q, kv, comp, idx_q, idx_w, post, comb = self.attn_in(
            h, block.hc_attn_fn, block.hc_attn_base, block.hc_attn_scale, block.attn_norm.weight,
            attn._in_proj.weight(), attn.q_norm.weight, attn.wq_b.weight, attn.norm.weight, cs,
            None if indexer is None else indexer.wq_b.weight, idx_cs, tuple(attn._in_proj._sizes),
            *hc_args(cfg), cfg.num_attention_heads, cfg.index_n_heads)
        entry_pages = page_table = entry_ok = index_pages = None
        if attn.compressor is not None:
            rate = attn.compressor.rate
            attn.compressor.push_pooled(comp[0], comp[1], dense.compress_inv_freq,
                                        meta.compressor(layer_id, "comp", rate), self.compress(attn.compressor))
            if indexer is not None:
                indexer.compressor.push_pooled(comp[2], comp[3], dense.compress_inv_freq,
                                                meta.compressor(layer_id, "index", rate),
                                                self.compress(indexer.compressor))
            if meta.max_entries[rate]:
                entry_pages, page_table, entry_ok = meta.pool.pages[(layer_id, "comp")], meta.page_table[rate], \
                    meta.entry_ok[rate]
                if indexer is not None and meta.max_entries[rate] > cfg.index_topk:
                    index_pages = meta.pool.pages[(layer_id, "index")]
        return self.attn_out(q, kv, meta.pool.rings[layer_id], meta.slot_ids, meta.ring_rows, meta.window_ok,
                             entry_pages, page_table, entry_ok, index_pages, idx_q, idx_w, attn.attn_sink, cs,
                             attn.wo_a.weight, attn.wo_b.weight, h, post, comb, cfg.o_groups, cfg.index_topk)

    def moe_begin(self, dense, layer_id: int, h: torch.Tensor, batch) -> tuple:
        """DenseModel.moe_begin's (x, expert_ids, weights, post, comb) of a decode-only pooled step."""
        block = dense.layers[layer_id]
        g = block.ffn.gate
        return self.moe_in(h, block.hc_ffn_fn, block.hc_ffn_base, block.hc_ffn_scale, block.ffn_norm.weight,
                           batch.token_ids, *g.tensors(), *hc_args(dense.cfg), *g.consts())

    def shared_expert(self, dense, work) -> torch.Tensor:
        se = dense.layers[work.layer_id].ffn.shared_experts
        return self.shared(work.x, se._w13.weight(), se.w2.weight, se.limit)

    def moe_end(self, dense, work, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        se = dense.layers[work.layer_id].ffn.shared_experts
        return self.moe_out(routed, shared, work.x, se._w13.weight(), se.w2.weight, work.h, work.post, work.comb,
                            se.limit)

    def can_run(self, batch) -> bool:
        """Decode-only steps over pooled states (DecodeMeta set), when enabled."""
        return self.is_enabled and batch.decode is not None and not batch.prefill_segments

    def __getstate__(self):   # compiled code does not copy: a copy recompiles on first use
        return {"is_enabled": self.is_enabled, "is_compiled": self.is_compiled}

    def __setstate__(self, state):
        self.__init__(**state)
