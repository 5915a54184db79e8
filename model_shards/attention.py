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

from .batch import StepBatch
from .compressor import Compressor, Indexer, RMSNormWeight
from .config import CSA, HCA, SLIDING, ModelConfig
from .ops import apply_rope, rms_norm, stable_topk
from .state import LayerState


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
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
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if self.layer_type == HCA:
            self.compressor = Compressor(cfg.hidden_size, D, cfg.hca_rate, False, cfg.rms_norm_eps)
        elif self.layer_type == CSA:
            self.compressor = Compressor(cfg.hidden_size, D, cfg.csa_rate, True, cfg.rms_norm_eps)
            self.indexer = Indexer(cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim,
                                   cfg.csa_rate, cfg.rms_norm_eps)

    # ---- whole step --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, batch: StepBatch, states: list[LayerState],
                compress_inv_freq: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (already normed) -> [T, hidden]. Advances `states` (this layer's)."""
        cos, sin = batch.rope[self.rope_name]                     # [T, rope/2]
        q_residual = self.q_norm(self.wq_a(x))                    # [T, q_lora]
        q = self.wq_b(q_residual).unflatten(-1, (self.num_heads, self.head_dim))
        q = rms_norm(q, None, self.cfg.rms_norm_eps)
        q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))   # [T, H, D]
        kv = apply_rope(self.norm(self.wkv(x)), cos, sin)         # [T, D]

        comp_kv = comp_gate = idx_kv = idx_gate = idx_q = idx_w = None
        if self.compressor is not None:
            comp_kv, comp_gate = self.compressor.project(x)
        if self.indexer is not None:
            idx_kv, idx_gate = self.indexer.compressor.project(x)
            c_cos, c_sin = batch.rope["compress"]
            idx_q, idx_w = self.indexer.queries(q_residual, x, c_cos, c_sin)

        out = torch.empty_like(q)
        for k in batch.prefill_segments:
            rows = slice(batch.starts[k], batch.starts[k] + batch.lengths[k])
            st = states[k]
            self._push_compressors(st, rows, comp_kv, comp_gate, idx_kv, idx_gate, compress_inv_freq)
            out[rows] = self._attend_segment(q[rows], kv[rows], batch.positions[rows], st,
                                             None if idx_q is None else idx_q[rows],
                                             None if idx_w is None else idx_w[rows])
        if batch.decode_segments:
            rows = torch.tensor([batch.starts[k] for k in batch.decode_segments], dtype=torch.int64, device=x.device)
            dec_states = [states[k] for k in batch.decode_segments]
            for j, st in enumerate(dec_states):
                r = int(rows[j])
                self._push_compressors(st, slice(r, r + 1), comp_kv, comp_gate, idx_kv, idx_gate, compress_inv_freq)
            out[rows] = self._attend_decode(q[rows], kv[rows], dec_states,
                                            None if idx_q is None else idx_q[rows],
                                            None if idx_w is None else idx_w[rows])
        # undo the rope rotation that V (= K) carried, at the query position
        out = apply_rope(out, cos.unsqueeze(-2), -sin.unsqueeze(-2))
        return self._project_out(out)

    def _project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o [T, H, D] -> [T, hidden] through the grouped low-rank projection."""
        G = self.cfg.o_groups
        grouped = o.reshape(o.shape[0], G, -1)                                   # [T, G, H*D/G]
        w = self.wo_a.weight.view(G, self.cfg.o_lora_rank, -1)                   # [G, r, H*D/G]
        mid = torch.einsum("tgi,gri->tgr", grouped, w).reshape(o.shape[0], -1)   # [T, G*r]
        return self.wo_b(mid)

    def _push_compressors(self, st: LayerState, rows, comp_kv, comp_gate, idx_kv, idx_gate, inv_freq) -> None:
        if self.compressor is not None:
            self.compressor.push(st.comp, comp_kv[rows], comp_gate[rows], inv_freq)
        if self.indexer is not None:
            self.indexer.compressor.push(st.index, idx_kv[rows], idx_gate[rows], inv_freq)

    # ---- one sequence, S >= 1 new tokens -----------------------------------------------------
    QUERY_BLOCK = 128  # queries per block: a block reads only its W-1+block window keys, not all S

    def _attend_segment(self, q, kv, positions, st: LayerState, idx_q, idx_w) -> torch.Tensor:
        """q [S, H, D], kv [S, D] -> [S, H, D]; updates the window (compressors already pushed)."""
        W, S, w = self.window, q.shape[0], st.window.shape[0]
        keys = torch.cat([st.window, kv])                                        # [w+S, D], positions p0-w..
        st.window = keys[-(W - 1):].clone() if W > 1 else keys[:0].clone()
        entries = None
        if self.compressor is not None and st.comp.num_entries:
            entries = st.comp.entries                                            # [N, D]
        out = torch.empty_like(q)
        for b0 in range(0, S, self.QUERY_BLOCK):
            b1 = min(S, b0 + self.QUERY_BLOCK)
            k0 = max(0, w + b0 - (W - 1))                                        # first key any query here sees
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
        """Sink-aware softmax attention over two key sets without concatenating them.

        q [..., H, s, D]; keys [..., kw, D] with key_ok [..., s, kw]; entries [..., N, D] with
        entry_ok [..., s, N] (or None). probs = exp(l - m) / (Σ exp(l - m) + exp(sink - m)),
        m = max(all logits, sink); values are the keys themselves (K = V)."""
        scale = self.head_dim ** -0.5
        logits = torch.matmul(q, keys.unsqueeze(-3).transpose(-1, -2)) * scale    # [..., H, s, kw]
        logits = logits.masked_fill(~key_ok.unsqueeze(-3), float("-inf"))
        m = logits.amax(dim=-1, keepdim=True)
        comp = None
        if entries is not None:
            comp = torch.matmul(q, entries.unsqueeze(-3).transpose(-1, -2)) * scale  # [..., H, s, N]
            comp = comp.masked_fill(~entry_ok.unsqueeze(-3), float("-inf"))
            m = torch.maximum(m, comp.amax(dim=-1, keepdim=True))
        sink = self.attn_sink.to(q.dtype).view(-1, 1, 1)                          # [H, 1, 1]
        m = torch.maximum(m, sink)
        p = torch.exp(logits - m)
        denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink - m)
        out = torch.matmul(p, keys.unsqueeze(-3))                                  # [..., H, s, D]
        if comp is not None:
            pc = torch.exp(comp - m)
            denom = denom + pc.sum(dim=-1, keepdim=True)
            out = out + torch.matmul(pc, entries.unsqueeze(-3))
        return out / denom

    def _visible(self, positions, num_entries: int, st: LayerState, idx_q, idx_w) -> torch.Tensor:
        """[S, N] bool: causal entries, and in CSA layers only the indexer's top-k of them."""
        rate = self.compressor.rate
        causal = torch.arange(num_entries, device=positions.device)[None, :] < ((positions + 1) // rate)[:, None]
        if self.indexer is None or num_entries <= self.cfg.index_topk:
            return causal  # every causal entry fits in the top-k: the indexer cannot drop any
        scores = self.indexer.scores(idx_q, idx_w, st.index.entries)             # [S, N]
        scores = scores.masked_fill(~causal, float("-inf"))
        top = stable_topk(scores, self.cfg.index_topk)                           # [S, k], ties -> lower index
        chosen = torch.zeros_like(causal).scatter_(1, top, True)
        return chosen & causal

    # ---- B sequences, one new token each -----------------------------------------------------
    def _attend_decode(self, q, kv, states: list[LayerState], idx_q, idx_w) -> torch.Tensor:
        """q [B, H, D], kv [B, D] -> [B, H, D]; keys padded per sequence and masked."""
        B, W, D = q.shape[0], self.window, self.head_dim
        lens = [st.window.shape[0] for st in states]
        keys = kv.new_zeros(B, W, D)                                             # window, right-aligned
        for b, st in enumerate(states):
            if lens[b]:
                keys[b, W - 1 - lens[b]: W - 1] = st.window
        keys[:, W - 1] = kv
        key_ok = torch.arange(W, device=kv.device)[None, :] >= (W - 1 - torch.tensor(lens, device=kv.device))[:, None]
        for b, st in enumerate(states):
            keep = min(lens[b] + 1, W - 1)
            st.window = keys[b, W - keep:].clone() if keep else keys[b, :0].clone()
        entries = entry_ok = None
        if self.compressor is not None:
            counts = [st.comp.num_entries for st in states]
            if max(counts):
                entries, entry_ok = self._decode_entries(states, counts, idx_q, idx_w)  # [B, K, D], [B, K]
                entry_ok = entry_ok.unsqueeze(1)
        out = self._attend(q.unsqueeze(2), keys, key_ok.unsqueeze(1), entries, entry_ok)  # [B, H, 1, D]
        return out.squeeze(2)

    def _decode_entries(self, states, counts, idx_q, idx_w):
        """Each sequence's attended entries, padded: ([B, K, D], valid [B, K])."""
        B, n_max = len(states), max(counts)
        entries = states[0].comp.entries.new_zeros(B, n_max, self.head_dim)
        for b, st in enumerate(states):
            entries[b, : counts[b]] = st.comp.entries
        valid = torch.arange(n_max)[None, :] < torch.tensor(counts)[:, None]     # [B, N]
        if self.indexer is None or n_max <= self.cfg.index_topk:
            return entries, valid.to(entries.device)
        keys = entries.new_zeros(B, n_max, self.cfg.index_head_dim)
        for b, st in enumerate(states):
            keys[b, : counts[b]] = st.index.entries
        scores = self.indexer.scores(idx_q.unsqueeze(1), idx_w.unsqueeze(1), keys).squeeze(1)  # [B, N]
        valid = valid.to(scores.device)
        scores = scores.masked_fill(~valid, float("-inf"))
        top = stable_topk(scores, self.cfg.index_topk)                            # [B, k]
        picked = torch.gather(entries, 1, top.unsqueeze(-1).expand(-1, -1, self.head_dim))
        return picked, torch.gather(valid, 1, top)
