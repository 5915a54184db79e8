"""Replica choice for the Engine replicas behind one ingress replica.

Owns: this ingress replica's count of in-flight requests per Engine replica.

Rule: a request prefers the replica that most likely holds its prefix in its device KV tier:
rendezvous (highest-random-weight) hashing of an affinity key over the replicas, so every
ingress replica agrees and adding a replica moves only 1/N of the keys. The key is the
client's `prompt_cache_key` when given, else the prompt's first tokens up to the end of the
first user turn (capped at `affinity_tokens`): that prefix is shared by every turn of one
conversation, while different conversations with the same system prompt still spread. When the
preferred replica is busier than the least loaded one by more than `max_imbalance` in-flight
requests, the least loaded replica wins (the prefix then comes from Redis / disk, or is
recomputed).
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def affinity_key(prompt_token_ids: Sequence[int], end_token_id: int | None, max_tokens: int,
                 explicit_key: str | None = None) -> bytes:
    if explicit_key:
        return b"k" + explicit_key.encode("utf-8", "surrogatepass")
    ids = list(prompt_token_ids[:max_tokens])
    if end_token_id is not None and end_token_id in ids:
        ids = ids[: ids.index(end_token_id) + 1]
    return b"t" + b",".join(str(int(t)).encode() for t in ids)


class ReplicaRouter:
    def __init__(self, num_replicas: int, max_imbalance: int = 4):
        if num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        self.num_replicas = num_replicas
        self.max_imbalance = max_imbalance
        self.num_in_flight = [0] * num_replicas

    def preferred(self, key: bytes) -> int:
        def weight(i: int) -> bytes:
            return hashlib.blake2b(key + b"|" + str(i).encode(), digest_size=8).digest()
        return max(range(self.num_replicas), key=weight)

    def pick(self, key: bytes) -> int:
        best = self.preferred(key)
        least = min(range(self.num_replicas), key=lambda i: (self.num_in_flight[i], i))
        if self.num_in_flight[best] - self.num_in_flight[least] > self.max_imbalance:
            return least
        return best

    def started(self, replica: int, num_requests: int = 1) -> None:
        self.num_in_flight[replica] += num_requests

    def finished(self, replica: int, num_requests: int = 1) -> None:
        self.num_in_flight[replica] = max(0, self.num_in_flight[replica] - num_requests)
