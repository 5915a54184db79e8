import threading

import numpy as np
import pytest
import torch

from kvcache.disk_tier import DiskTier
from kvcache.keys import GROUP_BLOCKS, block_key, chain_hashes, checkpoint_key, index_key, token_array
from kvcache.record import Record, encode_record
from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state

LAY = SyntheticLayout()
FP = "tiny-model-fp"
TOKENS = [int(t) for t in (np.arange(1000) * 7919 + 13) % 50000]
POSITIONS = (100, 300, 512, 900)


def states_for(tokens, positions=POSITIONS, lay=LAY):
    return {p: synthetic_state(lay, tokens, p) for p in positions}


def service(**kwargs):
    return KVCacheService(kwargs.pop("rates", LAY.entry_rates), kwargs.pop("fingerprint", FP), **kwargs)


def keys_for(tokens, position, salt=None, fingerprint=FP):
    tokens = token_array(tokens)
    hashes = chain_hashes(tokens, 128, fingerprint, salt, position // 128)
    k = position // 128
    ckpt = checkpoint_key(hashes[k], tokens[k * 128:position], fingerprint, salt)
    return ckpt, [block_key(h) for h in hashes[1:]], index_key(hashes[k])


def assert_hit(result, tokens, position, lay=LAY):
    assert result.num_cached_tokens == position
    if position == 0:
        assert result.state_tensors is None
    else:
        assert bitwise_equal(result.state_tensors, synthetic_state(lay, tokens, position))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tier", ["device", "redis", "disk"])
def test_round_trip_through_each_tier_is_bitwise_exact(tier, dtype, tmp_path, redis_url, redis_prefix):
    lay = SyntheticLayout(dtype=dtype)
    stores = {"redis": dict(redis_url=redis_url, redis_prefix=redis_prefix), "disk": dict(disk_dir=tmp_path)}
    with service(rates=lay.entry_rates, **stores.get(tier, {})) as writer:
        writer.commit(TOKENS, states_for(TOKENS, lay=lay))
        writer.flush()
        if tier == "device":
            result = writer.lookup(TOKENS)
    if tier != "device":
        with service(rates=lay.entry_rates, device_bytes=0, **stores[tier]) as reader:
            result = reader.lookup(TOKENS)
    assert result.checkpoint_tier == tier and result.num_blocks_by_tier == {tier: 7}
    assert_hit(result, TOKENS, 900, lay)
    assert result.state_tensors["0.window"].dtype == dtype


def test_lookup_returns_the_longest_prefix_with_a_checkpoint():
    with service() as svc:
        svc.commit(TOKENS, states_for(TOKENS))
        other = [50001 + i for i in range(200)]
        cases = [
            (TOKENS, 900), (TOKENS + other, 900), (TOKENS[:899], 512), (TOKENS[:600] + other, 512),
            (TOKENS[:520] + other, 512), (TOKENS[:512], 512), (TOKENS[:400] + other, 300),
            (TOKENS[:256] + other, 100), (TOKENS[:99] + other, 0), (other, 0), ([], 0),
        ]
        for tokens, expected in cases:
            assert_hit(svc.lookup(tokens), TOKENS, expected)
        assert_hit(svc.lookup(TOKENS, max_tokens=899), TOKENS, 512)
        assert_hit(svc.lookup(TOKENS, max_tokens=0), TOKENS, 0)
        stats = svc.stats()
        assert stats.num_lookups == len(cases) + 2 and stats.num_hit_lookups == 9


def test_a_conversation_resumes_at_the_end_of_each_turn():
    rng = np.random.default_rng(5)
    with service(checkpoint_tokens=256) as svc:
        prompt1 = [int(t) for t in rng.integers(0, 50000, 300)]
        turn1 = prompt1 + [int(t) for t in rng.integers(0, 50000, 150)]
        positions = svc.checkpoint_positions(len(prompt1), len(turn1))
        assert positions == [256, 300, 450]
        svc.commit(turn1, states_for(turn1, positions))
        prompt2 = turn1 + [int(t) for t in rng.integers(0, 50000, 200)]
        assert_hit(svc.lookup(prompt2), prompt2, 450)
        turn2 = prompt2 + [int(t) for t in rng.integers(0, 50000, 100)]
        svc.commit(turn2, states_for(turn2, svc.checkpoint_positions(len(prompt2), len(turn2))))
        prompt3 = turn2 + [1, 2, 3]
        assert_hit(svc.lookup(prompt3), prompt3, 750)
        assert_hit(svc.lookup(prompt2 + [1, 2, 3]), prompt2, 650)


def test_salt_isolates_tenants(redis_url, redis_prefix):
    with service(redis_url=redis_url, redis_prefix=redis_prefix) as svc:
        svc.commit(TOKENS, states_for(TOKENS), salt="tenant-a")
        svc.flush()
        assert svc.lookup(TOKENS, salt="tenant-b").num_cached_tokens == 0
        assert svc.lookup(TOKENS).num_cached_tokens == 0
        assert_hit(svc.lookup(TOKENS, salt="tenant-a"), TOKENS, 900)
    with service(redis_url=redis_url, redis_prefix=redis_prefix, device_bytes=0) as other:
        assert other.lookup(TOKENS, salt="tenant-b").num_cached_tokens == 0
        assert_hit(other.lookup(TOKENS, salt="tenant-a"), TOKENS, 900)


def test_another_model_fingerprint_never_matches(redis_url, redis_prefix, tmp_path):
    with service(redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=tmp_path) as svc:
        svc.commit(TOKENS, states_for(TOKENS))
        svc.flush()
    with service(fingerprint="other-model", redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=tmp_path) as svc:
        assert svc.lookup(TOKENS).num_cached_tokens == 0
    with service(is_fp8=True, redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=tmp_path) as svc:
        assert svc.lookup(TOKENS).num_cached_tokens == 0  # FP8 storage is another namespace


@pytest.mark.parametrize("tier", ["redis", "disk"])
def test_foreign_records_at_our_keys_are_misses_and_deleted(tier, tmp_path, redis_url, redis_prefix, redis_client):
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix) if tier == "redis" else dict(disk_dir=tmp_path)
    with service(**stores) as svc:
        svc.commit(TOKENS, states_for(TOKENS, (100, 900)))
        svc.flush()
    ckpt, _, _ = keys_for(TOKENS, 900)
    foreign = bytes(encode_record(Record("checkpoint", ckpt, {"num_tokens": torch.tensor(900)}), "other-model"))
    if tier == "redis":
        redis_client.set(redis_prefix + ckpt, foreign)
    else:
        DiskTier(tmp_path, budget_bytes=1 << 30).put_many([(ckpt, foreign)])
    with service(device_bytes=0, **stores) as svc:
        assert_hit(svc.lookup(TOKENS), TOKENS, 100)
        svc.flush()
        assert svc.stats().tiers[tier].num_corrupt == 1
        assert svc.stack.tiers[1].contains_many([ckpt]) == [False]
        assert svc.lookup(TOKENS).num_cached_tokens == 100


