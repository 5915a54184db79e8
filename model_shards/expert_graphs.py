"""ExpertGraphs: an ExpertBank's per-layer compute replayed from CUDA graphs (an expert shard's
decode steps; a transform in the gpt-fast sense: the math stays in ExpertBank).

Owns: per (rows bucket, slot) a static input `message` and output [bucket, hidden]; per (layer,
bucket, slot) the captured graph; one memory pool for all of them (each graph's own tensors are
temporaries, so any replay order is safe: nothing lives from one graph into another except the
static buffers above).

Why: a shard computes each MoE layer of a step as its own call, between receiving the layer's
tokens and sending their partial sums back. Eagerly that is ~25 launches and three compiled
pieces' dispatch per layer, a few hundred microseconds of host work per layer that the router
waits for on every token step; a replay is one launch.

What makes it capturable: the caller receives the dispatch message straight into `message(n,
slot)`, laid out as its `unpack` reads it, including the row count n in the message itself
(device memory). A step of n rows replays the graph of the smallest bucket >= n; the bucket's
rows past n are padding that `ExpertBank.forward(num_valid=...)` routes to no expert, so n is
read on the device and no shape depends on it. The padding rows hold whatever an earlier, larger
message left there (or the zeros they were made with): valid expert ids either way. Output rows
past n are undefined. `slot` separates micro-batches whose buffers are in use at the same time
(a shard sends micro-batch 0's output while micro-batch 1 computes). The next layer of the same
slot overwrites the output that the previous send reads: on a shard that is safe because its
replay waits for the next dispatch's recv, which it posts after that send, and NCCL runs one
peer pair's sends and recvs in issue order (actors/shard_step.py).

`is_captured=False` runs the same fixed-shape computation eagerly (CPU tests).
"""

from __future__ import annotations

from typing import Callable

import torch

from .cuda_graph import BATCH_BUCKETS
from .moe import ExpertBank

# (message [numel], bucket rows) -> (x [rows, hidden], expert_ids [rows, k], weights [rows, k],
# num_valid: 0-dim int64 device tensor)
Unpack = Callable[[torch.Tensor, int], tuple]


class ExpertGraphs:
    def __init__(self, bank: ExpertBank, message_numel: Callable[[int], int], unpack: Unpack,
                 dtype: torch.dtype, device: torch.device, max_rows: int = 256, is_captured: bool | None = None,
                 buckets: tuple[int, ...] = BATCH_BUCKETS):
        """`message_numel(rows)`: elements of a message of `rows` rows (dtype `dtype`)."""
        self.bank = bank
        self.message_numel, self.unpack = message_numel, unpack
        self.dtype, self.device = dtype, torch.device(device)
        self.buckets = tuple(b for b in buckets if b < max_rows) + (max_rows,)
        self.is_captured = self.device.type == "cuda" if is_captured is None else is_captured
        self._buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (bucket, slot) -> (message, out)
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}           # (layer, bucket, slot)
        self._mempool = None
        self.num_captures = 0

    def bucket(self, num_rows: int) -> int:
        """The smallest bucket of >= num_rows rows (ValueError past the largest: see can_run)."""
        for b in self.buckets:
            if b >= num_rows:
                return b
        raise ValueError(f"{num_rows} rows: more than the largest graph bucket ({self.buckets[-1]})")

    def can_run(self, num_rows: int) -> bool:
        """Steps of 1..max_rows rows, with a bank that routes them without a host sync."""
        if not 0 < num_rows <= self.buckets[-1]:
            return False
        if not self.is_captured:
            return True
        return self.bank.is_sync_free(self.device, self.dtype, self.bucket(num_rows))

    def message(self, num_rows: int, slot: int = 0) -> torch.Tensor:
        """The static input for a message of `num_rows` rows: receive (or write) it here, then run()."""
        return self._buffers_of(self.bucket(num_rows), slot)[0]

    @torch.no_grad()
    def run(self, layer_id: int, num_rows: int, slot: int = 0) -> torch.Tensor:
        """The bank's output for the message in message(num_rows, slot): [num_rows, hidden], a view
        of the static output (valid until the next run of the same bucket and slot)."""
        bucket = self.bucket(num_rows)
        message, out = self._buffers_of(bucket, slot)
        if not self.is_captured:
            out.copy_(self._compute(layer_id, message, bucket))
            return out[:num_rows]
        key = (layer_id, bucket, slot)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(layer_id, message, out, bucket)
        graph.replay()
        return out[:num_rows]

    @torch.no_grad()
    def warm_up(self, row_counts: tuple[int, ...] = (1, 8)) -> None:
        """Capture layer 0's graphs for these row counts (slot 0) now, so that what the bank's
        routing compiles (one-row and many-row variants) is compiled at load, not inside a step
        that a peer waits on. The other layers' graphs capture on first use (no compiling)."""
        if not self.is_captured:
            return
        for n in row_counts:
            bucket = self.bucket(n)
            if self.can_run(n) and (0, bucket, 0) not in self._graphs:
                message, out = self._buffers_of(bucket, 0)   # zeros: a header of 0 rows, all padding
                self._graphs[(0, bucket, 0)] = self._capture(0, message, out, bucket)

    def _buffers_of(self, bucket: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._buffers.get((bucket, slot))
        if buffers is None:
            hidden = self.bank.cfg.hidden_size
            buffers = self._buffers[(bucket, slot)] = (
                torch.zeros(self.message_numel(bucket), dtype=self.dtype, device=self.device),
                torch.zeros(bucket, hidden, dtype=self.dtype, device=self.device))
        return buffers

    def _compute(self, layer_id: int, message: torch.Tensor, bucket: int) -> torch.Tensor:
        x, expert_ids, weights, num_valid = self.unpack(message, bucket)
        return self.bank(layer_id, x, expert_ids, weights, num_valid)             # [bucket, hidden]

    def _capture(self, layer_id: int, message: torch.Tensor, out: torch.Tensor, bucket: int):
        """Warm up (compile the bank's pieces for this shape) on a side stream, then capture.
        thread_local capture: a process-group's watchdog thread may query its events meanwhile."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._compute(layer_id, message, bucket)
        torch.cuda.current_stream().wait_stream(stream)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            out.copy_(self._compute(layer_id, message, bucket))
        self.num_captures += 1
        return graph
