"""Cold reads of disk segments: the layout the disk tier writes (records in the order a restore
reads them, their LRU order kept in the segment's ``kv.lru_rows`` metadata), the readahead of
`prefetch_segments` (heads first, then whole records in the background), and what a restore
from an evicted segment gives: the state bitwise, in the new layout and in the layout older
writers left (rows in LRU order, no metadata); a record corrupted on disk and read cold is a
miss, deleted and counted, never a wrong state."""

from __future__ import annotations

import mmap
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from kvcache import segments
from kvcache.disk_tier import DiskTier, restore_order
from kvcache.keys import chain_hashes, span_key, token_array
from kvcache.segments import (
    HEAD_BYTES, LRU_ROWS, SEGMENT_SCHEMA, SegmentReader, new_segment_name, page_cache_fraction,
    wait_for_readahead, write_segment,
)
from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state
from model_shards.random_checkpoint import PRESETS
from model_shards.state_pool import StatePool

CFG = PRESETS["tiny"]
LAY = SyntheticLayout.from_model_config(CFG)
TOKENS = [int(t) for t in (np.arange(1000) * 7919 + 13) % 50000]
POSITIONS = (256, 512, 700, 1000)


def commit(directory) -> None:
    with KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, disk_dir=directory) as writer:
        writer.commit(TOKENS, {p: synthetic_state(LAY, TOKENS, p) for p in POSITIONS})
        writer.flush()


def reader_service(directory) -> KVCacheService:
    return KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, device_bytes=0, disk_dir=directory)


