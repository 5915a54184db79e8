"""KVCacheConfig: the KV service's options, validated (service.py builds the tiers from it).

Owns nothing at runtime: a frozen dataclass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvcache import fp8
from kvcache.keys import validate_block_tokens


@dataclass(frozen=True)
class KVCacheConfig:
    block_tokens: int = 128              # tokens per block record; a multiple of 128
    checkpoint_tokens: int = 4096        # periodic window checkpoint interval
    span_tokens: int | None = None       # tokens per span record; None: checkpoint_tokens if a
                                         # multiple of block_tokens, else block_tokens (no spans)
    device_bytes: int = 1 << 30
    redis_bytes: int = 4 << 30
    disk_bytes: int = 64 << 30
    redis_prefix: str = "dsv4kv:"
    redis_retry_s: float = 5.0           # while Redis is down, probe it this often
    redis_timeout_s: float = 2.0
    disk_segment_bytes: int = 256 << 20
    is_fp8: bool = False                 # store latents as FP8 e4m3 (+ per-64 scales)
    rope_dim: int = 64                   # trailing dims kept as computed under FP8
    fp8_suffixes: tuple[str, ...] = fp8.DEFAULT_SUFFIXES
    checksum: str = "colsum64"           # or "rowcol64", "crc32", "blake2b" (see checksum.py)
    max_pending_bytes: int = 1 << 30     # background writes beyond this are dropped
    restore_threads: int | None = None   # threads of a restore's verify + copy (byte kernels); None:
                                         # min(4, the CPUs this process may run on)

    def validate(self) -> None:
        validate_block_tokens(self.block_tokens)
        if self.checkpoint_tokens <= 0:
            raise ValueError(f"checkpoint_tokens must be positive, got {self.checkpoint_tokens}")
        if self.rope_dim < 0:
            raise ValueError(f"rope_dim must be >= 0, got {self.rope_dim}")
        if self.restore_threads is not None and (type(self.restore_threads) is not int or self.restore_threads < 1):
            raise ValueError(f"restore_threads must be a positive int or None, got {self.restore_threads!r}")
        if self.span_tokens is not None and (self.span_tokens <= 0 or self.span_tokens % self.block_tokens):
            raise ValueError(f"span_tokens must be a positive multiple of block_tokens, got {self.span_tokens}")

    @property
    def num_restore_threads(self) -> int:
        """`restore_threads`, or its default: min(4, the CPUs this process may run on)."""
        if self.restore_threads is not None:
            return self.restore_threads
        try:
            num_cpus = len(os.sched_getaffinity(0))
        except AttributeError:   # (not on Linux)
            num_cpus = os.cpu_count() or 1
        return max(1, min(4, num_cpus))

    @property
    def span_blocks(self) -> int:
        """Blocks per span record (1: every block is its own record)."""
        if self.span_tokens is not None:
            return self.span_tokens // self.block_tokens
        if self.checkpoint_tokens % self.block_tokens == 0:
            return self.checkpoint_tokens // self.block_tokens
        return 1
