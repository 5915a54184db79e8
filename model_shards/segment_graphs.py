"""SegmentGraphs: the expert-parallel router's decode step as CUDA-graph segments around the
routed experts (the experts live in other processes, so the step cannot be one graph).

Owns: per (micro-batch, batch bucket, page-width bucket) a set of graphs and their static
memory: the inputs (StepInputs), the routed input of each layer (`routed`, where the combine
result is copied), and what flows between segments (the residual streams, the MoE work, the
shared expert's output). Sequence state stays in the DenseModel's StatePool.

A step of one micro-batch, L layers, replays 2L + 1 graphs in this order:

    layer(0)   = embed + attention(0) + gate(0)                  -> x, expert ids, weights of layer 0
    shared(0)  = shared expert(0)       (after the dispatch: it overlaps the shards' compute)
    layer(i)   = moe_end(i-1, routed) + attention(i) + gate(i)   i = 1..L-1
    shared(i)
    final      = moe_end(L-1, routed) + head                     -> logits
with the caller's dispatch after layer(i) and combine (copied into `routed`) before layer(i+1) /
final. The math, padding and fixed shapes are DecodeGraphs' (cuda_graph.py): only the cut points
differ. Micro-batches interleave their segments, so each set has its own memory pool (a pool is
only safe for graphs replayed in the order they were captured). `is_captured=False` runs the
same segments eagerly (CPU tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .batch import DecodeMeta, DecodePlan, StepBatch
from .cuda_graph import (BATCH_BUCKETS, StepInputs, can_plan_fixed_step, plan_fixed_step, reserve_pool,
                         warm_up_keys)
from .state import SequenceState


@dataclass
class _Flow:
    """What segments hand each other (their outputs live in the set's graph memory)."""
    batch: StepBatch | None = None
    h: torch.Tensor | None = None            # [B, hc, hidden]
    work: object = None                      # dense.MoEWork of the current layer
    shared: torch.Tensor | None = None       # [B, hidden]
    logits: torch.Tensor | None = None       # [B, vocab]
    keep: list = field(default_factory=list)   # every segment's outputs, alive as long as the set


@dataclass
class _SegmentSet:
    inputs: StepInputs
    routed: torch.Tensor                     # [B, hidden] static: the combine result of the last layer
    flow: _Flow
    plan: DecodePlan                         # the plan the set was made with (host facts only)
    graphs: dict[tuple, "torch.cuda.CUDAGraph"] = field(default_factory=dict)   # ("layer", i) | ("shared", i) | ("final",)
    outputs: dict[tuple, object] = field(default_factory=dict)                  # segment -> what it returned


@dataclass
class SegmentStep:
    """One micro-batch's step in flight: its set, its real row count, the host plan."""
    segments: _SegmentSet
    states: list[SequenceState]
    plan: DecodePlan
    num_rows: int


class SegmentGraphs:
    def __init__(self, dense, max_batch: int = 256, is_captured: bool | None = None,
                 batch_buckets: tuple[int, ...] = BATCH_BUCKETS):
        self.dense = dense
        self.buckets = tuple(b for b in batch_buckets if b < max_batch) + (max_batch,)
        self.is_captured = dense.device.type == "cuda" if is_captured is None else is_captured
        self._sets: dict[tuple, _SegmentSet] = {}
        self._generation = -1
        self.num_captures = 0

    def reserve(self, num_seqs: int, max_tokens: int) -> None:
        reserve_pool(self.dense, num_seqs, max_tokens)

    def warm_up(self, num_micro_batches: int, num_entries: int) -> None:
        """Make (capture) the sets of `cuda_graph.warm_up_keys` for every micro-batch now: what
        their segments compile is compiled at load, not in the middle of serving."""
        keys = warm_up_keys(self.dense, self.buckets, num_entries)
        self._drop_stale_sets()
        for m in range(num_micro_batches):
            for rows, pages in keys:
                key = (m, rows, tuple(sorted(pages.items())))
                if key not in self._sets:
                    self._sets[key] = self._make_set(rows, pages)

    def can_step(self, states: list[SequenceState], token_ids: list[torch.Tensor]) -> bool:
        return can_plan_fixed_step(self.dense, states, token_ids, self.buckets[-1])

    # ---- a step, segment by segment ----------------------------------------------------------
    def begin(self, micro_batches: list[tuple[list[SequenceState], list[torch.Tensor]]]) -> list[SegmentStep]:
        """Start a step of every micro-batch ((states, token ids) each; micro-batch m uses set m).
        All plans are built first: building one may grow the pool, which drops every set, and no
        set may be dropped once a micro-batch's step uses it."""
        if not all(self.can_step(states, ids) for states, ids in micro_batches):
            raise ValueError("SegmentGraphs.begin takes one new token for each of 1..max_batch pooled states")
        pool = self.dense.state_pool
        plans = [plan_fixed_step(self.dense, states, ids, self.buckets) for states, ids in micro_batches]
        self._drop_stale_sets()
        steps = []
        for m, ((states, _), (plan, ids, key)) in enumerate(zip(micro_batches, plans)):
            seg = self._sets.get((m, *key))
            if seg is None:
                seg = self._sets[(m, *key)] = self._make_set(plan.num_rows, plan.num_pages)
            seg.inputs.load(plan.indices, ids)
            steps.append(SegmentStep(seg, states, plan, len(states)))
        if pool.generation != self._generation:   # capturing a set reserved the pad slot / scratch pages
            raise RuntimeError("the StatePool grew while graph sets were made; reserve() it before serving")
        return steps

    def _drop_stale_sets(self) -> None:
        pool = self.dense.state_pool
        if pool.generation != self._generation:
            self._sets.clear()            # buffers moved: every captured address is stale
            self._generation = pool.generation

    def layer(self, step: SegmentStep, layer_id: int, routed: torch.Tensor | None):
        """Replay layer(layer_id) after copying the previous layer's routed output [n, hidden] in;
        returns (x [n, hidden], expert_ids [n, k], weights [n, k]) of the real rows to dispatch."""
        seg = step.segments
        if layer_id > 0:
            seg.routed[: step.num_rows].copy_(routed)
        work = self._run(seg, ("layer", layer_id), step.plan)
        n = step.num_rows
        return work.x[:n], work.expert_ids[:n], work.weights[:n]

    def shared(self, step: SegmentStep, layer_id: int) -> None:
        self._run(step.segments, ("shared", layer_id), step.plan)

    def finish(self, step: SegmentStep, routed: torch.Tensor) -> list[torch.Tensor]:
        """Replay the final segment; per sequence its logits [vocab] (views, valid until this set's
        next step). The states advance here."""
        seg = step.segments
        seg.routed[: step.num_rows].copy_(routed)
        logits = self._run(seg, ("final",), step.plan)
        step.plan.advance(step.states)
        for s in step.states:
            s.num_tokens += 1
        return list(logits[: step.num_rows])

    # ---- segments ----------------------------------------------------------------------------
    def _segment(self, name: tuple, seg: _SegmentSet, plan: DecodePlan):
        """Run one segment's device work on the set's flow (what a graph captures)."""
        dense, flow = self.dense, seg.flow
        if name[0] == "layer":
            i = name[1]
            if i == 0:
                meta = DecodeMeta.from_indices(plan, seg.inputs.indices, dense.device)
                flow.batch = StepBatch.fixed_decode(seg.inputs.token_ids, meta)
                flow.h = dense.embed_step(flow.batch)
            else:
                flow.h = dense.moe_end(flow.work, seg.routed, flow.shared)
            flow.h = dense.attention_sublayer(i, flow.h, flow.batch)
            flow.work = dense.moe_begin(i, flow.h, flow.batch)
            out = flow.work
        elif name[0] == "shared":
            flow.shared = out = dense.shared_expert(flow.work)
        else:
            h = dense.moe_end(flow.work, seg.routed, flow.shared)
            flow.logits = out = dense.head(dense.final_hidden(h))
        flow.keep.append(out)
        return out

    def _order(self) -> list[tuple]:
        names = []
        for i in range(self.dense.cfg.num_layers):
            names += [("layer", i), ("shared", i)]
        return names + [("final",)]

    def _run(self, seg: _SegmentSet, name: tuple, plan: DecodePlan):
        if not seg.graphs:                     # eager: the same segment, fresh tensors
            seg.flow.keep.clear()
            return self._segment(name, seg, plan)
        seg.graphs[name].replay()
        return seg.outputs[name]

    def _make_set(self, num_rows: int, num_pages: dict[int, int]) -> _SegmentSet:
        """Static memory and, on CUDA, every segment captured in replay order from an all-padding
        step (warm-up runs write only the pad slot and scratch pages)."""
        dense = self.dense
        plan = DecodePlan.build([], dense.cfg.sliding_window, num_rows, num_pages, pool=dense.state_pool)
        inputs = StepInputs.make(plan, dense.device, self.is_captured)
        seg = _SegmentSet(inputs, torch.zeros(num_rows, dense.cfg.hidden_size, dtype=dense.dtype, device=dense.device),
                          _Flow(), plan)
        if not self.is_captured:
            return seg
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):        # warm-up: compile, allocate, build fused weights
            for _ in range(2):
                for name in self._order():
                    self._segment(name, seg, plan)
        torch.cuda.current_stream().wait_stream(stream)
        seg.flow = _Flow()
        mempool = torch.cuda.graph_pool_handle()     # this set's own: its segments interleave with others'
        for name in self._order():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                seg.outputs[name] = self._segment(name, seg, plan)
            seg.graphs[name] = graph
        self.num_captures += 1
        return seg
