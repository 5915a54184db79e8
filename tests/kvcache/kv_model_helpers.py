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
