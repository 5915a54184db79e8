"""KVCacheService: the engine's API to the tiered cache of compressed KV state.

Owns: the tier hierarchy it builds from a `KVCacheConfig` (config.py: device, optional Redis,
optional disk) and the service-level counters. The engine passes whole exported state dicts (the model's
``state.export()``); this module turns them into records and back:

- `commit(token_ids, states, salt)`: the compressed entries of every full block up to the
  largest position, as span records of `span_tokens` (default `checkpoint_tokens`: one record
  per periodic checkpoint interval, aligned) plus single-block records for the blocks of each
  position's unfinished span; for every position, a window checkpoint; for each block holding
  checkpoints, an index record of their offsets.
- `lookup(token_ids, salt)`: the longest prefix ``P`` such that a checkpoint at ``P`` and all
  blocks before it are cached; returns the exact state dict at ``P`` (what ``state.export()``
  returned at ``P``), which the engine loads into a fresh state (``state.load(tensors)``) and then
  prefills ``token_ids[P:]``. Blocks come from span records where the lookup's tokens cover the
  whole span (a span is cut when ``P`` ends inside it), else from single-block records.

Why spans: a long context is then a few large records per lookup instead of one per 128
tokens, so the fixed cost of fetching, parsing and verifying a record is paid per
`span_tokens`. Every resume point stays reachable: periodic checkpoints fall on span ends, and
any other checkpoint (end of a prompt or response) also has single-block records for its
unfinished span, so a request that diverges inside that span still finds them. The price is
that those blocks can be stored twice (as singles and later inside their span).

Records are put in depth order (deepest first), so under LRU a sequence loses its tail before
its head and what remains is still a usable prefix.

The restore path (a lookup that hits): the token hashes are computed lazily (keys.py: per-block
work only for the index records of the last blocks); the first read fetches those index records
together with what a hit at the lookup's limit needs (its checkpoint, spans and blocks): one
read per tier, one MGET from Redis. Records are parsed when fetched; each one's checksum pass
runs right before its bytes are copied into the state (`TierStack.settle`), so they are read
from memory once; a record that fails it is deleted from its tier and asked for again (the
tiers below, or single blocks, or a shorter prefix). The state is one byte copy of the stored
tensors into pooled, warm memory (memory.py), or with ``is_deferred`` row blocks that the engine's
state copies once (assembly.py, restore.py). A deferred lookup asked again while no tier changed
replays its answer over the same bytes, still verified (restore_plan.py; `_plans`, owned here).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from kvcache import fp8, layout
from kvcache.config import KVCacheConfig
from kvcache.device_tier import DeviceTier
from kvcache.disk_tier import DiskTier
from kvcache.hierarchy import Hit, TierStack, index_record
from kvcache.keys import (
    GROUP_BLOCKS, ChainHashes, ChainMemo, block_key, checkpoint_key, index_key, span_key, token_array,
)
from kvcache.record import Record
from kvcache.redis_tier import RedisTier
from kvcache.assembly import CorruptRecord, StateAssembler
from kvcache.restore_plan import PlanTrace, RestorePlans, plan_key
from kvcache.stats import CommitResult, LookupResult, ServiceStats

log = logging.getLogger(__name__)
State = Mapping[str, torch.Tensor]
INDEX_CHUNK_BLOCKS = 64  # at most this many index records per step of a lookup, from the end backwards
MAX_SETTLE_ATTEMPTS = 8  # per checkpoint: each failed attempt deleted a corrupt record


class KVCacheService:
    def __init__(
        self,
        entry_rates: Mapping[str, int],
        fingerprint: str,
        *,
        redis_url: str | None = None,
        disk_dir: str | os.PathLike | None = None,
        config: KVCacheConfig | None = None,
        **overrides,
    ):
        """`entry_rates`: tokens per row of every ``*.entries`` tensor (``layout.entry_rates``
        or ``model_shards.entry_rates(config)``); `fingerprint`: identifies the model (config +
        weights); `overrides`: `KVCacheConfig` fields."""
        self.config = dataclasses.replace(config or KVCacheConfig(), **overrides)
        self.config.validate()
        self.entry_rates = dict(entry_rates)
        for name, rate in self.entry_rates.items():
            if rate <= 0 or self.config.block_tokens % rate:
                raise ValueError(f"{name!r}: rate {rate} must divide block_tokens {self.config.block_tokens}")
        self.fingerprint = fingerprint
        suffix = f"|fp8-e4m3-rope{self.config.rope_dim}" if self.config.is_fp8 else ""
        self.storage_fingerprint = fingerprint + suffix  # keys and records of FP8 storage differ
        tiers = [DeviceTier(self.config.device_bytes)]
        if redis_url:
            tiers.append(RedisTier(
                redis_url, budget_bytes=self.config.redis_bytes, prefix=self.config.redis_prefix,
                retry_interval_s=self.config.redis_retry_s, socket_timeout_s=self.config.redis_timeout_s,
            ))
        if disk_dir is not None:
            tiers.append(DiskTier(
                disk_dir, budget_bytes=self.config.disk_bytes, max_segment_bytes=self.config.disk_segment_bytes,
            ))
        self.stack = TierStack(tiers, self.storage_fingerprint, checksum=self.config.checksum,
                               max_pending_bytes=self.config.max_pending_bytes)
        self._assembler = StateAssembler(self.stack, self.entry_rates, self.config)
        self._plans = RestorePlans()  # deferred lookups' answers, replayed while the tiers are unchanged
        self._chain_memo = ChainMemo()  # chain hashes of the last token sequences looked up / committed
        self._lock = threading.Lock()
        self._num_lookups = self._num_hit_lookups = self._num_commits = 0
        self._num_lookup_tokens = self._num_cached_tokens = 0

    @classmethod
    def for_model_config(cls, model_config, fingerprint: str, **kwargs) -> KVCacheService:
        """A service for a model config (duck-typed `model_shards.ModelConfig`): its entry rates
        and, unless given, its rope width (`qk_rope_head_dim`, kept as computed under FP8)."""
        rates = layout.entry_rates([model_config.compress_rate(i) for i in range(model_config.num_layers)],
                                   csa_rate=model_config.csa_rate, index_rate=model_config.csa_rate)
        if "rope_dim" not in kwargs and "config" not in kwargs:
            kwargs["rope_dim"] = model_config.qk_rope_head_dim
        return cls(rates, fingerprint, **kwargs)

    # -- engine API ---------------------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int] | np.ndarray, salt: str | bytes | None = None, *,
               max_tokens: int | None = None, is_deferred: bool = False) -> LookupResult:
        """Longest cached prefix of `token_ids` (at most `max_tokens` tokens; an engine that
        needs logits for the last prompt token passes ``len(token_ids) - 1``).

        `is_deferred`: a hit holds no state dict but a `restore.DeferredState` that
        ``result.load_into(state)`` verifies and copies once, straight into the engine's state
        (see restore.py; FP8 storage is dequantized here, as without it)."""
        start = time.perf_counter()
        tokens = token_array(token_ids)
        limit = len(tokens) if max_tokens is None else max(0, min(int(max_tokens), len(tokens)))
        result = self._lookup(tokens, salt, limit, is_deferred) or LookupResult(0, None)
        result.load_seconds = time.perf_counter() - start
        with self._lock:
            self._num_lookups += 1
            self._num_hit_lookups += int(result.is_hit)
            self._num_lookup_tokens += limit
            self._num_cached_tokens += result.num_cached_tokens
        return result

    def _lookup(self, tokens: np.ndarray, salt, limit: int, is_deferred: bool = False) -> LookupResult | None:
        """Checkpoints are tried longest first; the index records that list them are read a
        chunk of blocks at a time from the end, so a long hit reads few of them. The first chunk
        ends at an anchor of the key chain (keys.py): a typical hit then hashes block by block
        only inside the last group of 32 blocks. The first read also fetches what a hit at
        `limit` needs (its checkpoint and the records of every block before it, see
        `_prefetch_keys`), so a typical hit reads each tier once (one MGET from Redis)."""
        block_tokens = self.config.block_tokens
        # hashes over all the tokens (lazily): a span that ends past `limit` can still serve its head
        hashes = ChainHashes(tokens, block_tokens, self.storage_fingerprint, salt, len(tokens) // block_tokens,
                             memo=self._chain_memo)
        if not is_deferred or self.config.is_fp8 or limit == 0:
            return self._find(tokens, salt, limit, hashes, is_deferred, None)
        key = plan_key(tokens, hashes, limit, block_tokens, self.config.span_blocks)   # restore_plan.py
        return self._plans.lookup(self.stack, key, lambda trace: self._find(tokens, salt, limit, hashes, True, trace))

    def _find(self, tokens: np.ndarray, salt, limit: int, hashes: ChainHashes, is_deferred: bool,
              trace: PlanTrace | None) -> LookupResult | None:
        """`_lookup` without a plan: `trace` (optional) gets what a replay needs."""
        block_tokens = self.config.block_tokens
        events = None if trace is None else trace.events
        fetched: dict[str, Hit | None] = {}
        num_usable_blocks = limit // block_tokens  # blocks [0, n) may all be cached; lowered on misses
        last_block_id = num_usable_blocks
        num_groups = 1
        while last_block_id >= 0:
            lowest = max(0, ((last_block_id - 1) // GROUP_BLOCKS - num_groups + 1) * GROUP_BLOCKS)
            block_ids = range(last_block_id, lowest - 1, -1)
            index_keys = [index_key(hashes[k]) for k in block_ids]
            if num_groups == 1 and limit > 0:  # the first read
                keys = self._prefetch_keys(tokens, salt, hashes, limit)
                offsets, hits = self.stack.fetch(index_keys, keys, defer_verify=True, trace=events)
                fetched.update(zip(keys, hits))
            else:
                offsets = self.stack.get_index_offsets(index_keys, trace=events)
            num_groups = max(1, INDEX_CHUNK_BLOCKS // GROUP_BLOCKS)
            candidates = sorted({
                k * block_tokens + o for k, found in zip(block_ids, offsets) for o in found
                if 0 <= o < block_tokens and 0 < k * block_tokens + o <= limit
            }, reverse=True)
            for position in candidates:
                if position // block_tokens > num_usable_blocks:
                    continue
                result = self._try_checkpoint(tokens, salt, hashes, position, fetched, is_deferred, trace)
                if isinstance(result, LookupResult):
                    return result
                num_usable_blocks = min(num_usable_blocks, result)
            last_block_id = min(block_ids[-1] - 1, num_usable_blocks)
        return None

    def _checkpoint_key(self, tokens: np.ndarray, salt, hashes: ChainHashes, position: int) -> str:
        k = position // self.config.block_tokens
        return checkpoint_key(hashes[k], tokens[k * self.config.block_tokens:position], self.storage_fingerprint, salt)

    def _prefetch_keys(self, tokens: np.ndarray, salt, hashes: ChainHashes, position: int) -> list[str]:
        """What `_try_checkpoint(position)` reads first: the checkpoint, then the span records
        (and the single-block records where no span can exist) of every block before it, the
        head last so that it ends most recently used."""
        return [self._checkpoint_key(tokens, salt, hashes, position),
                *self._run_keys(hashes, position // self.config.block_tokens)]

    def _try_checkpoint(self, tokens: np.ndarray, salt, hashes: ChainHashes, position: int,
                        fetched: dict[str, Hit | None], is_deferred: bool = False,
                        trace: PlanTrace | None = None) -> LookupResult | int:
        """The state at `position`, or (a miss) how many leading blocks can still be cached.
        Every record it uses is verified (`TierStack.settle`) right before its bytes are used;
        one that fails was deleted from its tier, so asking again gets the next copy or a miss.
        `is_deferred` (no FP8): the run records' checks and copies wait for `load_into`.
        `trace`: see `_find` (a deferred hit is kept there)."""
        k = position // self.config.block_tokens
        key = self._checkpoint_key(tokens, salt, hashes, position)
        events = None if trace is None else trace.events
        for _ in range(MAX_SETTLE_ATTEMPTS):
            self._fetch([key], fetched, events)
            checkpoint = fetched[key]
            if trace is not None and checkpoint is not None:
                trace.set_checkpoint(checkpoint)   # (before it is settled: a replay verifies it again)
            if checkpoint is None or self.stack.settle(checkpoint):
                break
            fetched.pop(key)
        else:
            checkpoint = None
        if checkpoint is None:
            return len(hashes)
        for _ in range(MAX_SETTLE_ATTEMPTS):
            pieces, first_missing = self._fetch_runs(hashes, k, fetched, events)
            if first_missing < k:
                return first_missing
            try:
                if is_deferred and not self.config.is_fp8:
                    state, deferred = None, self._assembler.defer(pieces, checkpoint.record, position)
                else:
                    state, deferred = self._assembler.assemble(pieces, checkpoint.record, position), None
            except CorruptRecord as exc:  # deleted from its tier: ask the tiers again for that record
                fetched.pop(exc.key, None)
                continue
            except ValueError as exc:
                log.warning("kvcache: checkpoint at %d does not fit its blocks (%s)", position, exc)
                return len(hashes)
            break
        else:
            return len(hashes)
        # LRU order as `get_many` leaves it: the head of the prefix most recently used
        touched = [hit.record.key for hit, _, _ in reversed(pieces)]
        self.stack.device.touch_many(touched)
        result = LookupResult(position, state, checkpoint_tier=checkpoint.tier, deferred=deferred)
        for hit, _, num_used in pieces:
            result.num_blocks_by_tier[hit.tier] = result.num_blocks_by_tier.get(hit.tier, 0) + num_used
        for hit in [p[0] for p in pieces] + [checkpoint]:
            result.num_records_by_tier[hit.tier] = result.num_records_by_tier.get(hit.tier, 0) + 1
            result.num_bytes_by_tier[hit.tier] = result.num_bytes_by_tier.get(hit.tier, 0) + hit.num_bytes
        if trace is not None and deferred is not None:
            self.stack.trace_touch(trace.events, touched)
            trace.result = result
        return result

    def _run_keys(self, hashes: ChainHashes, num_blocks: int) -> list[str]:
        """The records `_fetch_runs(hashes, num_blocks)` asks for first (tail first): a span
        wherever the tokens cover one, single blocks where they end inside a span."""
        span_blocks = self.config.span_blocks
        num_known_blocks = len(hashes) - 1
        keys = []
        for j in reversed(range(-(-num_blocks // span_blocks))):
            if (j + 1) * span_blocks <= num_known_blocks:
                keys.append(self._run_key(hashes, j * span_blocks, span_blocks))
            else:
                keys += [block_key(hashes[b + 1]) for b in reversed(range(j * span_blocks, num_blocks))]
        return keys

    def _run_key(self, hashes: ChainHashes, first_block_id: int, num_blocks: int) -> str:
        end_hash = hashes[first_block_id + num_blocks]
        return block_key(end_hash) if num_blocks == 1 else span_key(end_hash, num_blocks)

    def _fetch_runs(self, hashes: ChainHashes, num_blocks: int, fetched: dict[str, Hit | None],
                    events: list | None = None) -> tuple[list[tuple[Hit, int, int]], int]:
        """Records covering blocks ``[0, num_blocks)``: ``([(hit, first block, blocks used)],
        first missing block)``. A span is used whenever the tokens cover all of it; where it is
        missing (or ends past the tokens) its blocks come from single-block records. Fetches
        (each in one `get_many`, head last so it ends most recently used) what `fetched` lacks."""
        span_blocks = self.config.span_blocks
        num_known_blocks = len(hashes) - 1
        span_ids = range(-(-num_blocks // span_blocks))
        span_keys = {j: self._run_key(hashes, j * span_blocks, span_blocks) for j in span_ids
                     if (j + 1) * span_blocks <= num_known_blocks}
        self._fetch([span_keys[j] for j in reversed(span_ids) if j in span_keys], fetched, events)
        single_ids = [
            b for j in span_ids if fetched.get(span_keys.get(j)) is None
            for b in range(j * span_blocks, min((j + 1) * span_blocks, num_blocks))
        ]
        if span_blocks > 1:
            self._fetch([block_key(hashes[b + 1]) for b in reversed(single_ids)], fetched, events)
        pieces: list[tuple[Hit, int, int]] = []
        block_id = 0
        while block_id < num_blocks:
            hit = fetched.get(span_keys.get(block_id // span_blocks)) if block_id % span_blocks == 0 else None
            if hit is not None:
                num_used = min(span_blocks, num_blocks - block_id)
            else:
                hit, num_used = fetched.get(block_key(hashes[block_id + 1])), 1
            if hit is None:
                return pieces, block_id
            pieces.append((hit, block_id, num_used))
            block_id += num_used
        return pieces, num_blocks

    def _fetch(self, keys: list[str], fetched: dict[str, Hit | None], events: list | None = None) -> None:
        """Block and span records, their checksum pass deferred to the assembly (assembly.py)."""
        keys = [key for key in keys if key not in fetched]
        if keys:
            fetched.update(zip(keys, self.stack.get_many(keys, defer_verify=True, trace=events)))

    def commit(self, token_ids: Sequence[int] | np.ndarray, states: Mapping[int, State],
               salt: str | bytes | None = None) -> CommitResult:
        """Cache the state dicts exported at positions ``states.keys()`` of `token_ids`.

        Never blocks on Redis or disk: the device tier is written now, the others by the
        background writer (`flush` waits for it).
        """
        tokens = token_array(token_ids)
        positions = sorted(int(p) for p in states)
        for position in positions:
            if not 0 < position <= len(tokens):
                raise ValueError(f"position {position} outside 1..{len(tokens)}")
            num_tokens = layout.validate_state(states[position], self.entry_rates, self.config.block_tokens)
            if num_tokens != position:
                raise ValueError(f"state at position {position} holds {num_tokens} tokens")
        with self._lock:
            self._num_commits += 1
        if not positions:
            return CommitResult(0, 0, 0, True)
        block_tokens, span_blocks = self.config.block_tokens, self.config.span_blocks
        num_blocks = positions[-1] // block_tokens
        hashes = ChainHashes(tokens, block_tokens, self.storage_fingerprint, salt, num_blocks, memo=self._chain_memo)
        runs = [(j * span_blocks, span_blocks) for j in range(num_blocks // span_blocks)]
        if span_blocks > 1:  # each position's unfinished span, block by block
            ends = [p // block_tokens for p in positions]
            runs += [(b, 1) for b in sorted({b for end in ends for b in range(end // span_blocks * span_blocks, end)})]
        keys = [self._run_key(hashes, first, n) for first, n in runs]
        cached = self.stack.device.get_many(keys)
        depth_items: list[tuple[int, int, Record]] = []  # (depth, tie-break, record)
        new_block_ids: set[int] = set()
        num_new_bytes = 0
        largest = states[positions[-1]]
        for (first, n), key, record in zip(runs, keys, cached):
            if record is None:
                tensors = layout.range_tensors(largest, self.entry_rates, first, n, block_tokens)
                record = Record("block" if n == 1 else "span", key, self._encode_tensors(tensors))
                new_block_ids.update(range(first, first + n))
                num_new_bytes += record.num_bytes
            depth_items.append(((first + n) * block_tokens, 0, record))
        index_offsets: dict[int, set[int]] = {}
        for position in positions:
            k = position // block_tokens
            key = checkpoint_key(hashes[k], tokens[k * block_tokens:position], self.storage_fingerprint, salt)
            tensors = layout.checkpoint_tensors(states[position], self.entry_rates, block_tokens)
            record = Record("checkpoint", key, self._encode_tensors(tensors))
            num_new_bytes += record.num_bytes
            depth_items.append((position, 1, record))
            index_offsets.setdefault(k, set()).add(position - k * block_tokens)
        records = [r for _, _, r in sorted(depth_items, key=lambda x: (-x[0], -x[1]))]
        records += [index_record(index_key(hashes[k]), found) for k, found in sorted(index_offsets.items())]
        is_queued = self.stack.put_many(records)
        return CommitResult(len(new_block_ids), len(positions), num_new_bytes, is_queued)

    def _encode_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.config.is_fp8:
            return tensors
        return fp8.quantize_tensors(tensors, self.config.rope_dim, self.config.fp8_suffixes)

    def checkpoint_positions(self, num_prompt_tokens: int, num_tokens: int) -> list[int]:
        """Where the engine should export state for `commit`: every `checkpoint_tokens`, the end
        of the prompt and the end of the sequence."""
        return layout.checkpoint_positions(num_prompt_tokens, num_tokens, self.config.checkpoint_tokens)

    # -- housekeeping -------------------------------------------------------------------------

    def stats(self) -> ServiceStats:
        with self._lock:
            return ServiceStats(
                tiers=self.stack.tier_stats(),
                num_lookups=self._num_lookups, num_hit_lookups=self._num_hit_lookups,
                num_lookup_tokens=self._num_lookup_tokens, num_cached_tokens=self._num_cached_tokens,
                num_commits=self._num_commits,
                num_pending_write_bytes=self.stack.writer.num_pending_bytes,
                num_dropped_writes=self.stack.writer.num_dropped,
                num_failed_writes=self.stack.writer.num_failed,
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the background writes queued so far (tests, shutdown)."""
        return self.stack.flush(timeout)

    def close(self) -> None:
        self._plans.clear()
        self.stack.close()

    def __enter__(self) -> KVCacheService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
