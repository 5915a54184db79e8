"""DecodeRegions: a pooled decode step's per-layer work as pure tensor functions, each run as one
compiled unit (a transform in the gpt-fast sense: the math is the model files' own functions,
only how it is launched changes).

Why: a decode step is hundreds of tiny operators per layer (mHC's Sinkhorn, norms, rope, the
compressors' window pooling, gating). Eagerly each costs a CPU dispatch (~4 us) or a GPU kernel
launch; compiled, a region becomes a few fused loops / kernels around its matmuls, and every
compiled call costs its guards and wrapper (~0.1 ms on CPUs), so regions are as large as the
step's structure allows. The pieces (every layer type shares them; weights are arguments, so one
compilation serves all layers of a kind):

    attn_in    mHC pre -> attn_norm -> in-projection -> q / kv / indexer queries (norms, rope)
    compress   one compressor: tail writes, window pooling, entry write (per compressor, only
               when some window completes; buffers are written in place)
    attn_out   ring write -> window + entry keys (indexer top-k) -> sink softmax -> inverse rope
               -> grouped output projection -> mHC merge
    moe_in     mHC pre -> ffn_norm -> gate (hash or learned)
    moe_out    shared expert (unless given) + routed -> mHC merge
and they run as three regions per layer plus the compressors:

    [moe_out(i-1) + attn_in(i)]  [compress ...]  [attn_out(i) + moe_in(i)]  <routed experts>
(layer 0 runs attn_in alone, the last layer's moe_out runs alone). The routed experts stay the
ExpertBank's (C kernels on CPUs, grouped GEMMs on GPUs) or the remote shards'. The step API
(DenseModel.attention_sublayer / moe_begin / moe_end) is unchanged: a merged region computes the
next call's outputs ahead and leaves them in the step's `StepBatch.ahead`, keyed by what they
are, the layer and the residual h they came from; the next call takes them only when its
(layer, h) match, and computes its own region otherwise.

Owns: the compiled function of each region (one set per DenseModel) and each layer's region
arguments read from its modules (`LayerArgs`, checked against the modules once per step). Only
decode-only steps whose states share the model's StatePool take this path (`can_run`); prefill
keeps the eager modules.
If compiling fails (no compiler, an unsupported op) the region says so once and runs eagerly.
"""

from __future__ import annotations

import weakref

import torch

from .attention import attend_keys, project_out, select_entries
from .compressor import pool_pushed
from . import cpu_kernels
from .cpu_kernels import linear, sinkhorn_compiled_cpu
from .fused import Compiled
from .mhc import hc_args, hc_merge, hc_weights
from .moe import gate, shared_expert
from .ops import rms_norm, rope_real, sinkhorn_rows, sinkhorn_torch


def _sinkhorn(h: torch.Tensor):
    """The Sinkhorn form that compiles best on h's device: on CPUs the C kernel as one opaque op
    (Inductor would unroll the passes into ~40 buffers; the plain loop without the kernels),
    while Triton needs the one-row form (ops.sinkhorn_rows) to avoid a kernel per pass."""
    if h.is_cuda:
        return sinkhorn_rows
    return sinkhorn_compiled_cpu if _has_cpu_kernels() else sinkhorn_torch


@torch.compiler.assume_constant_result
def _has_cpu_kernels() -> bool:   # a constant while tracing (whether the kernels built never changes)
    return cpu_kernels.is_available()


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


def attn_out_moe_in(q, kv, ring, slot_ids, ring_rows, window_ok, entry_pages, page_table, entry_ok, index_pages,
                    idx_q, idx_w, attn_sink, cs, wo_a, wo_b, h, post, comb, num_groups: int, topk: int,
                    hc_fn, hc_base, hc_scale, norm_w, token_ids, gate_w, bias, tid2eid, hc: int, num_iters: int,
                    eps: float, hc_eps: float, scoring: str, k: int, scaling: float):
    """attn_out, then the same layer's moe_in on its output -> (h, x, expert_ids, weights, post, comb)."""
    h = attn_out(q, kv, ring, slot_ids, ring_rows, window_ok, entry_pages, page_table, entry_ok, index_pages,
                 idx_q, idx_w, attn_sink, cs, wo_a, wo_b, h, post, comb, num_groups, topk)
    return (h,) + moe_in(h, hc_fn, hc_base, hc_scale, norm_w, token_ids, gate_w, bias, tid2eid, hc, num_iters,
                         eps, hc_eps, scoring, k, scaling)


