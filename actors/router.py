"""Router: the dense model, stepped over a Transport with micro-batched dispatch / combine overlap.

Owns: the dense weights (embedding, attention, mHC, gates, shared experts, head) and the step
pipeline; NOT the sequence states (the caller owns them: the Engine, or `forward`), nor the
shards (the transport talks to them). One step at a time (a lock), since the shards follow one
fixed message order.

Overlap (ping-pong). The step's tokens are split into M micro-batches of balanced token counts
(StepBatch.plan). For every layer and micro-batch m in order:

    combine(m, layer-1) -> moe_end          wait for m's routed experts of the previous layer
    attention(m, layer) -> gate             the router's own work for m
    dispatch(m, layer)                      async: the bytes move and the shards compute ...
    shared_expert(m, layer)                 ... while the router runs m's shared expert and then
                                            micro-batch m+1's combine / attention / gate
So with M = 2, while the shards compute micro-batch 0 of layer i the router runs attention and the
shared expert of micro-batch 1, and vice versa (the dual-batch overlap of DeepEP / SGLang TBO).
M = 1 keeps only the shared-expert overlap.

Token-level split. Whole sequences go to micro-batches when that balances them; otherwise a
prefill is cut inside the sequence (parts of >= `min_split_tokens`; decode rows never): a single
long prompt's tokens [0, a) go to micro-batch 0 and [a, S) to micro-batch 1. This is exact
because each layer runs micro-batch m's attention before m+1's: at layer i, part [a, S) starts
at position num_tokens + a and finds the layer's state (window, compressor tails and overlap,
entries, indexer keys) already advanced by [0, a) at that layer, as a chunked prefill would. Each
part advances the state's token counter by its length at finish (so by S in all), and only the
part that ends a sequence gives its last-token logits (all_logits: the parts' rows, in order).
"""

from __future__ import annotations

import threading
import time

import torch

from model_shards import DenseModel, SequenceState, StepBatch
from model_shards.micro_batches import MIN_PART_TOKENS, SegmentPart
from model_shards.segment_graphs import SegmentGraphs

from .messages import StepTiming
from .transport import Transport


