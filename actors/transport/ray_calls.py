"""RayTransport: one Ray actor call per (layer, micro-batch, shard); tensors through the object store.

Owns: nothing but the shard handles it calls. Kept for comparison and debugging: every layer
pays a Ray round trip (~0.6 ms here, ~0.85 ms on an H200 host) plus pickling, which is what the
collective transport removes. Failure handling is Ray's: a dead actor's call raises
RayActorError at once (mapped to ShardError); Ray restarts the actor, and calls made while it
restarts wait for it.
"""

from __future__ import annotations

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..messages import LayerRequest, ShardError
from ..shard import wait_ready
from . import StatelessStepMixin, shard_rows


class RayTransport(StatelessStepMixin):
    name = "ray"

    def __init__(self, shards: list, owner: list[int], hidden: int, dtype: torch.dtype, device: torch.device,
                 timeout_s: float = 20.0, restart_timeout_s: float = 120.0):
        self.shards = shards
        self.owner = torch.tensor(owner, dtype=torch.int64, device=device)
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.timeout_s, self.restart_timeout_s = timeout_s, restart_timeout_s
        self.step_id = -1
        self.is_broken = False
        self.compute_s = 0.0      # sum over combines of the slowest shard's compute time (benchmarks)

    def ensure_ready(self) -> None:
        if not self.is_broken:
            return
        wait_ready(self.shards, self.restart_timeout_s)   # a restarted shard has reloaded its experts
        self.is_broken = False

    def begin_step(self, step_id: int, layer_ids: tuple[int, ...], micro_batch_tokens: tuple[int, ...]) -> None:
        self.step_id = step_id

    def dispatch(self, layer_id, micro_batch_id, x, expert_ids, weights):
        rows = shard_rows(expert_ids, self.owner, len(self.shards))
        calls = []
        for s, r in enumerate(rows):
            if r.numel():
                req = LayerRequest(layer_id, x[r].cpu(), expert_ids[r].cpu(), weights[r].cpu())
                calls.append((s, r.to(self.device), self.shards[s].compute.remote(req)))
        return x.shape[0], calls

    def combine(self, pending) -> torch.Tensor:
        num_tokens, calls = pending
        out = torch.zeros(num_tokens, self.hidden, dtype=self.dtype, device=self.device)
        slowest = 0.0
        for s, rows, ref in calls:
            try:
                result = ray.get(ref, timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError, RayTaskError) as e:
                self.is_broken = True
                what = "did not answer within %.0f s" % self.timeout_s if isinstance(e, GetTimeoutError) else "failed"
                raise ShardError(f"expert shard {s} {what} in step {self.step_id} (ray transport): {e}",
                                 (s,), self.step_id) from e
            out.index_add_(0, rows, result.out.to(self.device))
            slowest = max(slowest, result.compute_s)
        self.compute_s += slowest
        return out
