"""Micro-batch plans: how a step's segments (sequences' new tokens) are dealt to the router's
micro-batches, cutting long prefills inside a sequence where that balances the token counts.

Owns nothing (pure functions of the segments' lengths). Used by StepBatch.plan and the
expert-parallel router (actors/router.py).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_PART_TOKENS = 128   # a prefill is cut over micro-batches only into parts of at least this many tokens


@dataclass(frozen=True)
class SegmentPart:
    """New tokens [offset, offset + length) of step segment `segment`, in one micro-batch.
    `is_last`: this part ends the segment (its last row gives the sequence's last-token logits)."""
    segment: int
    offset: int
    length: int
    is_last: bool


def split_whole(lengths: list[int], num_parts: int) -> list[list[int]]:
    """Whole segments into <= num_parts groups of similar token counts (greedy longest-first)."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    groups: list[list[int]] = [[] for _ in range(max(1, min(num_parts, len(order))))]
    loads = [0] * len(groups)
    for k in order:
        g = loads.index(min(loads))
        groups[g].append(k)
        loads[g] += lengths[k]
    return [sorted(g) for g in groups if g]


def plan_micro_batches(lengths: list[int], num_parts: int, min_part: int = MIN_PART_TOKENS) -> list[list[SegmentPart]]:
    """Split a step's segments (new-token counts `lengths`) into <= num_parts micro-batches of
    balanced token counts, cutting prefills inside a sequence where that balances better.

    Token-level plan: the segments laid end to end in step order, cut at round(j * T / M) for
    j = 1..M-1, each cut moved to the nearest allowed position: a segment boundary, or a point
    inside a prefill that leaves both pieces >= `min_part` tokens (decode rows are never cut).
    Micro-batch j takes the tokens between cuts j and j+1, so a sequence cut in several parts has
    them in consecutive micro-batches, in token order: in the router's ping-pong every layer runs
    micro-batch m's attention before m+1's, so part j+1 finds the layer's state (window,
    compressor tails, entries) advanced past part j. The whole-sequence plan (`split_whole`) is
    kept unless the token-level plan has a strictly smaller largest micro-batch. Empty
    micro-batches are dropped."""
    if min_part < 2:
        raise ValueError(f"min_part must be >= 2 (a one-token part would be a decode row), got {min_part}")
    whole = [[SegmentPart(k, 0, lengths[k], True) for k in g] for g in split_whole(lengths, num_parts)]
    if not lengths or num_parts <= 1:
        return whole
    total = sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cuts = [0]
    for j in range(1, num_parts):
        cuts.append(_nearest_cut((j * total + num_parts // 2) // num_parts, cuts[-1], lengths, bounds, min_part))
    cuts.append(total)
    plan: list[list[SegmentPart]] = []
    for lo, hi in zip(cuts, cuts[1:]):
        if hi <= lo:
            continue
        parts = []
        for k, n in enumerate(lengths):
            a, b = max(lo, bounds[k]), min(hi, bounds[k + 1])
            if a < b:
                parts.append(SegmentPart(k, a - bounds[k], b - a, b == bounds[k + 1]))
        plan.append(parts)
    largest = max(sum(p.length for p in mb) for mb in plan)
    return plan if largest < max(sum(p.length for p in mb) for mb in whole) else whole


def _nearest_cut(target: int, prev: int, lengths: list[int], bounds: list[int], min_part: int) -> int:
    """The allowed cut >= `prev` (the previous cut) nearest to `target` (ties: the lower one): a
    segment boundary, `prev` itself (an empty micro-batch, dropped), or a point inside a prefill
    leaving >= min_part tokens on both sides (its start or `prev`, whichever is later, and its end)."""
    target = max(target, prev)
    k = next(i for i in range(len(lengths)) if bounds[i + 1] >= target)   # target in [bounds[k], bounds[k+1]]
    lo, e = max(bounds[k], prev), bounds[k + 1]
    candidates = [lo, e]
    if lengths[k] > 1 and lo + min_part <= e - min_part:                 # (a decode row is never cut)
        candidates.append(min(max(target, lo + min_part), e - min_part))
    return min(candidates, key=lambda c: (abs(c - target), c))