def test_corrupt_redis_value_is_a_miss_and_deleted(redis_url, redis_prefix, redis_client):
    with service(redis_url=redis_url, redis_prefix=redis_prefix) as svc:
        svc.commit(TOKENS, states_for(TOKENS))
        svc.flush()
    _, blocks, _ = keys_for(TOKENS, 900)
    value = bytearray(redis_client.get(redis_prefix + blocks[1]))
    value[len(value) // 2] ^= 0x10
    redis_client.set(redis_prefix + blocks[1], bytes(value))
    with service(redis_url=redis_url, redis_prefix=redis_prefix, device_bytes=0) as svc:
        assert_hit(svc.lookup(TOKENS), TOKENS, 100)  # every longer checkpoint needs block 1
        assert redis_client.exists(redis_prefix + blocks[1]) == 0
        assert svc.stats().tiers["redis"].num_corrupt == 1
        svc.commit(TOKENS, states_for(TOKENS))  # recomputed state heals the cache
        svc.flush()
    with service(redis_url=redis_url, redis_prefix=redis_prefix, device_bytes=0) as svc:
        assert_hit(svc.lookup(TOKENS), TOKENS, 900)


def test_corrupt_disk_file_is_a_miss_and_deleted(tmp_path):
    with service(disk_dir=tmp_path) as svc:
        svc.commit(TOKENS, states_for(TOKENS))
        svc.flush()
    ckpt, _, _ = keys_for(TOKENS, 900)
    stored = bytes(DiskTier(tmp_path, budget_bytes=1 << 30).get_many([ckpt])[0])
    snippet = stored[len(stored) // 2:len(stored) // 2 + 64]
    (path,) = [p for p in tmp_path.glob("*.kvseg") if snippet in p.read_bytes()]
    raw = bytearray(path.read_bytes())
    raw[raw.find(snippet) + 7] ^= 0x01
    path.write_bytes(bytes(raw))
    with service(disk_dir=tmp_path, device_bytes=0) as svc:
        assert_hit(svc.lookup(TOKENS), TOKENS, 512)
        svc.flush()  # garbage collection rewrites the segment without the record
        assert svc.stats().tiers["disk"].num_corrupt == 1
    fresh = DiskTier(tmp_path, budget_bytes=1 << 30)
    assert fresh.contains_many([ckpt]) == [False]
    corrupted = snippet[:7] + bytes([snippet[7] ^ 0x01]) + snippet[8:]
    assert not any(corrupted in p.read_bytes() for p in tmp_path.glob("*.kvseg"))


def test_exact_eviction_order_keeps_prefix_heads(redis_url, redis_prefix):
    ckpts = {p: keys_for(TOKENS, p)[0] for p in POSITIONS}
    _, blocks, _ = keys_for(TOKENS, 900)
    index_keys = [keys_for(TOKENS, p)[2] for p in POSITIONS]
    # deepest first, a checkpoint before the block ending at its position, index records last
    expected = [ckpts[900], blocks[6], blocks[5], blocks[4], ckpts[512], blocks[3], blocks[2],
                ckpts[300], blocks[1], blocks[0], ckpts[100], *index_keys]
    with service() as svc:
        svc.commit(TOKENS, states_for(TOKENS))
        assert svc.stack.device.lru_keys() == expected
        sizes = {k: r.num_bytes for k, r in zip(expected, svc.stack.device.get_many(expected))}
    budget = sum(sizes[k] for k in expected[4:])  # everything from ckpt 512 on fits
    with service(device_bytes=budget, redis_url=redis_url, redis_prefix=redis_prefix) as svc:
        gate = threading.Event()
        svc.stack.writer.submit(gate.wait)  # hold the Redis writes back for now
        svc.commit(TOKENS, states_for(TOKENS))
        assert svc.stack.device.lru_keys() == expected[4:]
        result = svc.lookup(TOKENS)
        assert_hit(result, TOKENS, 512)  # the device alone still serves a prefix
        assert result.checkpoint_tier == "device"
        gate.set()
        svc.flush()
        result = svc.lookup(TOKENS[:800] + [1, 2])
        assert_hit(result, TOKENS, 512)
        # a hit below promotes: the 900 checkpoint and its blocks come from Redis into the device
        result = svc.lookup(TOKENS + [1])
        assert_hit(result, TOKENS, 900)
        assert result.checkpoint_tier == "redis" and result.num_blocks_by_tier == {"redis": 3, "device": 4}
        assert svc.stack.device.lru_keys()[-8:] == [ckpts[900], *blocks[::-1]]
        assert svc.lookup(TOKENS).num_blocks_by_tier == {"device": 7}
        stats = svc.stats()
        # 4 used, and blocks 4 and 5 that the 802-token lookup prefetched (in the same read as its
        # index records) but did not need: its best checkpoint (512) came from the index
        assert stats.tiers["redis"].num_hits == 6 and stats.tiers["redis"].load_bytes_per_s > 0
        assert stats.tiers["device"].num_bytes <= budget


def test_fp8_storage_is_deterministic_across_tiers(redis_url, redis_prefix):
    lay = SyntheticLayout(dtype=torch.bfloat16)
    opts = dict(rates=lay.entry_rates, is_fp8=True, rope_dim=16, redis_url=redis_url, redis_prefix=redis_prefix)
    with service(**opts) as svc:
        svc.commit(TOKENS, states_for(TOKENS, lay=lay))
        svc.flush()
        from_device = svc.lookup(TOKENS)
    with service(device_bytes=0, **opts) as svc:
        from_redis = svc.lookup(TOKENS)
    assert from_redis.checkpoint_tier == "redis"
    assert bitwise_equal(from_device.state_tensors, from_redis.state_tensors)
    exact = synthetic_state(lay, TOKENS, 900)
    for name, tensor in from_redis.state_tensors.items():
        assert tensor.dtype == exact[name].dtype and tensor.shape == exact[name].shape
        if name.endswith((".window", ".comp.entries")):
            assert torch.equal(tensor[..., -16:], exact[name][..., -16:])
            assert (tensor.float() - exact[name].float()).abs().max() <= exact[name].float().abs().max() / 8
        else:
            assert torch.equal(tensor, exact[name])


def test_commit_does_not_wait_for_lower_tiers(redis_url, redis_prefix, redis_client):
    with service(redis_url=redis_url, redis_prefix=redis_prefix) as svc:
        gate = threading.Event()
        svc.stack.writer.submit(gate.wait)  # a stalled lower tier
        result = svc.commit(TOKENS, states_for(TOKENS))
        assert result.num_new_blocks == 7 and result.num_checkpoints == 4 and result.is_queued
        assert_hit(svc.lookup(TOKENS), TOKENS, 900)
        assert not list(redis_client.scan_iter(match=redis_prefix + "*"))
        gate.set()
        svc.flush()
        assert len(list(redis_client.scan_iter(match=redis_prefix + "*"))) == 7 + 4 + 4
        assert svc.commit(TOKENS, states_for(TOKENS)).num_new_blocks == 0


def test_commit_rejects_states_that_do_not_match():
    with service() as svc:
        with pytest.raises(ValueError):
            svc.commit(TOKENS[:200], {300: synthetic_state(LAY, TOKENS, 300)})
        with pytest.raises(ValueError):
            svc.commit(TOKENS, {301: synthetic_state(LAY, TOKENS, 300)})
        with pytest.raises(ValueError):
            service(block_tokens=64)
        with pytest.raises(ValueError):
            service(rates={"1.comp.entries": 3})
        assert svc.commit(TOKENS, {}).num_checkpoints == 0


def test_checkpoints_far_behind_the_end_of_a_long_lookup_are_found():
    from kvcache.service import INDEX_CHUNK_BLOCKS
    tokens = [int(t) for t in (np.arange(6000) * 7919 + 13) % 50000]
    other = [50001 + i % 1000 for i in range(3 * INDEX_CHUNK_BLOCKS * 128)]  # index read in 4 chunks
    with service() as svc:
        svc.commit(tokens, {p: synthetic_state(LAY, tokens, p) for p in (100, 5000)})
        calls = []  # index records per read (every read goes through `fetch`; the first one also
        fetch = svc.stack.fetch  # fetches the records a hit at the end would use)
        svc.stack.fetch = lambda keys, *args, **kw: (keys and calls.append(len(keys))) or fetch(keys, *args, **kw)
        assert_hit(svc.lookup(tokens[:5000] + other), tokens, 5000)
        assert len(calls) == 4 and max(calls) == INDEX_CHUNK_BLOCKS
        calls.clear()
        assert_hit(svc.lookup(tokens), tokens, 5000)
        # a hit near the end reads one chunk: the last block down to the key chain's anchor below it
        assert calls == [len(tokens) // 128 - (len(tokens) // 128 - 1) // GROUP_BLOCKS * GROUP_BLOCKS + 1]
