"""Helpers of the model-integration tests: token streams, services for a model, comparisons.

Owns no state. Decoding (`kvcache.resume.decode`) is teacher-forced (fixed tokens), so two runs
see the same inputs and their logits can be compared bitwise.
"""

from __future__ import annotations

import torch

from kvcache.service import KVCacheService


def random_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def service_for(model, **kwargs) -> KVCacheService:
    return KVCacheService.for_model_config(model.config, model.fingerprint, **kwargs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def stores(tier: str, redis_url: str, redis_prefix: str, disk_dir) -> dict:
    """Service keyword arguments that enable exactly one lower tier (none for "device")."""
    return {"device": {}, "redis": dict(redis_url=redis_url, redis_prefix=redis_prefix),
            "disk": dict(disk_dir=disk_dir)}[tier]


def corrupt_stored(tier: str, key: str, redis_client, redis_prefix: str, disk_dir) -> None:
    """Flip one bit in the middle of record `key` (inside its tensor bytes) where `tier` keeps it:
    the Redis value in place, or a corrupted later copy in the disk tier (a later copy wins)."""
    def corrupt(value) -> bytes:
        data = bytearray(bytes(value))
        data[len(data) // 2] ^= 0x10
        return bytes(data)

    if tier == "redis":
        redis_client.set(redis_prefix + key, corrupt(redis_client.get(redis_prefix + key)))
    else:
        from kvcache.disk_tier import DiskTier
        disk = DiskTier(disk_dir, budget_bytes=1 << 30)
        disk.put_many([(key, corrupt(disk.get_many([key])[0]))])
        disk.close()

