"""Placement: which experts each shard holds, and where the shards run (a Ray placement group).

Owns: the expert-to-shard assignment rules and the placement group's lifetime (created by
`place_shards`, removed by the handle's shutdown). Nothing here talks to a shard.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def split_experts(num_experts: int, num_shards: int) -> list[list[int]]:
    """Contiguous ranges [lo, hi), sizes differing by at most one (7 over 3 -> 3, 2, 2)."""
    if num_shards < 1 or num_shards > num_experts:
        raise ValueError(f"num_expert_shards must be in [1, {num_experts}] (one expert at least each), "
                         f"got {num_shards}")
    base, extra = divmod(num_experts, num_shards)
    out, lo = [], 0
    for s in range(num_shards):
        hi = lo + base + (1 if s < extra else 0)
        out.append(list(range(lo, hi)))
        lo = hi
    return out


def check_assignment(assignment: list[list[int]], num_experts: int) -> list[list[int]]:
    """Any partition of range(num_experts) into non-empty shards (each expert exactly once)."""
    seen: dict[int, int] = {}
    for s, ids in enumerate(assignment):
        if not ids:
            raise ValueError(f"expert_assignment: shard {s} holds no expert")
        for e in ids:
            if not isinstance(e, int) or not 0 <= e < num_experts:
                raise ValueError(f"expert_assignment: shard {s} lists expert {e!r}, not in [0, {num_experts})")
            if e in seen:
                raise ValueError(f"expert_assignment: expert {e} is on shards {seen[e]} and {s}")
            seen[e] = s
    missing = sorted(set(range(num_experts)) - set(seen))
    if missing:
        raise ValueError(f"expert_assignment: experts {missing} are on no shard")
    return [sorted(ids) for ids in assignment]


def owner_table(assignment: list[list[int]], num_experts: int) -> list[int]:
    """expert id -> shard id."""
    owner = [-1] * num_experts
    for s, ids in enumerate(assignment):
        for e in ids:
            owner[e] = s
    return owner


@dataclass
class Placement:
    group: PlacementGroup
    bundles: list[dict]
    strategy: str

    def remove(self) -> None:
        try:
            remove_placement_group(self.group)
        except Exception:  # already gone (cluster shut down)
            pass


def place_shards(num_shards: int, strategy: str = "PACK", cpus_per_shard: float = 1.0,
                 gpus_per_shard: float = 0.0, shard_resources: list[dict] | None = None,
                 timeout_s: float = 60.0) -> Placement:
    """One bundle per shard ({"CPU": c, "GPU": g} + shard_resources[k]); waits until it is placed.

    shard_resources pins shards to nodes through custom resources (e.g. [{"node_a": 1}, {"node_b": 1}])."""
    strategy = strategy.upper()
    if strategy not in STRATEGIES:
        raise ValueError(f"placement_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if shard_resources is not None and len(shard_resources) != num_shards:
        raise ValueError(f"shard_resources has {len(shard_resources)} entries for {num_shards} shards")
    bundles = []
    for k in range(num_shards):
        b: dict = {"CPU": cpus_per_shard}
        if gpus_per_shard:
            b["GPU"] = gpus_per_shard
        b.update((shard_resources or [{}] * num_shards)[k])
        bundles.append(b)
    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(f"cannot place {num_shards} expert shards ({strategy}, bundles {bundles}) within "
                           f"{timeout_s:.0f} s: the cluster lacks the resources "
                           f"(available: {ray.available_resources()})")
    return Placement(group, bundles, strategy)


def free_port(host: str = "") -> int:
    """A port free right now on this host (the TCPStore master binds it right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    return ray.util.get_node_ip_address()
