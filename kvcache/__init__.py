"""Tiered cache of DeepSeek-V4 compressed KV state: device -> Redis -> Arrow IPC files.

Public API (see service.py): `KVCacheService` (``KVCacheService.for_model_config(cfg,
fingerprint, ...)`` builds one for a model config), `KVCacheConfig`, `LookupResult`,
`CommitResult`, `ServiceStats`, `TierStats`, `RecordError`, and `entry_rates` (per-tensor entry
rates from the per-layer compression rates).

Modules: service (the API; blocks, span records and checkpoints), config (its options), layout (how a state dict is cut
into records), keys (chained prefix hashes), record + checksum (the byte format), hierarchy and
the tiers (device_tier, redis_tier, disk_tier + segments, lru, writer), fp8 (optional storage
precision), memory (pooled, warm memory for restored state), resume (the engine's side of the protocol
for one in-process model), synthetic and footprint (layouts without a model: tests, benchmarks).
"""

from kvcache.layout import checkpoint_positions, entry_rates
from kvcache.record import FORMAT_VERSION, Record, RecordError
from kvcache.config import KVCacheConfig
from kvcache.service import KVCacheService
from kvcache.stats import CommitResult, LookupResult, ServiceStats, TierStats

__all__ = [
    "FORMAT_VERSION", "CommitResult", "KVCacheConfig", "KVCacheService", "LookupResult", "Record",
    "RecordError", "ServiceStats", "TierStats", "checkpoint_positions", "entry_rates",
]
