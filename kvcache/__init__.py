"""Tiered cache of DeepSeek-V4 compressed KV state: device -> Redis -> Arrow IPC files.

Public API (see service.py): `KVCacheService`, `KVCacheConfig`, `LookupResult`, `CommitResult`,
`ServiceStats`, `TierStats`, `RecordError`, and `entry_rates` (per-tensor entry rates from the
per-layer compression rates).
"""

from kvcache.layout import checkpoint_positions, entry_rates
from kvcache.record import FORMAT_VERSION, Record, RecordError
from kvcache.service import KVCacheConfig, KVCacheService
from kvcache.stats import CommitResult, LookupResult, ServiceStats, TierStats

__all__ = [
    "FORMAT_VERSION", "CommitResult", "KVCacheConfig", "KVCacheService", "LookupResult", "Record",
    "RecordError", "ServiceStats", "TierStats", "checkpoint_positions", "entry_rates",
]
