import logging
import os
import threading

import pytest
import torch

from kvcache.device_tier import DeviceTier
from kvcache.disk_tier import DiskTier
from kvcache.hierarchy import TierStack
from kvcache.record import Record, decode_record, encode_record
from kvcache.redis_tier import RedisTier
from kvcache.writer import BackgroundWriter

FP = "fingerprint"


def record(key: str, fill: float = 1.0, n: int = 250) -> Record:
    return Record("block", key, {"x": torch.full((n,), fill)})


def data(key: str, fill: float = 1.0, n: int = 250) -> bytes:
    return bytes(encode_record(record(key, fill, n), FP))


RECORD_BYTES = len(data("A"))


def make_tier(kind, budget, tmp_path, redis_url, redis_prefix):
    if kind == "device":
        return DeviceTier(budget)
    if kind == "redis":
        return RedisTier(redis_url, budget_bytes=budget, prefix=redis_prefix)
    return DiskTier(tmp_path / "disk", budget_bytes=budget)


def value(kind, key):
    return record(key) if kind == "device" else data(key)


@pytest.mark.parametrize("kind", ["device", "redis", "disk"])
def test_exact_lru_eviction_order(kind, tmp_path, redis_url, redis_prefix):
    budget = 3 * (1000 if kind == "device" else RECORD_BYTES)
    tier = make_tier(kind, budget, tmp_path, redis_url, redis_prefix)
    tier.put_many([(k, value(kind, k)) for k in "ABC"])
    assert tier.lru_keys() == ["A", "B", "C"]
    assert tier.get_many(["A"])[0] is not None
    assert tier.contains_many(["B", "C", "Z"]) == [True, True, False]  # no reordering
    assert tier.lru_keys() == ["B", "C", "A"]
    evicted = tier.put_many([("D", value(kind, "D"))], is_collecting_evicted=True)
    if kind != "disk":  # the bottom tier drops what it evicts
        assert [k for k, _ in evicted] == ["B"]
    assert tier.lru_keys() == ["C", "A", "D"]
    assert tier.get_many(["B"]) == [None]
    tier.touch_many(["C"])
    tier.put_many([("E", value(kind, "E")), ("F", value(kind, "F"))])
    assert tier.lru_keys() == ["C", "E", "F"]
    assert tier.num_bytes == budget
    oversized = record("G", n=2000) if kind == "device" else data("G", n=2000)
    assert tier.put_many([("G", oversized)], is_collecting_evicted=True) == []
    assert tier.lru_keys() == ["C", "E", "F"]
    tier.delete_many(["E", "missing"])
    assert tier.lru_keys() == ["C", "F"] and tier.get_many(["E"]) == [None]
    tier.close()


def test_redis_eviction_returns_values_and_deletes_keys(redis_url, redis_prefix, redis_client):
    tier = RedisTier(redis_url, budget_bytes=2 * RECORD_BYTES, prefix=redis_prefix)
    tier.put_many([("A", data("A", 1.0)), ("B", data("B", 2.0))])
    evicted = tier.put_many([("C", data("C", 3.0))], is_collecting_evicted=True)
    assert evicted == [("A", data("A", 1.0))]
    assert redis_client.exists(redis_prefix + "A") == 0 and redis_client.exists(redis_prefix + "C") == 1


def test_disk_index_is_rebuilt_on_restart_and_deletes_persist(tmp_path):
    directory = tmp_path / "disk"
    tier = DiskTier(directory, budget_bytes=1 << 20)
    tier.put_many([("A", data("A", 1.0)), ("B", data("B", 2.0))])
    tier.put_many([("C", data("C", 3.0))])
    tier.put_many([("A", data("A", 4.0))])  # a later copy wins
    tier.delete_many(["B"])
    tier.collect_garbage()
    restarted = DiskTier(directory, budget_bytes=1 << 20)
    assert restarted.lru_keys() == ["C", "A"]
    a, b, c = restarted.get_many(["A", "B", "C"])
    assert b is None
    assert torch.equal(decode_record(a, FP).tensors["x"], torch.full((250,), 4.0))
    assert torch.equal(decode_record(c, FP).tensors["x"], torch.full((250,), 3.0))
    blob = b"".join((directory / name).read_bytes() for name in restarted.segment_names())
    assert data("B", 2.0)[-200:] not in blob  # the deleted record left the files


