"""LocalTransport: the shards' ExpertBanks in the router's own process (no Ray, no sockets).

Owns: references to the banks and, with `expert_graphs`, one ExpertGraphs per bank. Lets tests
check the router's pipeline and the routing split (several banks, uneven) against the
single-process model in milliseconds. With `expert_graphs`, every bank gets every token of a
micro-batch as one packed message (the wire layout an every-token shard receives over NCCL) and
computes it the way such a shard does: one graph replay per layer (benchmarks/router_gpu.py,
the stand-in for a 2-GPU run on one GPU; `is_captured=False`: the same fixed-shape path eagerly,
for CPU tests). Steps a graph cannot take (more rows than its largest bucket, a bank that
would need a host sync) use the banks directly.
"""

from __future__ import annotations

import torch

from model_shards import ExpertBank
from model_shards.expert_graphs import ExpertGraphs

from . import StatelessStepMixin, shard_rows
from .wire import Wire


class LocalTransport(StatelessStepMixin):
    name = "local"

    def __init__(self, banks: list[ExpertBank], owner: list[int], expert_graphs: bool = False,
                 is_captured: bool | None = None, max_graph_rows: int = 256):
        self.banks = banks
        self.owner = torch.tensor(owner, dtype=torch.int64)
        self.graphs: list[ExpertGraphs] | None = None
        if expert_graphs:
            cfg, w13 = banks[0].cfg, banks[0].w13[0]
            self.wire = Wire(None, "nccl", w13.device, w13.dtype, cfg.hidden_size, cfg.num_experts_per_tok,
                             is_every_token=True)
            self.graphs = [ExpertGraphs(b, self.wire.message_numel, self.wire.unpack_message, w13.dtype, w13.device,
                                        max_graph_rows, is_captured) for b in banks]

    def ensure_ready(self) -> None:
        pass

    def begin_step(self, step_id: int, layer_ids: tuple[int, ...], micro_batch_tokens: tuple[int, ...]) -> None:
        pass

    def dispatch(self, layer_id, micro_batch_id, x, expert_ids, weights):
        n = x.shape[0]
        if self.graphs is not None and all(g.can_run(n) for g in self.graphs):
            # packed once into the first graph's input, copied into the others'; one replay each
            msg = self.wire.pack(x, expert_ids, weights, out=self.graphs[0].message(n, micro_batch_id))
            parts = []
            for g in self.graphs:
                buf = g.message(n, micro_batch_id)
                if buf.data_ptr() != msg.data_ptr():
                    buf[: msg.numel()].copy_(msg)
                parts.append((None, g.run(layer_id, n, micro_batch_id)))   # rows None: every token
            return n, parts
        rows = shard_rows(expert_ids, self.owner.to(expert_ids.device), len(self.banks))
        return n, [(r, bank(layer_id, x[r], expert_ids[r], weights[r])) for r, bank in zip(rows, self.banks)]

    def combine(self, pending) -> torch.Tensor:
        num_tokens, parts = pending
        out = None
        for rows, part in parts:
            if out is None:   # (a copy: a graph's output buffer is reused by its next replay)
                out = part.new_zeros(num_tokens, part.shape[1])
            if rows is None:
                out.add_(part)
            else:
                out.index_add_(0, rows, part)
        return out
