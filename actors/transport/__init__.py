"""Transports: how a MoE layer's tokens reach the expert shards and their partial sums come back.

Owns: the Transport interface and the token-to-shard routing rule (this file); implementations
own their connection state: `collective.CollectiveTransport` (torch.distributed p2p, one Ray call
per step; the default), `ray_calls.RayTransport` (one Ray actor call per layer and shard; for
comparison and debugging), `local.LocalTransport` (in-process ExpertBanks; tests of the pipeline).

The router drives a transport once per step:

    transport.ensure_ready()                         # rebuild after a failure (may raise ShardError)
    transport.begin_step(step_id, layer_ids, micro_batch_tokens)
    for layer, micro-batch in pipeline order (layer-major, micro-batches in order):
        p = transport.dispatch(layer, mb, x [T, hidden], expert_ids [T, k], weights [T, k])   # async
        ...                                           # router computes other micro-batches meanwhile
        routed = transport.combine(p)                 # [T, hidden] sum over shards
    transport.end_step()       or, on any exception:  raise transport.abort_step(exc)

dispatch order must be exactly layer-major / micro-batch order: the collective shards follow it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Transport(Protocol):
    name: str

    def ensure_ready(self) -> None: ...

    def begin_step(self, step_id: int, layer_ids: tuple[int, ...], micro_batch_tokens: tuple[int, ...]) -> None: ...

    def dispatch(self, layer_id: int, micro_batch_id: int, x: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> object: ...

    def combine(self, pending: object) -> torch.Tensor: ...

    def end_step(self) -> None: ...

    def abort_step(self, exc: BaseException) -> BaseException: ...

    def step_error(self) -> BaseException | None:
        """Asked when a step's logits are not finite: the error of a shard that raised during the
        step (it answered NaN rows to keep the lockstep), else None."""
        ...

    def close(self) -> None: ...


class StatelessStepMixin:
    """Step hooks for transports that keep no per-step state (every call completes in place)."""

    def end_step(self) -> None:
        pass

    def abort_step(self, exc: BaseException) -> BaseException:
        return exc

    def step_error(self) -> BaseException | None:
        return None   # a shard's exception was already raised in combine()

    def close(self) -> None:
        pass


def shard_rows(expert_ids: torch.Tensor, owner: torch.Tensor, num_shards: int) -> list[torch.Tensor]:
    """Token rows each shard must see: expert_ids [T, k], owner [E] (expert -> shard) -> [n_s] int64
    per shard, ascending. A token goes to a shard once, however many of its k experts live there;
    the shard's ExpertBank skips the ids it does not hold."""
    shard_of = owner[expert_ids]                                                  # [T, k]
    return [(shard_of == s).any(dim=1).nonzero().squeeze(1) for s in range(num_shards)]