def test_disk_garbage_collection_unlinks_and_compacts(tmp_path):
    tier = DiskTier(tmp_path, budget_bytes=1 << 20, max_small_segments=2)
    tier.put_many([("A", data("A"))])
    tier.put_many([("B", data("B"))])
    assert len(tier.segment_names()) == 2
    tier.put_many([("C", data("C"))])  # a third small segment: all three merge into one
    assert len(tier.segment_names()) == 1
    assert tier.lru_keys() == ["A", "B", "C"]  # relocation keeps the LRU order
    tier.delete_many(["A", "B", "C"])
    tier.collect_garbage()
    assert tier.segment_names() == [] and not list(tmp_path.glob("*.kvseg"))


def test_disk_drops_unreadable_segments_and_stale_temps(tmp_path, caplog):
    (tmp_path / "00000000000000000001-1-000000.kvseg").write_bytes(b"garbage")
    stale = tmp_path / ".00000000000000000002-1-000000.kvseg.999999999.tmp"
    stale.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="kvcache.disk_tier"):
        tier = DiskTier(tmp_path, budget_bytes=1 << 20)
    assert tier.segment_names() == [] and os.listdir(tmp_path) == []
    assert any("unreadable" in r.message for r in caplog.records)


def test_disk_sees_segments_written_by_another_instance(tmp_path):
    reader = DiskTier(tmp_path, budget_bytes=1 << 20)
    writer = DiskTier(tmp_path, budget_bytes=1 << 20)
    writer.put_many([("A", data("A"))])
    assert reader.contains_many(["A"]) == [True]
    assert reader.get_many(["A"])[0] is not None


def test_hits_are_promoted_up_and_evictions_move_down(tmp_path, redis_url, redis_prefix):
    device = DeviceTier(2 * 1000)
    redis_tier = RedisTier(redis_url, budget_bytes=1 << 20, prefix=redis_prefix)
    disk = DiskTier(tmp_path, budget_bytes=1 << 20)
    stack = TierStack([device, redis_tier, disk], FP)
    # promotion: a record only on disk moves into the device now and into Redis in the background
    disk.put_many([("P", data("P"))])
    (hit,) = stack.get_many(["P"])
    assert hit.tier == "disk" and device.contains_many(["P"]) == [True]
    stack.flush()
    assert redis_tier.contains_many(["P"]) == [True]
    assert stack.get_many(["P"])[0].tier == "device"
    # demotion: a record only on the device is written down when the device evicts it
    device.put_many([("Q", record("Q"))])
    assert device.lru_keys() == ["P", "Q"]
    stack.put_many([record("R")])
    assert device.lru_keys() == ["Q", "R"]
    stack.flush()
    assert redis_tier.contains_many(["R", "P", "Q"]) == [True, True, False]
    stack.put_many([record("T")])  # evicts Q, which no lower tier had
    stack.flush()
    assert device.lru_keys() == ["R", "T"]
    assert redis_tier.contains_many(["Q"]) == [True] and disk.contains_many(["Q"]) == [True]
    stats = stack.tier_stats()
    assert stats["disk"].num_hits == 1 and stats["device"].num_hits == 1
    stack.close()


def test_redis_evictions_move_down_to_disk(tmp_path, redis_url, redis_prefix):
    redis_tier = RedisTier(redis_url, budget_bytes=RECORD_BYTES, prefix=redis_prefix)
    disk = DiskTier(tmp_path, budget_bytes=1 << 20)
    stack = TierStack([DeviceTier(1 << 20), redis_tier, disk], FP)
    redis_tier.put_many([("X", data("X"))])  # in Redis only
    stack.put_many([record("Y")])
    stack.flush()
    assert redis_tier.lru_keys() == ["Y"]
    assert disk.contains_many(["X", "Y"]) == [True, True]
    stack.close()


def test_writer_never_blocks_and_survives_failures():
    writer = BackgroundWriter(max_pending_bytes=100)
    gate = threading.Event()
    done = []
    assert writer.submit(gate.wait, 60)
    assert writer.submit(lambda: done.append(1), 30)
    assert not writer.submit(lambda: done.append(2), 30)  # over budget: dropped, not blocked
    assert writer.submit(lambda: 1 / 0, 0)
    assert writer.submit(lambda: done.append(3), 0)
    assert not writer.flush(timeout=0.05)
    gate.set()
    assert writer.flush(timeout=5)
    assert done == [1, 3] and writer.num_dropped == 1 and writer.num_failed == 1
    writer.close()
