"""Restore plans (kvcache/restore_plan.py): a deferred lookup asked again while the tiers are
unchanged replays the first one's answer: the same state bitwise, the same LRU order and
counters as a lookup without plans, and the bytes verified again at every replay (a record
corrupted in place after a replayed restore is still caught, deleted, and the next lookup finds
what is intact). Any change to a tier (a key deleted or evicted, a segment added by another
process or rewritten) drops the plans; with a Redis tier (no generation) no plan is made. Real
Arrow segment files and real Redis; TOKENS committed at 256, 512, 700 and 1000 in spans of 2
blocks (test_kv_byte_restore.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache.disk_tier import DiskTier
from kvcache.keys import chain_hashes, checkpoint_key, span_key, token_array
from kvcache.record import decode_record
from kvcache.service import KVCacheService
from kvcache.synthetic import bitwise_equal, synthetic_state
from test_kv_byte_restore import LAY, TOKENS, committed, pool

HASHES = chain_hashes(token_array(TOKENS), 128, "fp", None, len(TOKENS) // 128)


def restore(svc: KVCacheService, p, max_tokens: int | None = None):
    """A deferred lookup and its load into a fresh state of `p`: (hit, loaded state or None)."""
    hit = svc.lookup(TOKENS, max_tokens=max_tokens, is_deferred=True)
    state = p.new_state()
    return hit, state if hit.load_into(state) else None


def reader(directory: Path, *, is_planning: bool = True) -> KVCacheService:
    svc = KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, device_bytes=0, disk_dir=directory)
    if not is_planning:
        svc._plans.max_plans = 0   # (every plan dropped as it is made)
    return svc


def tier_state(svc: KVCacheService) -> tuple:
    """What lookups change besides their results: LRU orders and read counters of every tier."""
    stats = svc.stats().tiers
    return tuple((tier.lru_keys(), stats[tier.name].num_hits, stats[tier.name].num_misses,
                  stats[tier.name].num_bytes_loaded, stats[tier.name].num_corrupt) for tier in svc.stack.tiers)


@pytest.mark.parametrize("max_tokens, position", [(None, 1000), (750, 700)])   # (750: span 2 cut to a block)
def test_a_lookup_asked_again_replays_its_plan_with_the_same_state_and_effects(max_tokens, position, tmp_path):
    committed({"disk_dir": tmp_path}).close()
    p = pool()
    with reader(tmp_path) as planned, reader(tmp_path, is_planning=False) as plain:
        results = {}
        for name, svc in (("planned", planned), ("plain", plain)):
            results[name] = [restore(svc, p, max_tokens) for _ in range(3)]
        assert (planned._plans.num_replays, len(planned._plans)) == (2, 1)
        assert (plain._plans.num_replays, len(plain._plans)) == (0, 0)
        for svc in (planned, plain):   # each service's own chain memo: the repeats reuse the first hashes
            assert (svc._chain_memo.num_misses, svc._chain_memo.num_hits) == (1, 2)
        expected = synthetic_state(LAY, TOKENS, position)
        for hit, state in results["planned"] + results["plain"]:
            assert state is not None and bitwise_equal(state.export(), expected)
            assert all(run.pending is None for run in hit.deferred.runs)   # every run verified by its load
        first, *replays = [hit for hit, _ in results["planned"]]
        for hit in replays:   # a fresh answer over the same bytes
            assert (hit.num_cached_tokens, hit.checkpoint_tier, hit.num_blocks_by_tier, hit.num_records_by_tier,
                    hit.num_bytes_by_tier) == (first.num_cached_tokens, first.checkpoint_tier, first.num_blocks_by_tier,
                                               first.num_records_by_tier, first.num_bytes_by_tier)
            assert hit.deferred is not first.deferred and hit.deferred.tensors is first.deferred.tensors
            assert [a.record is not b.record for a, b in zip(hit.deferred.runs, first.deferred.runs)] == [True] * len(
                first.deferred.runs)
            assert hit.deferred.caches is first.deferred.caches   # (one load plan for all of them)
        assert len(first.deferred.caches["load_plans"]) == 1
        assert tier_state(planned) == tier_state(plain)          # the same LRU orders and counters


def in_place(directory: Path, key: str, where: str) -> None:
    """Flip one bit of record `key` where it lies in its segment file, in place (what a bit rot
    would do; the readers' maps see it): the first byte of its data region, or a byte of its
    framing (`where` "data" / "framing")."""
    disk = DiskTier(directory, budget_bytes=1 << 30)
    value = disk.get_many([key])[0]
    record_bytes = bytes(value)
    raw = decode_record(value, "fp", expected_key=key, is_borrowed=True, verify=False)._raw
    data_offset = raw.__array_interface__["data"][0] - value.address
    disk.close()
    for path in sorted(directory.glob("*.kvseg")):
        at = path.read_bytes().find(record_bytes)
        if at >= 0:
            break
    else:
        raise AssertionError(f"{key} not found")
    at += data_offset if where == "data" else 24
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_a_run_corrupted_in_place_after_a_replayed_restore_is_caught_and_deleted(tmp_path):
    committed({"disk_dir": tmp_path}).close()
    p = pool()
    key = span_key(HASHES[4], 2)   # blocks [2, 4): no single-block records of them
    with reader(tmp_path) as svc:
        restore(svc, p)
        hit, state = restore(svc, p)
        assert svc._plans.num_replays == 1 and state is not None
        in_place(tmp_path, key, "data")
        hit, state = restore(svc, p)   # replayed (nothing told the tier), verified by the load
        assert svc._plans.num_replays == 2 and state is None     # a miss, never a wrong state
        svc.flush()
        assert svc.stats().tiers["disk"].num_corrupt == 1
        assert svc.stack.tiers[1].contains_many([key]) == [False]
        hit, state = restore(svc, p)   # the tier changed: looked up again, the intact prefix
        assert svc._plans.num_replays == 2 and hit.num_cached_tokens == 256
        assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 256))
        hit, state = restore(svc, p)   # and that answer is a plan again
        assert svc._plans.num_replays == 3 and bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 256))


@pytest.mark.parametrize("where", ["data", "framing"])
def test_a_checkpoint_corrupted_in_place_after_a_replay_is_caught_by_the_next_replay(where, tmp_path):
    """The checkpoint is verified at every replay: corrupt data is caught there, deleted, and
    the lookup runs without the plan (the next checkpoint, 700). A changed framing byte (the
    parse is the plan's, made when the bytes were intact) changes nothing the state is made of:
    the replay still restores the intact bytes, whose data are verified."""
    committed({"disk_dir": tmp_path}).close()
    p = pool()
    key = checkpoint_key(HASHES[7], token_array(TOKENS)[7 * 128:1000], "fp", None)
    with reader(tmp_path) as svc:
        restore(svc, p)
        restore(svc, p)
        in_place(tmp_path, key, where)
        hit, state = restore(svc, p)
        svc.flush()
        if where == "data":
            assert svc._plans.num_replays == 1 and svc.stats().tiers["disk"].num_corrupt == 1
            assert hit.num_cached_tokens == 700 and bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 700))
            assert svc.stack.tiers[1].contains_many([key]) == [False]
        else:
            assert svc._plans.num_replays == 2 and svc.stats().tiers["disk"].num_corrupt == 0
            assert hit.num_cached_tokens == 1000 and bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 1000))


def other_writer(directory: Path) -> None:
    """Another process's commit into the same directory (a new segment)."""
    tokens = [t + 1 for t in TOKENS[:300]]
    with KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, disk_dir=directory) as writer:
        writer.commit(tokens, {256: synthetic_state(LAY, tokens, 256)})
        writer.flush()


@pytest.mark.parametrize("change", ["delete_unused", "delete_used", "evict", "other_process", "rewrite"])
def test_any_change_to_the_tier_drops_the_plans(change, tmp_path):
    committed({"disk_dir": tmp_path}).close()
    p = pool()
    with reader(tmp_path) as svc:
        disk = svc.stack.tiers[1]
        restore(svc, p)
        restore(svc, p)
        assert (svc._plans.num_replays, len(svc._plans)) == (1, 1)
        generations = svc.stack.generations()
        position = 1000
        if change == "delete_unused":   # (a checkpoint this lookup does not read)
            disk.delete_many([checkpoint_key(HASHES[2], token_array(TOKENS)[256:256], "fp", None)])
        elif change == "delete_used":   # span [4, 6): block 4 is a single record too, block 5 nowhere else
            disk.delete_many([span_key(HASHES[6], 2)])
            position = 700
        elif change == "evict":
            disk._lru.budget_bytes = disk.num_bytes - 1   # (the least recently used record goes)
            disk.put_many([])
        elif change == "other_process":
            other_writer(tmp_path)
        else:   # a deleted record makes its segment due for a rewrite: the live records move to a new file
            names = disk.segment_names()
            disk.delete_many([checkpoint_key(HASHES[2], token_array(TOKENS)[256:256], "fp", None)])
            disk.collect_garbage()
            assert not set(names) & set(disk.segment_names())
        assert svc.stack.generations() != generations
        hit, state = restore(svc, p)
        assert svc._plans.num_replays == 1 and len(svc._plans) == 1   # not replayed; the new answer planned
        assert hit.num_cached_tokens == position
        assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, position))
        hit, state = restore(svc, p)
        assert svc._plans.num_replays == 2 and bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, position))