def file_keys(path) -> list[str]:
    """The segment's keys in file (row) order."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all().column("key").to_pylist()


def as_old_layout(directory, into) -> None:
    """Rewrite the segments of `directory` into `into` the way writers before the restore
    layout did: rows in LRU order, no ``kv.lru_rows``."""
    into.mkdir()
    disk = DiskTier(directory, budget_bytes=1 << 30)
    keys = disk.lru_keys()
    write_segment(into, new_segment_name(), list(zip(keys, (bytes(v) for v in disk.get_many(keys)))))
    disk.close()


def restore(svc, position: int = 1000) -> dict:
    hit = svc.lookup(TOKENS, is_deferred=True)
    assert hit.num_cached_tokens == position and hit.checkpoint_tier == "disk"
    state = StatePool(CFG, torch.float32, "cpu", num_slots=1, page_size=4, num_pages=8).new_state()
    assert hit.load_into(state)
    return state.export()


def evict(disk: DiskTier, path) -> None:
    disk.drop_cached_pages()
    if page_cache_fraction(path) > 0.5:
        pytest.skip("this file system keeps the file in memory (tmpfs?)")
    assert page_cache_fraction(path) == 0.0


def test_a_committed_segment_is_laid_out_in_restore_order_and_keeps_its_lru_order(tmp_path):
    commit(tmp_path)
    disk = DiskTier(tmp_path, budget_bytes=1 << 30)
    (name,) = disk.segment_names()
    lru = disk.lru_keys()
    in_file = file_keys(tmp_path / name)
    assert in_file == [lru[i] for i in restore_order(lru)]
    kinds = "".join(key[0] for key in in_file)
    assert kinds.startswith("i" * kinds.count("i") + "c" * len(POSITIONS))   # index records, checkpoints, runs
    hashes = chain_hashes(token_array(TOKENS), 128, "fp", None, len(TOKENS) // 128)
    spans = [span_key(hashes[2 * (j + 1)], 2) for j in range(3)]   # blocks [0, 2), [2, 4), [4, 6)
    assert [in_file.index(key) for key in spans] == sorted(in_file.index(key) for key in spans)  # head first
    assert [lru.index(key) for key in spans] == sorted((lru.index(key) for key in spans), reverse=True)  # head last
    assert lru[-1].startswith("i")                                  # the commit puts index records last
    assert DiskTier(tmp_path, budget_bytes=1 << 30).lru_keys() == lru   # a restart rebuilds the same order


def test_restore_order_puts_index_then_checkpoints_then_runs_most_recent_first():
    keys = ["c1", "s1", "b2", "i1", "s3", "c2", "i2", "x"]
    assert [keys[i] for i in restore_order(keys)] == ["i1", "i2", "c1", "c2", "x", "s3", "b2", "s1"]
    assert restore_order([]) == []


@pytest.mark.parametrize("layout", ["restore", "old"])
def test_a_cold_restore_is_the_warm_restore_bitwise(layout, tmp_path):
    commit(tmp_path / "new")
    directory = tmp_path / "new" if layout == "restore" else tmp_path / "old"
    if layout == "old":
        as_old_layout(tmp_path / "new", directory)
    (path,) = directory.glob("*.kvseg")
    expected = synthetic_state(LAY, TOKENS, 1000)
    with reader_service(directory) as svc:
        disk = svc.stack.tiers[-1]
        if layout == "old":   # no metadata: the LRU order is the file order, as it was
            assert disk.lru_keys() == file_keys(path)
        warm = restore(svc)          # (the segment was just written: in memory)
        assert bitwise_equal(warm, expected)
        for _ in range(2):
            evict(disk, path)
            cold = restore(svc)
            assert bitwise_equal(cold, warm)
            assert page_cache_fraction(path) > 0.3   # (the records of a hit at 1000: ~46% of the file)
        assert svc.stats().tiers["disk"].num_corrupt == 0


def test_prefetch_reads_every_head_first_then_the_records_in_the_background(tmp_path):
    commit(tmp_path)
    disk = DiskTier(tmp_path, budget_bytes=1 << 30)
    (name,) = disk.segment_names()
    path = tmp_path / name
    keys = disk.lru_keys()
    disk.get_many(keys)
    reader = disk._readers[name]
    evict(disk, path)
    ranges = reader.ranges(disk.get_many(keys))   # cold: heads are in memory when it returns
    probe = np.zeros(1, dtype=np.uint8)
    base = reader._whole.address
    for start, _ in ranges:
        page = start - start % mmap.PAGESIZE
        assert segments._libc().mincore(base + page, 1, probe.ctypes.data) == 0 and probe[0] & 1
    wait_for_readahead()   # then the whole records were asked for
    deadline = time.monotonic() + 10
    while page_cache_fraction(path) < 0.9 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert page_cache_fraction(path) >= 0.9
    assert reader.prefetch(disk.get_many(keys)) == 0   # in memory: nothing asked
    assert HEAD_BYTES >= mmap.PAGESIZE
    disk.close()


@pytest.mark.parametrize("layout", ["restore", "old"])
@pytest.mark.parametrize("where", ["data", "head"])
def test_a_record_corrupted_on_disk_and_read_cold_is_a_miss_and_deleted(layout, where, tmp_path):
    commit(tmp_path / "new")
    directory = tmp_path / "new" if layout == "restore" else tmp_path / "old"
    if layout == "old":
        as_old_layout(tmp_path / "new", directory)
    (path,) = directory.glob("*.kvseg")
    hashes = chain_hashes(token_array(TOKENS), 128, "fp", None, len(TOKENS) // 128)
    key = span_key(hashes[4], 2)   # blocks [2, 4): run 1 of a hit at 1000
    disk = DiskTier(directory, budget_bytes=1 << 30)
    (value,) = disk.get_many([key])
    reader = disk._readers[path.name]
    ((start, end),) = reader.ranges([value])
    del value, reader, disk   # (a mapping that touched pages keeps them in memory)
    offset = start + (100 if where == "head" else (end - start) // 2)   # the framing, or tensor bytes
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    with reader_service(directory) as svc:
        disk = svc.stack.tiers[-1]
        evict(disk, path)
        hit = svc.lookup(TOKENS, is_deferred=True)
        state = StatePool(CFG, torch.float32, "cpu", num_slots=1, page_size=4, num_pages=8).new_state()
        if where == "data":   # found by the load's checksum pass: the load fails
            assert hit.num_cached_tokens == 1000 and not hit.load_into(state)
        else:                 # found by the decode: the lookup never uses it
            assert hit.num_cached_tokens == 256
        svc.flush()
        assert svc.stats().tiers["disk"].num_corrupt == 1
        assert disk.contains_many([key]) == [False]
        (path,) = directory.glob("*.kvseg")   # (rewritten without the deleted record)
        assert key not in file_keys(path)
        evict(disk, path)   # blocks 2-3 exist nowhere else: the intact prefix, cold, bitwise
        assert bitwise_equal(restore(svc, 256), synthetic_state(LAY, TOKENS, 256))


def test_garbage_collection_keeps_the_lru_order_and_lays_out_in_restore_order(tmp_path):
    tier = DiskTier(tmp_path, budget_bytes=1 << 30, max_small_segments=2)
    tier.put_many([("c1", b"x" * 64), ("s1", b"y" * 64)])
    tier.put_many([("s2", b"z" * 64), ("i1", b"w" * 64)])
    tier.get_many(["s1"])   # most recently used now
    tier.put_many([("b3", b"v" * 64)])   # a third small segment: all three merge into one
    (name,) = tier.segment_names()
    lru = ["c1", "s2", "i1", "s1", "b3"]
    assert tier.lru_keys() == lru
    assert file_keys(tmp_path / name) == ["i1", "c1", "b3", "s1", "s2"]
    assert DiskTier(tmp_path, budget_bytes=1 << 30).lru_keys() == lru
    assert [bytes(v) for v in tier.get_many(lru)] == [b"x" * 64, b"z" * 64, b"w" * 64, b"y" * 64, b"v" * 64]


def test_lru_rows_metadata_is_checked(tmp_path):
    items = [("a", b"1" * 8), ("b", b"2" * 8), ("c", b"3" * 8)]
    with pytest.raises(ValueError):
        write_segment(tmp_path, new_segment_name(), items, lru_rows=[0, 0, 1])
    name = new_segment_name()
    write_segment(tmp_path, name, items, lru_rows=[2, 0, 1])
    assert [row.key for row in SegmentReader(tmp_path / name).scan()] == ["c", "a", "b"]
    for bad in (b"0,0,1", b"0,1", b"x", b""):   # not a permutation of the rows: file order
        schema = SEGMENT_SCHEMA.with_metadata({LRU_ROWS: bad})
        path = tmp_path / new_segment_name()
        batch = pa.record_batch([pa.array([k for k, _ in items]), pa.array([v for _, v in items], pa.large_binary())],
                                schema=schema)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
        assert [row.key for row in SegmentReader(path).scan()] == ["a", "b", "c"]
