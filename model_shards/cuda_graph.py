"""DecodeGraphs: decode steps replayed from CUDA graphs (a transform in the gpt-fast sense: the
model's math stays in the plain modules; this only changes how a decode step is launched).

Owns: the captured graphs of one DeepseekV4 and, per graph, its static inputs (the step's index
tensor and token ids) and output (logits). Sequence state stays in the model's StatePool.

A decode step of the eager model costs ~1,000 kernel launches and their Python; the GPU does a
few ms of work in a 35-50 ms step. A graph replays the same kernels with no host work, so the
step is bound by the GPU. What makes a step capturable (all done in model_shards, not here):
- every index is computed on the host by `DecodePlan` and reaches the device in ONE copy into the
  graph's static buffer; masks and views are derived from it inside the graph;
- shapes and branches depend only on the graph's key: rows padded to a batch bucket (padding rows
  use the pool's pad slot), page tables padded to a width bucket per compression rate, and every
  row pools a compressor window, with the rows that complete none writing to a scratch page;
- the step only writes pool buffers; the states' counters advance on the host after the replay.
A graph holds the pool buffers' addresses: when the pool grows (`StatePool.generation`) every graph
is dropped and recaptured on demand, so `reserve()` the capacity you serve with.

`is_captured=False` runs the identical fixed-shape step eagerly (on CPU in tests: same indices,
padding and masks, without the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import DecodeMeta, DecodePlan, StepBatch
from .state import SequenceState

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


@dataclass
class StepInputs:
    """A graph's static inputs: the step's DecodePlan.indices and token ids, on the device."""
    indices: torch.Tensor                      # [num indices] int64
    token_ids: torch.Tensor                    # [B] int64
    staging: torch.Tensor | None = None        # pinned host [num indices + B]: copies that do not
    copied: "torch.cuda.Event | None" = None   # wait for the GPU; `copied` guards its reuse

    @classmethod
    def make(cls, plan: DecodePlan, device: torch.device, is_pinned: bool) -> "StepInputs":
        inputs = cls(plan.indices.to(device), torch.zeros(plan.num_rows, dtype=torch.int64, device=device))
        if is_pinned:
            inputs.staging = torch.empty(plan.indices.numel() + plan.num_rows, dtype=torch.int64, pin_memory=True)
            inputs.copied = torch.cuda.Event()
            inputs.copied.record()
        return inputs

    def load(self, indices: torch.Tensor, token_ids: torch.Tensor) -> None:
        n, B = indices.numel(), token_ids.numel()
        if self.staging is None:       # eager fixed-shape steps (no graph)
            self.indices.copy_(indices)
            self.token_ids[:B].copy_(token_ids)
            return
        self.copied.synchronize()      # the previous step's copy out of `staging` is done
        self.staging[:n].copy_(indices)
        self.staging[n: n + B].copy_(token_ids)
        self.indices.copy_(self.staging[:n], non_blocking=True)
        self.token_ids[:B].copy_(self.staging[n: n + B], non_blocking=True)
        self.copied.record()


def can_plan_fixed_step(dense, states: list[SequenceState], token_ids: list[torch.Tensor], max_batch: int) -> bool:
    """Decode only (one new token each), every state in `dense`'s pool, 1..max_batch of them."""
    pool = dense.state_pool
    return (0 < len(states) <= max_batch and pool is not None
            and all(s.pool is pool for s in states) and all(t.numel() == 1 for t in token_ids))