def moe_out_attn_in(routed, shared, x, w13, w2, h, post, comb, limit: float, hc_fn, hc_base, hc_scale, norm_w,
                    w_in, q_norm_w, wq_b, kv_norm_w, cs, idx_wq_b, idx_cs, sizes: tuple[int, ...], hc: int,
                    num_iters: int, eps: float, hc_eps: float, num_heads: int, num_index_heads: int):
    """moe_out of layer i, then attn_in of layer i + 1 on its output -> (h, attn_in's outputs)."""
    h = moe_out(routed, shared, x, w13, w2, h, post, comb, limit)
    return h, attn_in(h, hc_fn, hc_base, hc_scale, norm_w, w_in, q_norm_w, wq_b, kv_norm_w, cs, idx_wq_b, idx_cs,
                      sizes, hc, num_iters, eps, hc_eps, num_heads, num_index_heads)


def _dims(names: str) -> dict[str, tuple[int, ...]]:
    return {name: (0,) for name in names.split()}


class LayerArgs:
    """One layer's region arguments that stay the same from step to step (its modules, weights and
    constants), read from its modules once: rebuilt every step they cost ~400 nn.Module attribute
    lookups (~0.5 us each). The fused projections (FusedLinear) are still asked each call, since
    their own cache tracks their weights. `is_current()`: every module and tensor held here is
    still the one its parent holds (a new Parameter or submodule assigned makes the cache stale;
    `.to()` and in-place loads keep the Parameter objects, so they do not)."""

    def __init__(self, dense, layer_id: int):
        cfg = dense.cfg
        # (a module's parameter / buffer / submodule dict, name, what it held): `is_current`
        self._held: list[tuple[dict, str, object]] = []
        t, sub = self._tensor, self._module
        block = sub(dense.layers, str(layer_id))
        attn, ffn = sub(block, "attn"), sub(block, "ffn")
        for name in ("attn_norm", "ffn_norm"):
            sub(block, name)
        for name in ("q_norm", "wq_b", "norm", "wo_a", "wo_b", "indexer"):
            sub(attn, name)
        if attn.indexer is not None:
            sub(attn.indexer, "wq_b")
        for parent, name in ((ffn, "gate"), (ffn, "shared_experts"), (ffn.shared_experts, "w2")):
            sub(parent, name)
        self.attn, self.indexer, self.gate = attn, attn.indexer, ffn.gate
        self.kind = (cfg.layer_types[layer_id], ffn.gate.is_hash)    # attn_out_moe_in's layer kind
        self.layer_type, self.rope_name = cfg.layer_types[layer_id], attn.rope_name
        self.in_proj, self.shared_w13 = attn._in_proj, ffn.shared_experts._w13
        hc = hc_args(cfg)
        # attn_in's arguments: (h, *pre, in_proj, *mid, rope, idx_wq_b, index rope, *post)
        self.attn_in_pre = (t(block, "hc_attn_fn"), t(block, "hc_attn_base"), t(block, "hc_attn_scale"),
                            t(block.attn_norm, "weight"))
        self.attn_in_mid = (t(attn.q_norm, "weight"), t(attn.wq_b, "weight"), t(attn.norm, "weight"))
        self.idx_wq_b = None if attn.indexer is None else t(attn.indexer.wq_b, "weight")
        self.attn_in_post = (tuple(attn._in_proj._sizes), *hc, cfg.num_attention_heads, cfg.index_n_heads)
        self.attn_out = (t(attn, "attn_sink"), t(attn.wo_a, "weight"), t(attn.wo_b, "weight"))
        g = ffn.gate
        self.moe_in_pre = (t(block, "hc_ffn_fn"), t(block, "hc_ffn_base"), t(block, "hc_ffn_scale"),
                           t(block.ffn_norm, "weight"))
        self.moe_in_post = (t(g, "weight"), None if g.is_hash else t(g, "bias"), t(g, "tid2eid") if g.is_hash else None,
                            *hc, *g.consts())
        self.shared_w2, self.limit = t(ffn.shared_experts.w2, "weight"), ffn.shared_experts.limit

    def _tensor(self, module, name: str) -> torch.Tensor:
        """module.<name> (a parameter or buffer), remembered for `is_current`."""
        owner = module._parameters if name in module._parameters else module._buffers
        self._held.append((owner, name, owner[name]))
        return owner[name]

    def _module(self, module, name: str):
        """module.<name> (a submodule, or None), remembered for `is_current`."""
        self._held.append((module._modules, name, module._modules.get(name)))
        return module._modules.get(name)

    def is_current(self) -> bool:
        return all(owner.get(name) is tensor for owner, name, tensor in self._held)


