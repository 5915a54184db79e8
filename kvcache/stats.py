"""Result and statistics types of the KV service.

Owns: `TierCounters`, the running per-tier counters (thread-safe); the rest are plain snapshot
dataclasses returned to callers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch


@dataclass
class TierStats:
    name: str
    is_available: bool
    num_hits: int           # records found in this tier (lookups of blocks and checkpoints)
    num_misses: int         # records asked of this tier and not found there
    num_corrupt: int        # records found corrupt / foreign / stale (deleted, counted as misses)
    num_records: int
    num_bytes: int          # bytes accounted to the tier now
    budget_bytes: int
    num_bytes_loaded: int
    load_seconds: float
    num_records_written: int
    num_bytes_written: int

    @property
    def load_bytes_per_s(self) -> float:
        return self.num_bytes_loaded / self.load_seconds if self.load_seconds > 0 else 0.0


class TierCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.num_hits = self.num_misses = self.num_corrupt = 0
        self.num_bytes_loaded = 0
        self.load_seconds = 0.0
        self.num_records_written = self.num_bytes_written = 0

    def add_reads(self, num_hits: int, num_misses: int, num_bytes: int, seconds: float) -> None:
        with self._lock:
            self.num_hits += num_hits
            self.num_misses += num_misses
            self.num_bytes_loaded += num_bytes
            self.load_seconds += seconds

    def add_corrupt(self, num_records: int) -> None:
        with self._lock:
            self.num_corrupt += num_records

    def add_writes(self, num_records: int, num_bytes: int) -> None:
        with self._lock:
            self.num_records_written += num_records
            self.num_bytes_written += num_bytes


@dataclass
class LookupResult:
    """The longest cached prefix of a lookup's tokens and the state to resume from.

    `state_tensors` is the exported state dict at position `num_cached_tokens` (fresh tensors
    the caller owns), or None when nothing usable is cached (`num_cached_tokens == 0`) and for
    a deferred hit (``lookup(..., is_deferred=True)``), whose `deferred` (restore.DeferredState)
    `load_into` verifies and copies into the engine's state.
    """

    num_cached_tokens: int
    state_tensors: dict[str, torch.Tensor] | None
    checkpoint_tier: str | None = None                 # tier that served the checkpoint
    num_blocks_by_tier: dict[str, int] = field(default_factory=dict)    # blocks used, per tier
    num_records_by_tier: dict[str, int] = field(default_factory=dict)   # records read (spans, blocks, checkpoint)
    num_bytes_by_tier: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0
    deferred: object | None = None                     # restore.DeferredState of a deferred hit

    @property
    def is_hit(self) -> bool:
        return self.num_cached_tokens > 0

    def load_into(self, state) -> bool:
        """Load this hit into `state` (a fresh engine state, ``SequenceState``-like). False when
        a record failed its checksum during a deferred load (it was deleted from its tier):
        `state` is then partly written and must be discarded."""
        if self.deferred is not None:
            return self.deferred.load_into(state)
        state.load(self.state_tensors)
        return True


@dataclass
class CommitResult:
    num_new_blocks: int        # blocks in new block / span records (records already on the device are skipped)
    num_checkpoints: int
    num_bytes: int             # bytes of the new records (as stored on the device)
    is_queued: bool            # lower-tier writes accepted by the background writer


@dataclass
class ServiceStats:
    tiers: dict[str, TierStats]
    num_lookups: int
    num_hit_lookups: int
    num_lookup_tokens: int
    num_cached_tokens: int
    num_commits: int
    num_pending_write_bytes: int
    num_dropped_writes: int
    num_failed_writes: int
