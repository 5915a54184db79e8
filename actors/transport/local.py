"""LocalTransport: the shards' ExpertBanks in the router's own process (no Ray, no sockets).

Owns: references to the banks. Lets tests check the router's pipeline and the routing split
(several banks, uneven) against the single-process model in milliseconds.
"""

from __future__ import annotations

import torch

from model_shards import ExpertBank

from . import StatelessStepMixin, shard_rows


class LocalTransport(StatelessStepMixin):
    name = "local"

    def __init__(self, banks: list[ExpertBank], owner: list[int]):
        self.banks = banks
        self.owner = torch.tensor(owner, dtype=torch.int64)

    def ensure_ready(self) -> None:
        pass

    def begin_step(self, step_id: int, layer_ids: tuple[int, ...], micro_batch_tokens: tuple[int, ...]) -> None:
        pass

    def dispatch(self, layer_id, micro_batch_id, x, expert_ids, weights):
        rows = shard_rows(expert_ids, self.owner.to(expert_ids.device), len(self.banks))
        return x.shape[0], [(r, bank(layer_id, x[r], expert_ids[r], weights[r])) for r, bank in zip(rows, self.banks)]

    def combine(self, pending) -> torch.Tensor:
        num_tokens, parts = pending
        out = None
        for rows, part in parts:
            if out is None:
                out = part.new_zeros(num_tokens, part.shape[1])
            out.index_add_(0, rows, part)
        return out