def test_other_limits_and_tokens_have_plans_of_their_own(tmp_path):
    committed({"disk_dir": tmp_path}).close()
    p = pool()
    with reader(tmp_path) as svc:
        for max_tokens in (None, 750, None, 750):
            restore(svc, p, max_tokens)
        assert (svc._plans.num_replays, len(svc._plans)) == (2, 2)
        longer = TOKENS + [5] * 200   # (blocks past 1000 hashed into the key: another plan, the same answer)
        hit = svc.lookup(longer, max_tokens=1000, is_deferred=True)
        assert (svc._plans.num_replays, len(svc._plans), hit.num_cached_tokens) == (2, 3, 1000)


def test_no_plans_with_a_redis_tier(tmp_path, redis_url, redis_prefix):
    """Other processes write Redis unseen (no generation): every lookup reads the tiers."""
    committed({"disk_dir": tmp_path}).close()
    p = pool()
    with KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, device_bytes=0, disk_dir=tmp_path,
                        redis_url=redis_url, redis_prefix=redis_prefix) as svc:
        assert svc.stack.generations() is None
        for _ in range(2):
            hit, state = restore(svc, p)
            assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 1000))
        assert (svc._plans.num_replays, len(svc._plans)) == (0, 0)
        assert hit.deferred.caches is None   # (loaded once: nothing kept)


def test_a_replay_asks_for_the_readahead_of_records_not_in_memory(tmp_path, monkeypatch):
    """As a lookup's read would (segments.py `prefetch_ranges`): after the segment left the page
    cache the replay asks for every record of the answer; while it is in memory, for nothing."""
    from kvcache import disk_tier
    committed({"disk_dir": tmp_path}).close()
    p = pool()
    asked = []
    prefetch = disk_tier.prefetch_ranges
    monkeypatch.setattr(disk_tier, "prefetch_ranges", lambda reads: asked.append(prefetch(reads)) or asked[-1])
    with reader(tmp_path) as svc:
        hit, _ = restore(svc, p)
        restore(svc, p)
        svc.stack.tiers[1].drop_cached_pages()
        hit, state = restore(svc, p)
        assert svc._plans.num_replays == 2 and bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 1000))
        assert len(asked) == 2 and asked[0] == 0 and asked[1] >= hit.num_bytes_by_tier["disk"]   # (the replays)