class DecodeRegions:
    """The regions of one DenseModel, compiled (`is_compiled`) or plain. `is_enabled=False`: the
    model never takes this path (its eager modules run every step)."""

    def __init__(self, is_enabled: bool = True, is_compiled: bool = True):
        self.is_enabled = is_enabled
        self.is_compiled = is_compiled
        wrap = Compiled if is_compiled else (lambda fn, dims: fn)
        # the arguments whose sizes vary between steps (rows, slots, pages, page-table widths): dim 0
        # unless said; everything else (weights, constants) is compiled static
        attn_out_dims = {**_dims("q kv ring slot_ids ring_rows window_ok entry_pages index_pages idx_q idx_w cs h "
                                 "post comb"), "page_table": (0, 1), "entry_ok": (0, 1)}
        self.attn_in = wrap(attn_in, _dims("h cs idx_cs"))
        self._wrap = wrap
        self._compress: dict[tuple, object] = {}    # one per compressor kind: `compress`
        self.moe_in = wrap(moe_in, _dims("h token_ids"))
        self.moe_out = wrap(moe_out, _dims("routed shared x h post comb"))
        self.shared = wrap(shared_expert, _dims("x"))
        self._merged_dims = {attn_out_moe_in: {**attn_out_dims, **_dims("token_ids")},
                             moe_out_attn_in: _dims("routed shared x h post comb cs idx_cs")}
        self._merged: dict[tuple, object] = {}     # `merged`: one per region and layer kind
        self._layer_args: dict[int, LayerArgs] = {}   # `layer_args`: per layer id
        self._checked_step = None                      # weakref to the last step whose layer args were checked

    def compress(self, compressor):
        """The pooling region of this compressor's kind (rate, width, overlap): each kind compiles
        its own graphs, so that no kind's variants count against another's recompile limit."""
        kind = (compressor.rate, compressor.dim, compressor.is_overlapping)
        if kind not in self._compress:
            self._compress[kind] = self._wrap(pool_pushed, _dims(
                "kv gate tail_kv tail_gate overlap_kv overlap_gate pages slot_ids tail_rows complete_slot_ids "
                "entry_positions entry_page_ids entry_rows complete_mask"))
        return self._compress[kind]

    def merged(self, fn, kind: tuple):
        """A merged region (`attn_out_moe_in`, `moe_out_attn_in`) for the layers of one kind
        (attention type and gate type, or the next layer's attention type): each kind compiles its
        own graphs, so that the product of attention and gate variants never piles up against one
        recompile limit and a call's guards only tell its own variants apart."""
        key = (fn.__name__, *kind)
        if key not in self._merged:
            self._merged[key] = self._wrap(fn, self._merged_dims[fn])
        return self._merged[key]

    # ---- each region's arguments besides h, from the layer's modules ----
    def layer_args(self, dense, layer_id: int, batch) -> LayerArgs:
        """The layer's cached LayerArgs; once per step (the first call with a new `batch`) every
        cached layer is checked against its modules and rebuilt if stale."""
        if self._checked_step is None or self._checked_step() is not batch:
            self._layer_args = {i: a for i, a in self._layer_args.items() if a.is_current()}
            self._checked_step = weakref.ref(batch)
        args = self._layer_args.get(layer_id)
        if args is None:
            args = self._layer_args[layer_id] = LayerArgs(dense, layer_id)
        return args

    def _attn_in_args(self, dense, layer_id: int, batch) -> tuple:
        a = self.layer_args(dense, layer_id, batch)
        return (*a.attn_in_pre, a.in_proj.weight(), *a.attn_in_mid,
                torch.view_as_real(batch.rope[a.rope_name]),                      # [B, half, 2]
                a.idx_wq_b, torch.view_as_real(batch.rope["compress"]), *a.attn_in_post)

    def _moe_in_args(self, dense, layer_id: int, batch) -> tuple:
        a = self.layer_args(dense, layer_id, batch)
        return (*a.moe_in_pre, batch.token_ids, *a.moe_in_post)

    def _moe_out_args(self, dense, work, routed, shared) -> tuple:
        a = self.layer_args(dense, work.layer_id, work.region_batch)
        return (routed, shared, work.x, a.shared_w13.weight(), a.shared_w2, work.h, work.post, work.comb, a.limit)

    # ---- a layer's pieces, as DenseModel calls them ----
    def attention(self, dense, layer_id: int, h: torch.Tensor, batch) -> torch.Tensor:
        """DenseModel.attention_sublayer of a decode-only pooled step; computes moe_in ahead."""
        cfg, meta, args = dense.cfg, batch.decode, self.layer_args(dense, layer_id, batch)
        attn, indexer = args.attn, args.indexer
        ahead = _take(batch, "attn_in", layer_id, h)
        if ahead is None:
            ahead = self.attn_in(h, *self._attn_in_args(dense, layer_id, batch))
        q, kv, comp, idx_q, idx_w, post, comb = ahead
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
        attn_sink, wo_a, wo_b = args.attn_out
        h, *moe = self.merged(attn_out_moe_in, args.kind)(
            q, kv, meta.pool.rings[layer_id], meta.slot_ids, meta.ring_rows, meta.window_ok, entry_pages, page_table,
            entry_ok, index_pages, idx_q, idx_w, attn_sink, torch.view_as_real(batch.rope[args.rope_name]),
            wo_a, wo_b, h, post, comb, cfg.o_groups, cfg.index_topk, *self._moe_in_args(dense, layer_id, batch))
        batch.ahead["moe_in"] = (layer_id, h, tuple(moe))
        return h

    def moe_begin(self, dense, layer_id: int, h: torch.Tensor, batch) -> tuple:
        """DenseModel.moe_begin's (x, expert_ids, weights, post, comb) of a decode-only pooled step."""
        ahead = _take(batch, "moe_in", layer_id, h)
        if ahead is not None:
            return ahead
        return self.moe_in(h, *self._moe_in_args(dense, layer_id, batch))

    def shared_expert(self, dense, work) -> torch.Tensor:
        a = self.layer_args(dense, work.layer_id, work.region_batch)
        return self.shared(work.x, a.shared_w13.weight(), a.shared_w2, a.limit)

    def moe_end(self, dense, work, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """The layer's combine; with a next layer, its attn_in too (left in the step's `ahead`)."""
        nxt, batch = work.layer_id + 1, work.region_batch
        if nxt >= dense.cfg.num_layers:
            return self.moe_out(*self._moe_out_args(dense, work, routed, shared))
        h, ahead = self.merged(moe_out_attn_in, (self.layer_args(dense, nxt, batch).layer_type,))(
            *self._moe_out_args(dense, work, routed, shared), *self._attn_in_args(dense, nxt, batch))
        batch.ahead["attn_in"] = (nxt, h, ahead)
        return h

    def can_run(self, batch) -> bool:
        """Decode-only steps over pooled states (DecodeMeta set), when enabled."""
        return self.is_enabled and batch.decode is not None and not batch.prefill_segments

    def __getstate__(self):   # compiled code does not copy: a copy recompiles on first use
        return {"is_enabled": self.is_enabled, "is_compiled": self.is_compiled}

    def __setstate__(self, state):
        self.__init__(**state)


def _take(batch, kind: str, layer_id: int, h: torch.Tensor):
    """The outputs a merged region left for this call, if they are for this layer and this h."""
    entry = batch.ahead.pop(kind, None)
    if entry is not None and entry[0] == layer_id and entry[1] is h:
        return entry[2]
    return None