def plan_fixed_step(dense, states: list[SequenceState], token_ids: list[torch.Tensor],
                    buckets: tuple[int, ...]) -> tuple[DecodePlan, torch.Tensor, tuple]:
    """The step's fixed-shape DecodePlan (rows and page tables bucketed), its token ids [n] and the
    graph key (num_rows, ((rate, pages), ...)). Checks the ids; may grow the pool."""
    cfg = dense.cfg
    ids = torch.cat([t.reshape(1).to(torch.int64) for t in token_ids])
    if int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"token id out of range [0, {cfg.vocab_size})")
    pool = dense.state_pool
    pool.pad_slot_id, [pool.scratch_page_id(r) for r in pool.rates]   # reserved before any capture
    num_rows = next(b for b in buckets if b >= len(states))
    P = pool.page_size
    num_pages = {r: _page_bucket(-(-max((s.num_tokens + 1) // r for s in states) // P)) for r in pool.rates}
    plan = DecodePlan.build(states, cfg.sliding_window, num_rows, num_pages)
    return plan, ids, (num_rows, tuple(sorted(num_pages.items())))


def reserve_pool(dense, num_seqs: int, max_tokens: int) -> None:
    """Grow `dense`'s pool now for `num_seqs` sequences of up to `max_tokens` tokens, so that
    serving never re-allocates it (which would drop every graph). Costs the memory up front."""
    if dense.state_pool is None:
        dense.new_state()           # makes the pool
    pool = dense.state_pool
    per_seq = {r: -(-(max_tokens // r) // pool.page_size) for r in pool.rates}
    pool.reserve(num_seqs + 2, {r: num_seqs * n + 2 for r, n in per_seq.items()})   # + pad / zero, scratch


def warm_up_keys(dense, buckets: tuple[int, ...], num_entries: int) -> list[tuple[int, dict[int, int]]]:
    """(rows, page-table width per rate) of the fixed-shape steps worth compiling at load: the 1-row
    and the 2-row buckets, each with no compressed entries and with room for `num_entries` per
    rate (e.g. the indexer's top-k + 1, the step kind that selects entries). Makes the pool and
    reserves its pad slot and scratch pages first (so no capture is dropped by that growth)."""
    if dense.state_pool is None:
        dense.new_state()                 # makes the pool
    pool = dense.state_pool
    pool.pad_slot_id, [pool.scratch_page_id(r) for r in pool.rates]
    wide = {r: _page_bucket(-(-num_entries // pool.page_size)) for r in pool.rates}
    rows = sorted({next(b for b in buckets if b >= n) for n in (1, 2) if n <= buckets[-1]})
    return [(n, pages) for n in rows for pages in ({r: 0 for r in pool.rates}, wide)]


@dataclass
class _Graph:
    inputs: StepInputs
    logits: torch.Tensor               # [B, vocab] output of the last replay
    graph: "torch.cuda.CUDAGraph | None"


class DecodeGraphs:
    """Decode-only steps of one DeepseekV4 (every expert local), one graph per key (see the module
    doc). `step` is `model.step(..., all_logits=False)` for 1..max_batch pooled states."""

    def __init__(self, model, max_batch: int = 256, is_captured: bool | None = None,
                 batch_buckets: tuple[int, ...] = BATCH_BUCKETS, is_compiled: bool = False):
        self.model = model
        self.buckets = tuple(b for b in batch_buckets if b < max_batch) + (max_batch,)
        if is_captured is None:   # CUDA, and experts that run without host syncs (bf16 on sm90+)
            is_captured = model.experts.is_sync_free(model.dense.device, model.dense.dtype)
        self.is_captured = is_captured
        self.is_compiled = is_compiled   # torch.compile the step (before capturing it; experimental)
        self._compiled_forward = None
        self._graphs: dict[tuple, _Graph] = {}
        self._generation = -1            # pool generation the graphs were captured at
        self._mempool = None
        self.num_captures = 0

    def reserve(self, num_seqs: int, max_tokens: int) -> None:
        """See `reserve_pool`."""
        reserve_pool(self.model.dense, num_seqs, max_tokens)

    # ---- the step ---------------------------------------------------------------------------
    def can_step(self, states: list[SequenceState], token_ids: list[torch.Tensor]) -> bool:
        return can_plan_fixed_step(self.model.dense, states, token_ids, self.buckets[-1])

    @torch.no_grad()
    def step(self, states: list[SequenceState], token_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Like `model.step(states, token_ids, all_logits=False)`: per sequence the logits [vocab] of
        its new token. They are views of the graph's output, valid until its next replay."""
        if not self.can_step(states, token_ids):
            raise ValueError("DecodeGraphs.step takes one new token for each of 1..max_batch pooled states")
        plan, ids, key = plan_fixed_step(self.model.dense, states, token_ids, self.buckets)
        self._drop_stale_graphs()
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(plan.num_rows, plan.num_pages)
        g.inputs.load(plan.indices, ids)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.logits = self._step_fn()(g.inputs.indices, g.inputs.token_ids, plan)
        plan.advance(states)
        for s in states:
            s.num_tokens += 1
        return list(g.logits[: len(states)])

    def warm_up(self, num_entries: int) -> None:
        """Capture the keys of `warm_up_keys` now, so that whatever their shapes compile
        (model_shards.regions: each kind of step once; sizes then stay symbolic) is compiled at
        load, not in the middle of serving."""
        keys = warm_up_keys(self.model.dense, self.buckets, num_entries)
        self._drop_stale_graphs()
        for rows, pages in keys:
            key = (rows, tuple(sorted(pages.items())))
            if key not in self._graphs:
                self._graphs[key] = self._capture(rows, pages)

    def _drop_stale_graphs(self) -> None:
        pool = self.model.dense.state_pool
        if pool.generation != self._generation:
            self._graphs.clear()                  # buffers moved: every captured address is stale
            self._mempool = None                  # (its memory went with the graphs; a new pool)
            self._generation = pool.generation

    # ---- capture ----------------------------------------------------------------------------
    def _forward(self, indices: torch.Tensor, token_ids: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        """The fixed-shape step from its static inputs: device work only."""
        dense = self.model.dense
        meta = DecodeMeta.from_indices(plan, indices, dense.device)
        batch = StepBatch.fixed_decode(token_ids, meta)
        h = self.model.layers_step(dense.embed_step(batch), batch)
        return dense.head(dense.final_hidden(h))                                 # [B, vocab]

    def _step_fn(self):
        """The step function: `_forward`, or (`is_compiled`) it torch.compile'd (one per key)."""
        if not self.is_compiled:
            return self._forward
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self._forward, dynamic=False)
        return self._compiled_forward

    def _capture(self, num_rows: int, num_pages: dict[int, int]) -> _Graph:
        """A graph for (num_rows, num_pages), recorded from an all-padding step so that warm-up
        runs write only the pad slot and scratch pages."""
        dense = self.model.dense
        plan = DecodePlan.build([], self.model.config.sliding_window, num_rows, num_pages, pool=dense.state_pool)
        inputs = StepInputs.make(plan, dense.device, self.is_captured)
        if not self.is_captured:
            return _Graph(inputs, torch.empty(0), None)
        forward = self._step_fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):           # warm-up: compile, allocate, build fused weights
            for _ in range(2):
                forward(inputs.indices, inputs.token_ids, plan)
        torch.cuda.current_stream().wait_stream(stream)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = forward(inputs.indices, inputs.token_ids, plan)
        self.num_captures += 1
        return _Graph(inputs, logits, graph)


def _page_bucket(num_pages: int) -> int:
    """Page-table width for `num_pages` needed: 0, or the next power of two (few graphs, < 2x reads)."""
    return 0 if num_pages == 0 else 1 << (num_pages - 1).bit_length()
