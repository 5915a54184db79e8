"""V4 attention: shared-KV MQA over a sliding window plus CSA / HCA compressed entries.

Owns: the attention weights of one layer and its math. Shapes: T tokens in a step, H heads,
D = head_dim, W = sliding_window.
- q: low-rank (wq_a -> q_norm -> wq_b), then an unweighted RMSNorm per head, RoPE on the trailing
  rope dims. kv: one D-wide latent (wkv -> norm, RoPE) used as both K and V.
- keys = [window (the last W-1 latents + the new ones, causal, distance < W) | compressed entries
  (entry e is visible to a query at position t iff e < (t+1) // rate; in CSA layers only the
  Lightning Indexer's top-k of those)], plus a per-head sink logit that takes softmax mass but
  contributes no value.
- output: inverse RoPE (-θ at the query position) on the rope dims, so each value contributes as a
  function of relative distance; then the grouped low-rank projection (wo_a per group, wo_b).
Sliding layers use the "main" rope, compressed layers the "compress" (YaRN) rope.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .batch import DecodeMeta, StepBatch
from .compressor import Compressor, Indexer, RMSNormWeight, index_dots, index_scores, weigh_heads
from .config import CSA, HCA, SLIDING, ModelConfig
from .cpu_kernels import grouped_linear, linear
from .fused import FusedLinear
from .ops import rms_norm, rope_, stable_topk
from .state import LayerState


def attend(q, keys, key_ok, entries, entry_ok, sink, scale: float) -> torch.Tensor:
    """Sink-aware softmax attention over two key sets without concatenating them.

    q [..., H, s, D]; keys [..., kw, D] with key_ok [..., s, kw]; entries [..., N, D] with
    entry_ok [..., s, N] (or None); sink [H]. probs = exp(l - m) / (Σ exp(l - m) + exp(sink - m)),
    m = max(all logits, sink); values are the keys themselves (K = V)."""
    logits = torch.matmul(q, keys.unsqueeze(-3).transpose(-1, -2)) * scale    # [..., H, s, kw]
    logits = logits.masked_fill(~key_ok.unsqueeze(-3), float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    comp = None
    if entries is not None:
        comp = torch.matmul(q, entries.unsqueeze(-3).transpose(-1, -2)) * scale  # [..., H, s, N]
        comp = comp.masked_fill(~entry_ok.unsqueeze(-3), float("-inf"))
        m = torch.maximum(m, comp.amax(dim=-1, keepdim=True))
    sink = sink.to(q.dtype).view(-1, 1, 1)                                     # [H, 1, 1]
    m = torch.maximum(m, sink)
    p = torch.exp(logits - m)
    denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink - m)
    out = torch.matmul(p, keys.unsqueeze(-3))                                  # [..., H, s, D]
    if comp is not None:
        pc = torch.exp(comp - m)
        denom = denom + pc.sum(dim=-1, keepdim=True)
        out = out + torch.matmul(pc, entries.unsqueeze(-3))
    return out / denom


def index_mask(dots, head_weights, causal, k: int, head_dim: int) -> torch.Tensor:
    """A prefill block's visible compressed entries: the indexer's top-k of its causal entries.
    dots [s, n_I, N] float32 (compressor.index_dots), head_weights [s, n_I], causal [s, N] bool
    -> [s, N] bool. Ties go to the lower entry (ops.stable_topk)."""
    scores = weigh_heads(dots, head_weights, head_dim).masked_fill(~causal, float("-inf"))   # [s, N]
    top = stable_topk(scores, k)                                                 # [s, k]
    return torch.zeros_like(causal).scatter_(1, top, True) & causal


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.layer_type = cfg.layer_types[layer_id]
        self.rope_name = "main" if self.layer_type == SLIDING else "compress"
        H, D = cfg.num_attention_heads, cfg.head_dim
        self.num_heads, self.head_dim, self.window = H, D, cfg.sliding_window
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNormWeight(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * D, bias=False)
        self.wkv = nn.Linear(cfg.hidden_size, D, bias=False)
        self.norm = RMSNormWeight(D, cfg.rms_norm_eps)
        # grouped output projection: group g maps its H*D/G inputs to o_lora_rank outputs
        self.wo_a = nn.Linear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))
        self.prefill_attention = None   # prefill_compiled.PrefillAttention (the DenseModel's), or None
        self.prefill_indexer = None     # prefill_compiled.PrefillIndexer (the DenseModel's), or None
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if self.layer_type == HCA:
            self.compressor = Compressor(cfg.hidden_size, D, cfg.hca_rate, False, cfg.rms_norm_eps)
        elif self.layer_type == CSA:
            self.compressor = Compressor(cfg.hidden_size, D, cfg.csa_rate, True, cfg.rms_norm_eps)
            self.indexer = Indexer(cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim,
                                   cfg.csa_rate, cfg.rms_norm_eps)
        # every projection of the layer input: q_a, kv, [compressor kv, gate], [indexer kv, gate, weights]
        in_proj = [self.wq_a, self.wkv]
        if self.compressor is not None:
            in_proj += [self.compressor.wkv, self.compressor.wgate]
        if self.indexer is not None:
            ic = self.indexer.compressor
            in_proj += [ic.wkv, ic.wgate, self.indexer.weights_proj]
        self._in_proj = FusedLinear(in_proj)

    # ---- whole step --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, batch: StepBatch, states: list[LayerState],
                compress_inv_freq: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (already normed) -> [T, hidden]. Advances `states` (this layer's)."""
        cis = batch.rope[self.rope_name]                          # [T, rope/2] complex
        proj = self._in_proj(x)                                   # every projection of x, one matmul
        q_residual = self.q_norm(proj[0])                         # [T, q_lora]
        q = linear(q_residual, self.wq_b.weight).unflatten(-1, (self.num_heads, self.head_dim))
        q = rms_norm(q, None, self.cfg.rms_norm_eps)
        q = rope_(q, cis.unsqueeze(-2))                           # [T, H, D]
        kv = rope_(self.norm(proj[1]), cis)                       # [T, D]

        comp_kv = comp_gate = idx_kv = idx_gate = idx_q = idx_w = None
        if self.compressor is not None:
            comp_kv, comp_gate = proj[2], proj[3]                 # [T, in_dim]
        if self.indexer is not None:
            idx_kv, idx_gate = proj[4], proj[5]
            idx_q, idx_w = self.indexer.queries(q_residual, proj[6], batch.rope["compress"])

        if not batch.prefill_segments:                            # decode only: rows are 0..T-1 in order
            return self._decode_step(q, kv, comp_kv, comp_gate, idx_kv, idx_gate, idx_q, idx_w, cis, batch,
                                     states, compress_inv_freq)
        out = torch.empty_like(q)
        for k in batch.prefill_segments:
            rows = slice(batch.starts[k], batch.starts[k] + batch.lengths[k])
            st = states[k]
            self._push_compressors(st, rows, comp_kv, comp_gate, idx_kv, idx_gate, compress_inv_freq)
            out[rows] = self._attend_segment(q[rows], kv[rows], batch.positions[rows], st,
                                             None if idx_q is None else idx_q[rows],
                                             None if idx_w is None else idx_w[rows])
        if batch.decode_segments:
            rows = batch.decode_rows

            def pick(t):
                return None if t is None else t[rows]

            out[rows] = self._decode_rows(pick(q), pick(kv), pick(comp_kv), pick(comp_gate), pick(idx_kv),
                                          pick(idx_gate), pick(idx_q), pick(idx_w), batch,
                                          [states[k] for k in batch.decode_segments], compress_inv_freq)
        # undo the rope rotation that V (= K) carried, at the query position
        out = rope_(out, cis.unsqueeze(-2).conj())
        return self._project_out(out)

    def _decode_step(self, q, kv, comp_kv, comp_gate, idx_kv, idx_gate, idx_q, idx_w, cis, batch, states,
                     inv_freq) -> torch.Tensor:
        out = self._decode_rows(q, kv, comp_kv, comp_gate, idx_kv, idx_gate, idx_q, idx_w, batch, states, inv_freq)
        return self._project_out(rope_(out, cis.unsqueeze(-2).conj()))

    def _decode_rows(self, q, kv, comp_kv, comp_gate, idx_kv, idx_gate, idx_q, idx_w, batch, states,
                     inv_freq) -> torch.Tensor:
        """The decode segments' rows (one token per sequence): push compressors, attend."""
        meta = batch.decode
        if self.compressor is not None:
            self.compressor.push_decode([st.comp for st in states], comp_kv, comp_gate, inv_freq,
                                        self._pooled_tail(meta, "comp"))
        if self.indexer is not None:
            self.indexer.compressor.push_decode([st.index for st in states], idx_kv, idx_gate, inv_freq,
                                                self._pooled_tail(meta, "index"))
        return self._attend_decode(q, kv, states, idx_q, idx_w, meta)

    def _pooled_tail(self, meta: DecodeMeta | None, name: str):
        """The pool buffers and step indices of one of this layer's compressors (None: not pooled)."""
        if meta is None:
            return None
        rate = self.compressor.rate
        return meta.compressor(self.layer_id, name, rate)

    def _project_out(self, o: torch.Tensor) -> torch.Tensor:
        return project_out(o, self.wo_a.weight, self.wo_b.weight, self.cfg.o_groups)

    def _push_compressors(self, st: LayerState, rows, comp_kv, comp_gate, idx_kv, idx_gate, inv_freq) -> None:
        if self.compressor is not None:
            self.compressor.push(st.comp, comp_kv[rows], comp_gate[rows], inv_freq)
        if self.indexer is not None:
            self.indexer.compressor.push(st.index, idx_kv[rows], idx_gate[rows], inv_freq)

    # ---- one sequence, S >= 1 new tokens -----------------------------------------------------
    # Queries per block: a block reads only its W-1+block window keys, not all S, and its indexer
    # scores are [block, n_I, N] while computed. Small blocks keep CPU memory traffic low; on a GPU
    # the per-block launches dominate, so blocks are 8x larger there.
    QUERY_BLOCK = 128
    QUERY_BLOCK_GPU = 1024
    # A block's window keys start early enough that their count is a multiple of this (the keys
    # before the window are masked, so the math is unchanged): on a GPU, W - 1 + 1024 = 1151 keys
    # made the [H, s, kw] logits and their product with the keys run as CUTLASS `align1` GEMMs
    # (one element alignment), ~12-21 ms of an 8K-token prefill's 120-160 ms on an H100.
    KEY_ALIGN = 1
    KEY_ALIGN_GPU = 8

    def _attend_segment(self, q, kv, positions, st: LayerState, idx_q, idx_w) -> torch.Tensor:
        """q [S, H, D], kv [S, D] -> [S, H, D]; updates the window (compressors already pushed)."""
        W, S = self.window, q.shape[0]
        window = st.window
        w = window.shape[0]
        keys = torch.cat([window, kv])                                           # [w+S, D], positions p0-w..
        st.write_window(kv)
        entries = None
        if self.compressor is not None and st.comp.num_entries:
            entries = st.comp.entries                                            # [N, D]
        out = torch.empty_like(q)
        is_cpu = q.device.type == "cpu"
        block = self.QUERY_BLOCK if is_cpu else self.QUERY_BLOCK_GPU
        align = self.KEY_ALIGN if is_cpu else self.KEY_ALIGN_GPU
        for b0 in range(0, S, block):
            b1 = min(S, b0 + block)
            k0 = max(0, w + b0 - (W - 1))                                        # first key any query here sees
            k0 = max(0, k0 - (k0 - w - b1) % align)                              # w + b1 - k0: a multiple of align
            k_pos = positions[0] - w + torch.arange(k0, w + b1, device=kv.device)
            dist = positions[b0:b1, None] - k_pos[None, :]                       # [s, kw]
            win_ok = (dist >= 0) & (dist < W)
            visible = None
            if entries is not None:  # per block: the indexer's scores are [s, n_I, N] while computed
                visible = self._visible(positions[b0:b1], entries.shape[0], st,
                                        None if idx_q is None else idx_q[b0:b1],
                                        None if idx_w is None else idx_w[b0:b1])  # [s, N]
            out[b0:b1] = self._attend(q[b0:b1].transpose(0, 1), keys[k0: w + b1], win_ok,
                                      entries, visible).transpose(0, 1)
        return out

    def _attend(self, q, keys, key_ok, entries, entry_ok) -> torch.Tensor:
        """`attend` for one query block of a prefill segment (compiled where `prefill_attention`,
        set by the owning DenseModel, runs it: large blocks on GPUs)."""
        fn = attend
        if self.prefill_attention is not None and self.prefill_attention.can_run(q):
            fn = self.prefill_attention
        return fn(q, keys, key_ok, entries, entry_ok, self.attn_sink, self.head_dim ** -0.5)

    def _visible(self, positions, num_entries: int, st: LayerState, idx_q, idx_w) -> torch.Tensor:
        """[S, N] bool: causal entries, and in CSA layers only the indexer's top-k of them."""
        rate = self.compressor.rate
        causal = torch.arange(num_entries, device=positions.device)[None, :] < ((positions + 1) // rate)[:, None]
        if self.indexer is None or num_entries <= self.cfg.index_topk:
            return causal  # every causal entry fits in the top-k: the indexer cannot drop any
        dots = index_dots(idx_q, st.index.entries, self.indexer.is_half_gemm)    # [S, n_I, N]
        fn = index_mask
        if self.prefill_indexer is not None and self.prefill_indexer.can_run(dots):
            fn = self.prefill_indexer    # (large blocks on GPUs: one fused pass over dots)
        return fn(dots, idx_w, causal, self.cfg.index_topk, self.indexer.head_dim)

    # ---- B sequences, one new token each -----------------------------------------------------
    def _attend_decode(self, q, kv, states: list[LayerState], idx_q, idx_w, meta: DecodeMeta | None) -> torch.Tensor:
        """q [B, H, D], kv [B, D] -> [B, H, D] (compressors already pushed).

        Each sequence's latent goes into its ring row; the B rings are gathered and every ring row
        holding one of the last W tokens is a key (a decode query sees its whole window), then the
        attended entries follow. Pooled states (`meta`): one indexed write and one gather, and
        `states` is not read (shapes and branches come from `meta` alone)."""
        W = self.window
        if meta is not None:   # buffer writes only; the counters advance after the step
            ring = meta.pool.rings[self.layer_id]                                # [slots, W, D]
            ring[meta.slot_ids, meta.ring_rows] = kv
            keys = ring[meta.slot_ids]                                              # [B, W, D]
            key_ok = meta.window_ok
        else:
            for b, st in enumerate(states):
                st.write_window(kv[b: b + 1])
            keys = torch.stack([st.ring for st in states])                       # [B, W, D]
            seen = torch.tensor([st.num_tokens for st in states], device=kv.device)  # incl. this token
            key_ok = torch.arange(W, device=kv.device)[None, :] < seen[:, None]  # [B, W]
        if self.compressor is not None and (meta.max_entries[self.compressor.rate] if meta is not None
                                            else max(st.comp.num_entries for st in states)):
            if meta is not None:
                entries, entry_ok = self._decode_entries_paged(meta, idx_q, idx_w)  # [B, K, D], [B, K]
            else:
                entries, entry_ok = self._decode_entries(states, idx_q, idx_w)

            keys = torch.cat([keys, entries], dim=1)
            key_ok = torch.cat([key_ok, entry_ok], dim=1)
        return attend_keys(q, keys, key_ok, self.attn_sink)

    def _decode_entries(self, states, idx_q, idx_w):
        """Each sequence's attended entries, right-padded: ([B, K, D], valid [B, K])."""
        counts = torch.tensor([st.comp.num_entries for st in states])
        entries = pad_sequence([st.comp.entries for st in states], batch_first=True)   # [B, N, D]
        valid = (torch.arange(entries.shape[1])[None, :] < counts[:, None]).to(entries.device)  # [B, N]
        keys = None
        if self.indexer is not None and int(counts.max()) > self.cfg.index_topk:
            keys = pad_sequence([st.index.entries for st in states], batch_first=True)  # [B, N, d_I]
        return self._select_entries(entries, valid, keys, idx_q, idx_w)

    def _decode_entries_paged(self, meta: DecodeMeta, idx_q, idx_w):
        """Pooled: every sequence's entries in one gather through the page table of this rate."""
        rate = self.compressor.rate
        table = meta.page_table[rate]                                            # [B, pages]
        entries = meta.pool.pages[(self.layer_id, "comp")][table].flatten(1, 2)  # [B, pages*P, D]
        keys = None
        if self.indexer is not None and meta.max_entries[rate] > self.cfg.index_topk:
            keys = meta.pool.pages[(self.layer_id, "index")][table].flatten(1, 2)  # [B, pages*P, d_I]
        return self._select_entries(entries, meta.entry_ok[rate], keys, idx_q, idx_w)

    def _select_entries(self, entries, valid, keys, idx_q, idx_w):
        return select_entries(entries, valid, keys, idx_q, idx_w, self.cfg.index_topk)


def select_entries(entries, valid, keys, idx_q, idx_w, topk: int):
    """Decode rows' attended entries [B, N, D] with `valid` [B, N]; for CSA with more than top-k
    entries (`keys` [B, N, d_I] given) only the indexer's top-k per row: ([B, k, D], [B, k])."""
    if keys is None:
        return entries, valid
    scores = index_scores(idx_q.unsqueeze(1), idx_w.unsqueeze(1), keys).squeeze(1)   # [B, N]
    scores = scores.masked_fill(~valid, float("-inf"))
    top = stable_topk(scores, topk)                                                   # [B, k]
    picked = torch.gather(entries, 1, top.unsqueeze(-1).expand(-1, -1, entries.shape[-1]))
    return picked, torch.gather(valid, 1, top)


def attend_keys(q: torch.Tensor, keys: torch.Tensor, key_ok: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """One query per row over its own keys (K = V): q [B, H, D], keys [B, L, D], key_ok [B, L]
    -> [B, H, D]; the per-head sink logit takes softmax mass but adds no value."""
    B = q.shape[0]
    # compiled on a CPU: the two products as reductions Inductor fuses with the softmax (MKL's
    # batched GEMM costs ~70 us a call at these sizes: B tiny [H, D] x [D, L] products)
    is_fused = torch.compiler.is_compiling() and q.device.type == "cpu"
    q = q * q.shape[-1] ** -0.5
    if is_fused:
        logits = (q.unsqueeze(2) * keys.unsqueeze(1)).sum(-1)                  # [B, H, L]
    else:
        logits = torch.bmm(q, keys.transpose(1, 2))                             # [B, H, L]
    logits = logits.masked_fill(~key_ok.unsqueeze(1), float("-inf"))
    sink = attn_sink.to(logits.dtype).view(1, -1, 1).expand(B, -1, 1)           # [B, H, 1]
    probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
    if is_fused:
        return (probs.unsqueeze(-1) * keys.unsqueeze(1)).sum(2)                # [B, H, D]
    return torch.bmm(probs, keys)


def project_out(o: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, num_groups: int) -> torch.Tensor:
    """o [T, H, D] -> [T, hidden] through the grouped low-rank projection: group g maps its
    H*D/G inputs with wo_a's rows [g*r, (g+1)*r), then wo_b mixes the G*r."""
    w = wo_a.view(num_groups, wo_a.shape[0] // num_groups, -1)                   # [G, r, H*D/G]
    mid = grouped_linear(o.reshape(o.shape[0], -1), w)                           # [T, G*r]
    return linear(mid, wo_b)