class Router:
    def __init__(self, dense: DenseModel, transport: Transport, micro_batches: int = 1,
                 graphs: SegmentGraphs | None = None):
        """`graphs`: replay decode-only steps' dense work from CUDA-graph segments (see
        model_shards.segment_graphs); other steps, and every step without it, run eagerly."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.graphs = graphs
        self.dense = dense
        self.config = dense.cfg
        self.transport = transport
        self.micro_batches = micro_batches
        self.layer_ids = tuple(range(self.config.num_layers))   # every V4 layer has a MoE
        self.prefill_chunk = 4096       # forward() runs prompts in chunks of this many tokens
        self.min_split_tokens = MIN_PART_TOKENS   # a prefill is cut over micro-batches into parts >= this
        self.last_timing = StepTiming()
        self._step_id = 0
        self._lock = threading.Lock()

    def set_transport(self, transport: Transport) -> None:
        with self._lock:  # never in the middle of a step
            self.transport = transport

    def new_state(self) -> SequenceState:
        return self.dense.new_state()

    # ---- ModelRunner.step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, states: list[SequenceState], token_ids: list[torch.Tensor], all_logits: bool = False,
             micro_batches: int | None = None) -> list[torch.Tensor]:
        """Advance each state by its tokens; per sequence, logits of the last token [vocab] (or of
        all new tokens [S_k, vocab] when all_logits). On ShardError the states are invalid."""
        with self._lock:
            return self._step(states, token_ids, all_logits, micro_batches or self.micro_batches)

    def _step(self, states, token_ids, all_logits, num_parts) -> list[torch.Tensor]:
        t_start = time.perf_counter()
        dense, transport = self.dense, self.transport
        ids = [t.reshape(-1) for t in token_ids]
        plan = StepBatch.build(states, ids).plan(num_parts, self.min_split_tokens)   # validates the step's shape
        num_cut = len({p.segment for mb in plan for p in mb if not p.is_last})
        if self.graphs is not None and not all_logits and not num_cut and self.graphs.can_step(states, ids):
            return self._graph_step(states, ids, [[p.segment for p in mb] for mb in plan], t_start)
        # begin_step validates token ids before any shard is involved
        mbs = [self._begin(states, ids, mb) for mb in plan]
        transport.ensure_ready()
        self._step_id += 1
        timing = StepTiming(num_tokens=sum(b.num_tokens for _, b in mbs), num_micro_batches=len(mbs),
                            num_cut_sequences=num_cut)
        transport.begin_step(self._step_id, self.layer_ids, tuple(b.num_tokens for _, b in mbs))
        hs = self._in_step(lambda: self._layers([h for h, _ in mbs], [b for _, b in mbs], timing))
        pieces: list[list[torch.Tensor]] = [[] for _ in states]   # per sequence, its parts' logits in order
        is_finite = True
        for mb, h, (_, batch) in zip(plan, hs, mbs):
            # every part's last row (a non-final part's only shows whether its shards answered
            # NaN); the sequence's logits come from the part that ends it (all_logits: every row)
            logits = dense.finish_step(h, batch, None if all_logits else batch.last_rows())
            is_finite = is_finite and bool(torch.isfinite(logits).all())
            for i, part in enumerate(mb):
                if all_logits:
                    pieces[part.segment].append(logits[batch.starts[i]: batch.starts[i] + batch.lengths[i]])
                elif part.is_last:
                    pieces[part.segment].append(logits[i])
        out = [p[0] if len(p) == 1 else torch.cat(p) for p in pieces]
        return self._end(out, is_finite, timing, t_start)

    def _begin(self, states, ids, parts: list[SegmentPart]) -> tuple[torch.Tensor, StepBatch]:
        """One micro-batch's embedded tokens and StepBatch; a later part of a cut prefill starts at
        its offset past the state's counter (DenseModel.begin_step with positions offset)."""
        sts = [states[p.segment] for p in parts]
        toks = [ids[p.segment][p.offset: p.offset + p.length] for p in parts]
        offsets = [p.offset for p in parts]
        return self.dense.begin_step(sts, toks, offsets if any(offsets) else None)

    def _in_step(self, run):
        """run() between begin_step and end_step; on any error the transport aborts the step and
        the shard's error (if it caused this one) is what propagates."""
        try:
            result = run()
            self.transport.end_step()
            return result
        except BaseException as e:
            err = self.transport.abort_step(e)
            if err is e:
                raise
            raise err from e

    def _end(self, out: list, is_finite: bool, timing: StepTiming, t_start: float) -> list[torch.Tensor]:
        if not is_finite:   # a shard whose compute raised answered NaN rows: surface its error
            err = self.transport.step_error()
            if err is not None:
                raise err
        timing.total_s = time.perf_counter() - t_start
        timing.dense_s = timing.total_s - timing.wait_s
        self.last_timing = timing
        return out

    def _layers(self, hs: list[torch.Tensor], batches: list[StepBatch], timing: StepTiming) -> list[torch.Tensor]:
        """The ping-pong schedule over all layers; hs[m]: [T_m, hc, hidden] residual streams."""
        dense, transport = self.dense, self.transport
        num_mb = len(hs)
        works, pending, shared = [None] * num_mb, [None] * num_mb, [None] * num_mb
        for layer in self.layer_ids:
            for m in range(num_mb):
                if pending[m] is not None:
                    hs[m] = dense.moe_end(works[m], self._combine(pending[m], timing), shared[m])
                hs[m] = dense.attention_sublayer(layer, hs[m], batches[m])
                works[m] = dense.moe_begin(layer, hs[m], batches[m])
                w = works[m]
                pending[m] = transport.dispatch(layer, m, w.x, w.expert_ids, w.weights)   # x [T_m, hidden]
                shared[m] = dense.shared_expert(w)                                        # overlaps the experts
        for m in range(num_mb):
            hs[m] = dense.moe_end(works[m], self._combine(pending[m], timing), shared[m])
        return hs

    def _graph_step(self, states, ids, groups, t_start) -> list[torch.Tensor]:
        """A decode-only step with the dense work replayed from graph segments, in the same
        ping-pong order as `_layers` (dispatch after the gate, shared expert while shards compute)."""
        graphs, transport = self.graphs, self.transport
        steps = graphs.begin([([states[k] for k in g], [ids[k] for k in g]) for g in groups])
        transport.ensure_ready()
        self._step_id += 1
        timing = StepTiming(num_tokens=len(states), num_micro_batches=len(steps))
        transport.begin_step(self._step_id, self.layer_ids, tuple(st.num_rows for st in steps))

        def layers() -> list[list[torch.Tensor]]:
            pending: list = [None] * len(steps)
            for layer in self.layer_ids:
                for m, st in enumerate(steps):
                    routed = None if pending[m] is None else self._combine(pending[m], timing)
                    x, expert_ids, weights = graphs.layer(st, layer, routed)
                    pending[m] = transport.dispatch(layer, m, x, expert_ids, weights)
                    graphs.shared(st, layer)                        # overlaps the experts
            return [graphs.finish(st, self._combine(pending[m], timing)) for m, st in enumerate(steps)]

        logits = self._in_step(layers)
        out: list[torch.Tensor | None] = [None] * len(states)
        for g, rows in zip(groups, logits):
            for k, row in zip(g, rows):
                out[k] = row
        return self._end(out, bool(torch.isfinite(torch.stack(out)).all()), timing, t_start)

    def _combine(self, pending, timing: StepTiming) -> torch.Tensor:
        t0 = time.perf_counter()
        routed = self.transport.combine(pending)
        timing.wait_s += time.perf_counter() - t0
        return routed

    # ---- whole sequences ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Fresh sequences from position 0: [B, S] (or [S]) -> logits [B, S, vocab]."""
        ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        states = [self.new_state() for _ in range(ids.shape[0])]
        chunks = []
        for i in range(0, ids.shape[1], self.prefill_chunk):
            outs = self.step(states, [row[i: i + self.prefill_chunk] for row in ids], all_logits=True)
            chunks.append(torch.stack(outs))
        return torch.cat(chunks, dim=1)
