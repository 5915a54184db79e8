"""Transports: how a MoE layer's tokens reach the expert shards and their partial sums come back.

Owns: the Transport interface and the token-to-shard routing rules (this file: shard_rows, and
dense_shards / dispatch_rows for the collective's every-token shards); implementations
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

import math
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


DENSE_FRACTION = 0.75


def dense_shards(owner: list[int], k: int, num_shards: int) -> list[bool]:
    """Per shard: does a token reach it with probability >= DENSE_FRACTION when its k distinct
    experts are spread uniformly (1 - C(E - E_s, k) / C(E, k))? Such a shard is sent every token
    (see dispatch_rows)."""
    num_experts = len(owner)
    held = [sum(1 for o in owner if o == s) for s in range(num_shards)]
    return [1 - math.comb(num_experts - e, k) / math.comb(num_experts, k) >= DENSE_FRACTION for e in held]


def dispatch_rows(expert_ids: torch.Tensor, owner: torch.Tensor, dense: list[bool]) -> list[torch.Tensor | None]:
    """Like shard_rows, but None (every token) for the shards marked dense (dense_shards): they
    get the packed message itself and answer every row, zeros where a token has none of their
    experts. No per-layer routing ops (nor a host sync) for them: with 2 shards and 4 of 32
    experts a token misses a shard 5% of the time, so a gather would save ~5% of the bytes at the
    price of ~6 small ops per layer and shard on the router's critical path."""
    if all(dense):
        return [None] * len(dense)
    shard_of = owner[expert_ids]                                                   # [T, k]
    return [None if d else (shard_of == s).any(dim=1).nonzero().squeeze(1) for s, d in enumerate(dense)]
