"""Restore plans: a deferred lookup's outcome, kept per prefix and replayed while nothing it read
can have changed.

Owns: `RestorePlans`, one service's bounded map plan key -> `RestorePlan` (thread-safe), and
each plan's templates: the records the lookup found (unverified copies, `Record.unverified_copy`),
the row blocks viewing them (`DeferredState` form) and the trace of its reads.

Why: a deferred lookup (service.py) of a prefix restored before does the same work again:
index keys, one read per tier, a parse per record (~20 records at 64K tokens), the run checks
and the byte views of every record (assembly.py): ~0.5 ms of Python at 64K tokens, about as
long as reading the 13 MB it restores. When the tiers still hold exactly what they held, all
of that gives the same answer, so a plan keeps it and a replay hands out a fresh
`DeferredState` over the same bytes.

Soundness. The lookup's answer is a function of its key (`plan_key`: the tokens that can
matter, through their chain hash, and the limit) and of what the tiers hold. A plan is made
only when every tier has a `Tier.generation` (device and disk tiers: in-process maps; the disk
tier also picks up other processes' segments first) and the generations did not change during
the lookup; it is replayed only while they are still the same: no key came, went or moved
since, and every record sits at the same place in the same memory map (disk segments are
written once, temp + rename, and never modified in place). A Redis tier has no generation
(other processes write it unseen): with one, no plan is made. What a plan skips is only the
finding and parsing; the bytes are still verified at every replay: the checkpoint record now
(a corrupt one is deleted and the lookup runs as without a plan), every run record in the
load's pass (restore.py: a corrupt one fails the load, is deleted and counted, which changes
the generation, so the plan is dropped). The replay repeats what the lookup's reads changed
besides their results (`TierStack.replay`: LRU order, per-tier counters, the disk tier's
readahead probe). A plan keeps the disk buffers it views alive (their memory maps); plans
whose generations are stale are dropped at the next lookup, and at most `max_plans` are kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvcache.hierarchy import Hit, TierStack
from kvcache.keys import ChainHashes
from kvcache.restore import DeferredState
from kvcache.stats import LookupResult

MAX_PLANS = 16


def plan_key(tokens: np.ndarray, hashes: ChainHashes, limit: int, block_tokens: int, span_blocks: int) -> tuple:
    """What a deferred lookup of `tokens` (chain `hashes`) at most `limit` tokens depends on,
    besides the tiers: the blocks it can read keys of (up to the span holding block
    ``limit // B``, as far as the tokens go: ``m`` blocks, pinned by ``h_m``) and the tokens
    after them up to `limit` (a checkpoint key there hashes them)."""
    num_blocks = min(len(hashes) - 1, -(-(limit // block_tokens) // span_blocks) * span_blocks)
    partial = tokens[num_blocks * block_tokens:limit].tobytes() if limit > num_blocks * block_tokens else b""
    return limit, num_blocks, hashes[num_blocks], partial


@dataclass
class PlanTrace:
    """What one lookup did that a replay repeats (filled by service.py while it looks up)."""
    events: list = field(default_factory=list)   # `TierStack.fetch`'s trace events, in order
    checkpoint: Hit | None = None                 # the checkpoint's hit, its record an unverified copy
    result: LookupResult | None = None            # the lookup's answer (a deferred hit)

    def set_checkpoint(self, hit: Hit) -> None:
        """Before `hit` (the checkpoint the answer uses) is settled: keep it unverified."""
        self.checkpoint = Hit(hit.record.unverified_copy(), hit.tier, hit.num_bytes, hit.pending)


class RestorePlan:
    """One deferred lookup's answer and the trace that produced it, valid for `generations`."""

    def __init__(self, generations: tuple[int, ...], trace: PlanTrace):
        result, deferred = trace.result, trace.result.deferred
        self.generations = generations
        self.events = trace.events
        self.checkpoint = trace.checkpoint
        # the runs as found: unverified copies (the result's own hits are settled by its load)
        self.runs = [Hit(hit.record.unverified_copy(), hit.tier, hit.num_bytes, hit.pending)
                     for hit in deferred.runs]
        if deferred.caches is None:   # (the lookup's own result shares them: it is loaded first)
            deferred.caches = {}
        self.tensors, self.sources, self.caches = deferred.tensors, deferred.sources, deferred.caches
        self.num_threads = deferred.num_threads
        self.position, self.checkpoint_tier = result.num_cached_tokens, result.checkpoint_tier
        self.by_tier = (dict(result.num_blocks_by_tier), dict(result.num_records_by_tier),
                        dict(result.num_bytes_by_tier))

    def replay(self, stack: TierStack) -> LookupResult | None:
        """The lookup's answer again, over the same bytes: the checkpoint verified now, the runs
        unverified (their load verifies them). None if the checkpoint is corrupt (then deleted
        from its tier: the caller looks up as without a plan, its reads counted once more)."""
        stack.replay(self.events)        # (first: it asks for the readahead of records not in memory)
        template = self.checkpoint
        checkpoint = Hit(template.record.unverified_copy(), template.tier, template.num_bytes, template.pending)
        if not stack.settle(checkpoint):   # (verified, promoted as the lookup did; corrupt: deleted, counted)
            return None
        runs = [Hit(hit.record.unverified_copy(), hit.tier, hit.num_bytes, hit.pending) for hit in self.runs]
        num_blocks, num_records, num_bytes = self.by_tier
        return LookupResult(self.position, None, checkpoint_tier=self.checkpoint_tier,
                            num_blocks_by_tier=dict(num_blocks), num_records_by_tier=dict(num_records),
                            num_bytes_by_tier=dict(num_bytes),
                            deferred=DeferredState(self.tensors, runs, stack.settle, self.sources, self.caches,
                                                           num_threads=self.num_threads))


class RestorePlans:
    """A service's restore plans by `plan_key`, least recently used first (at most `max_plans`)."""

    def __init__(self, max_plans: int = MAX_PLANS):
        self.max_plans = max_plans
        self._plans: OrderedDict[tuple, RestorePlan] = OrderedDict()
        self._lock = threading.Lock()
        self.num_replays = 0

    def lookup(self, stack: TierStack, key: tuple, find: Callable[[PlanTrace | None], LookupResult | None]
               ) -> LookupResult | None:
        """A deferred lookup of `key` (`plan_key`): the valid plan's answer, else ``find(trace)``
        (the lookup without a plan, filling `trace`), whose deferred answer becomes the plan if
        no tier changed meanwhile. Without generations (a Redis tier): ``find(None)``."""
        generations = stack.generations()
        if generations is None:
            return find(None)
        result = self.replay(key, generations, stack)
        if result is not None:
            return result
        trace = PlanTrace()
        result = find(trace)
        if trace.result is not None and stack.generations() == generations:
            self.put(key, RestorePlan(generations, trace))
        return result

    def replay(self, key: tuple, generations: tuple[int, ...], stack: TierStack) -> LookupResult | None:
        """The answer of the plan for `key` if it is valid at `generations` (`RestorePlan.replay`),
        else None; every stale plan is dropped first (and with it the memory maps it held)."""
        with self._lock:
            stale = [k for k, plan in self._plans.items() if plan.generations != generations]
            for k in stale:
                del self._plans[k]
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
        result = plan.replay(stack) if plan is not None else None
        if result is not None:
            with self._lock:
                self.num_replays += 1
        return result

    def put(self, key: tuple, plan: RestorePlan) -> None:
        with self._lock:
            self._plans[key] = plan
            self._plans.move_to_end(key)
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
