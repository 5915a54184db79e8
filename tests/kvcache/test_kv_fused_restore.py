"""The deferred restore's fused verify + copy (model_shards/byte_kernels.py, kvcache/restore.py):
each run record's bytes are read once, summed by colsum64's columns while they are copied into
the state's pages, and the record is verified from those sums.

The sums give checksum.py's colsum64 digest bit for bit (edge lengths, unaligned regions and
ranges); a change anywhere in a record's data region (copied or not) fails the check; a corrupt
record is still a failed load, deleted and counted, and the next lookup serves the intact prefix;
restores are bitwise; without a C compiler the numpy passes run (one warning) with the same
results."""

from __future__ import annotations

import ctypes
import random
import warnings

import numpy as np
import pytest
import torch

from kvcache import checksum, restore
from kvcache.keys import chain_hashes, span_key, token_array
from kvcache.record import Record, RecordError, decode_record, encode_record
from kvcache.service import KVCacheService
from kvcache.synthetic import bitwise_equal, synthetic_state
from kv_model_helpers import corrupt_stored, stores
from model_shards import byte_kernels
from test_kv_byte_restore import LAY, TOKENS, committed, is_one_run, pool, scattered

# lengths in words around every row-width edge: one row, 512/513 words (a page, the least width),
# widths above 513 (num_words > 512 * 513), partial last rows
EDGE_WORDS = [0, 1, 2, 7, 8, 9, 15, 16, 17, 511, 512, 513, 514, 1025, 1026, 1027, 513 * 4, 513 * 4 + 1,
              512 * 513 - 1, 512 * 513, 512 * 513 + 1, 300_001]


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def region_at(num_bytes: int, offset: int, seed: int) -> np.ndarray:
    """Random bytes whose first byte lies `offset` bytes past a 64-byte boundary."""
    rng = np.random.default_rng(seed)
    whole = rng.integers(0, 256, num_bytes + 128, dtype=np.uint8)
    start = (-address(whole)) % 64 + offset
    return whole[start:start + num_bytes]


def random_ranges(num_bytes: int, rnd: random.Random, count: int) -> list[tuple[int, int]]:
    """Up to `count` sorted, disjoint byte ranges [a, b) of a region (any alignment, some empty)."""
    cuts = sorted(rnd.randint(0, num_bytes) for _ in range(2 * count))
    return list(zip(cuts[::2], cuts[1::2]))


def fused(region: np.ndarray, ranges: list[tuple[int, int]], rnd: random.Random):
    """colsum64_copy of `region` copying `ranges` into fresh buffers at random misalignments;
    returns (sums, [(buffer, offset, a, b)])."""
    segments, outs = [], []
    for a, b in ranges:
        out = np.zeros(b - a + 32, dtype=np.uint8)
        offset = rnd.randint(0, 15)
        segments += [address(region) + a, b - a, address(out) + offset]
        outs.append((out, offset, a, b))
    num_words = region.nbytes // 8
    return byte_kernels.colsum64_copy(address(region), num_words, checksum.col_words(num_words), segments), outs


@pytest.fixture(scope="module", autouse=True)
def built():
    assert byte_kernels.is_available(), "the byte kernels did not build (is there a C compiler?)"


@pytest.mark.parametrize("num_words", EDGE_WORDS)
@pytest.mark.parametrize("offset", [0, 8, 3])
def test_the_fused_sums_give_the_colsum64_digest_bit_for_bit(num_words, offset):
    rnd = random.Random(num_words * 10 + offset)
    region = region_at(8 * num_words, offset, seed=num_words + offset)
    header = b"kind\0key\0fp"
    stored = checksum.compute("colsum64", header, region)
    for ranges in ([], [(0, region.nbytes)], random_ranges(region.nbytes, rnd, 1),
                   random_ranges(region.nbytes, rnd, 7), [(i, i + 1) for i in range(0, min(region.nbytes, 40), 3)]):
        sums, outs = fused(region, ranges, rnd)
        assert sums is not None
        assert checksum.verify_column_sums(stored, header, num_words, sums)
        width = checksum.col_words(num_words)
        assert "colsum64:" + checksum._colsum64_digest(header, num_words, width, sums) == stored
        for out, at, a, b in outs:   # every range copied exactly, nothing around it written
            assert np.array_equal(out[at:at + b - a], region[a:b])
            assert not out[:at].any() and not out[at + b - a:].any()


@pytest.mark.parametrize("num_words", [1, 513, 1030, 512 * 513 + 5])
def test_a_change_anywhere_in_the_region_fails_the_check(num_words):
    rnd = random.Random(num_words)
    region = region_at(8 * num_words, 0, seed=num_words).copy()
    stored = checksum.compute("colsum64", b"h", region)
    ranges = [(8, region.nbytes // 2)] if num_words > 2 else []   # some bytes copied, some not
    for position in {0, region.nbytes - 1, region.nbytes // 2, min(8, region.nbytes - 1), rnd.randrange(region.nbytes)}:
        region[position] ^= 0x10
        sums, _ = fused(region, ranges, rnd)
        assert not checksum.verify_column_sums(stored, b"h", num_words, sums)
        region[position] ^= 0x10
    sums, _ = fused(region, ranges, rnd)
    assert checksum.verify_column_sums(stored, b"h", num_words, sums)
    assert not checksum.verify_column_sums(stored, b"other header", num_words, sums)
    assert not checksum.verify_column_sums("rowcol64:" + stored.partition(":")[2], b"h", num_words, sums)


@pytest.mark.parametrize("bad", ["past_the_end", "before_the_start", "overlapping", "unsorted", "negative"])
def test_bad_ranges_write_nothing(bad):
    region = region_at(8 * 600, 0, seed=1)
    out = np.zeros(8 * 600, dtype=np.uint8)
    base, dst = address(region), address(out)
    segments = {"past_the_end": [base + 8, 8 * 600, dst],
                "before_the_start": [base - 8, 16, dst],
                "overlapping": [base, 64, dst, base + 32, 64, dst + 64],
                "unsorted": [base + 128, 8, dst, base, 8, dst + 8],
                "negative": [base, -8, dst]}[bad]
    assert byte_kernels.colsum64_copy(base, 600, checksum.col_words(600), segments) is None
    assert not out.any()


@pytest.mark.parametrize("as_arrays", [False, True])
def test_many_records_in_one_call_give_each_record_its_own_sums(as_arrays):
    """`colsum64_copy_many`: each record's sums are `colsum64_copy`'s, one after another; each
    record's ranges are copied exactly (lists or int64 arrays in)."""
    rnd = random.Random(7)
    records, segments, expected, outs = [], [], [], []
    for i, num_words in enumerate([1, 513, 1030, 9, 512 * 513 + 5, 0]):
        region = region_at(8 * num_words, i % 3 * 8, seed=i)
        width = checksum.col_words(num_words)
        ranges = random_ranges(region.nbytes, rnd, 3)
        sums, _ = fused(region, ranges, rnd)
        expected.append(np.frombuffer(sums, dtype=np.uint64))
        record_segments = []
        for a, b in ranges:
            out = np.zeros(b - a + 16, dtype=np.uint8)
            record_segments += [address(region) + a, b - a, address(out) + 8]
            outs.append((out, region, a, b))
        records += [address(region), num_words, width, len(ranges)]
        segments += record_segments
    if as_arrays:
        records, segments = np.array(records, dtype=np.int64), np.array(segments, dtype=np.int64)
    sums = byte_kernels.colsum64_copy_many(records, segments)
    assert sums is not None and sums.dtype == np.uint64
    assert np.array_equal(sums, np.concatenate(expected))
    for out, region, a, b in outs:
        assert np.array_equal(out[8:8 + b - a], region[a:b]) and not out[:8].any() and not out[8 + b - a:].any()


def test_one_record_with_bad_ranges_writes_nothing_of_any_record():
    good = region_at(8 * 600, 0, seed=1)
    bad = region_at(8 * 600, 0, seed=2)
    out = np.zeros(8 * 1200, dtype=np.uint8)
    width = checksum.col_words(600)
    records = [address(good), 600, width, 1, address(bad), 600, width, 1]
    segments = [address(good), 8 * 600, address(out), address(bad) + 8, 8 * 600, address(out) + 8 * 600]
    assert byte_kernels.colsum64_copy_many(records, segments) is None   # (the second one's ends past its region)
    assert not out.any()
    assert byte_kernels.colsum64_copy_many([address(good), 600, 0, 0], []) is None   # (a width of 0)
    assert byte_kernels.colsum64_copy_many([address(good), 600, width, 2], [address(good), 8, address(out)]) is None


@pytest.mark.parametrize("num_threads", [2, 3, 4, 16, 100])
def test_records_shared_out_over_threads_give_each_record_its_own_sums(num_threads):
    """With threads, whole records go to each thread (consecutive, about equal bytes, >= 1 MiB a
    thread): every record's sums and copies are still exactly its single-threaded ones, also
    with more threads than records and records of very different sizes."""
    rnd = random.Random(num_threads)
    mib_words = (1 << 20) // 8
    records, segments, expected, outs = [], [], [], []
    for i, num_words in enumerate([3 * mib_words + 5, 1, 0, mib_words // 3, 2 * mib_words + 513, 513, mib_words + 7]):
        region = region_at(8 * num_words, i % 3 * 8, seed=100 + i)
        ranges = random_ranges(region.nbytes, rnd, 4)
        sums, _ = fused(region, ranges, rnd)
        expected.append(np.frombuffer(sums, dtype=np.uint64))
        for a, b in ranges:
            out = np.zeros(b - a + 16, dtype=np.uint8)
            segments += [address(region) + a, b - a, address(out) + 8]
            outs.append((out, region, a, b))
        records += [address(region), num_words, checksum.col_words(num_words), len(ranges)]
    spare = np.zeros(64, dtype=np.uint8)   # one more record, whose range ends past its region
    bad = byte_kernels.colsum64_copy_many(records + [address(spare), 1, 1, 1], segments + [address(spare), 16, 0],
                                          num_threads)
    assert bad is None and not any(out.any() for out, _, _, _ in outs)   # nothing of any record written
    sums = byte_kernels.colsum64_copy_many(np.array(records, dtype=np.int64), np.array(segments, dtype=np.int64),
                                           num_threads)
    assert sums is not None and np.array_equal(sums, np.concatenate(expected))
    for out, region, a, b in outs:
        assert np.array_equal(out[8:8 + b - a], region[a:b]) and not out[:8].any() and not out[8 + b - a:].any()


@pytest.mark.parametrize("num_threads", [1, 2, 3, 16])
@pytest.mark.parametrize("as_array", [False, True])
def test_plain_copies_cut_over_threads_copy_every_byte_once(num_threads, as_array):
    """`copy_segments` with threads: the bytes are cut into equal parts (segments split where a
    part ends, >= 1 MiB a part): every segment lands exactly, nothing around it is written."""
    rnd = random.Random(num_threads)
    mib = 1 << 20
    segments, outs = [], []
    for i, num_bytes in enumerate([3 * mib + 5, 1, 0, mib // 3, 2 * mib + 513, 7, mib + 7]):
        source = region_at(num_bytes, i % 3, seed=200 + i)
        out = np.zeros(num_bytes + 32, dtype=np.uint8)
        at = rnd.randint(0, 15)
        segments += [address(source), num_bytes, address(out) + at]
        outs.append((out, at, source))
    byte_kernels.copy_segments(np.array(segments, dtype=np.int64) if as_array else segments, num_threads)
    for out, at, source in outs:
        n = source.nbytes
        assert np.array_equal(out[at:at + n], source) and not out[:at].any() and not out[at + n:].any()


def test_a_record_verifies_from_column_sums():
    record = Record("span", "k", {"a": torch.arange(3000, dtype=torch.float32).view(-1, 10),
                                  "b": torch.ones(7, 3, dtype=torch.float16)})
    data = encode_record(record, "fp")
    decoded = decode_record(data, "fp", expected_key="k", is_borrowed=True, verify=False)
    base, num_words, width = decoded.fused_check()
    assert num_words == decoded._raw.nbytes // 8 and width == checksum.col_words(num_words)
    sums = byte_kernels.colsum64_copy(base, num_words, width, [])
    wrong = (ctypes.c_uint64 * width)(*sums)
    wrong[5] = (wrong[5] + 1) % (1 << 64)
    with pytest.raises(RecordError):
        decode_record(data, "fp", is_borrowed=True, verify=False).verify(wrong)
    decoded.verify(sums)
    assert decoded.is_verified and decoded.fused_check() is None
    assert torch.equal(decoded.tensors["a"], record.tensors["a"])
    other = decode_record(encode_record(record, "fp", checksum="rowcol64"), "fp", is_borrowed=True, verify=False)
    assert other.fused_check() is None   # another algorithm: its own pass
    assert decoded.slot_addresses() == {name: base + slot[0] for name, slot in decoded._slots.items()}


class Counting:
    """Counts calls of a module function (and passes them on), keeping their arguments."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls = 0
        self.args: list[tuple] = []
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            self.args.append(args)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("tier", ["redis", "disk"])
@pytest.mark.parametrize("max_tokens, position", [(None, 1000), (750, 700)])   # (750: span 2 cut to a block)
@pytest.mark.parametrize("pages", ["one_run", "scattered"])
def test_the_fused_load_reads_each_run_record_once_and_is_bitwise(tier, max_tokens, position, pages, tmp_path,
                                                                  redis_url, redis_prefix, monkeypatch):
    with committed(stores(tier, redis_url, redis_prefix, tmp_path)) as svc:
        hit = svc.lookup(TOKENS, max_tokens=max_tokens, is_deferred=True)
        assert hit.num_cached_tokens == position
        p = pool()
        holders = scattered(p) if pages == "scattered" else []
        state = p.new_state()
        fused_calls = Counting(monkeypatch, byte_kernels, "colsum64_copy_many")
        numpy_passes = Counting(monkeypatch, checksum, "_colsum64")
        assert hit.load_into(state)
        assert fused_calls.calls == 1 and numpy_passes.calls == 0   # every run in one kernel call
        assert len(fused_calls.args[0][0]) == 4 * hit.deferred.num_runs
        assert all(h.pending is None for h in hit.deferred.runs)   # verified (and promoted)
        assert is_one_run(state.page_ids[4]) == (pages == "one_run")
        assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, position))
        assert svc.stats().tiers[tier].num_corrupt == 0
        del holders


@pytest.mark.parametrize("restore_threads", [None, 1, 3])
def test_the_fused_load_uses_the_services_restore_threads_and_is_bitwise(restore_threads, tmp_path, monkeypatch):
    """`restore_threads` (None: min(4, usable CPUs)) reaches the kernel, for a lookup and for
    the replays of its restore plan; the restored state is the same."""
    import os
    default_threads = min(4, len(os.sched_getaffinity(0)))
    expected_threads = restore_threads or default_threads
    with committed({"disk_dir": tmp_path}) as writer:
        assert writer.config.restore_threads is None and writer.config.num_restore_threads == default_threads
    with KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, device_bytes=0, disk_dir=tmp_path,
                        restore_threads=restore_threads) as svc:
        fused_calls = Counting(monkeypatch, byte_kernels, "colsum64_copy_many")
        for _ in range(3):   # the lookup, then replays of its plan
            hit = svc.lookup(TOKENS, is_deferred=True)
            assert hit.deferred.num_threads == expected_threads
            state = pool().new_state()
            assert hit.load_into(state)
            assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 1000))
        assert svc._plans.num_replays == 2
        assert [args[2] for args in fused_calls.args] == [expected_threads] * 3


def test_restore_threads_must_be_a_positive_int():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="restore_threads"):
            KVCacheService(LAY.entry_rates, "fp", restore_threads=bad)


def test_a_verified_run_record_is_copied_without_a_second_check(tmp_path, monkeypatch):
    """Runs already verified (device tier: tensors; or settled before) are plain copies."""
    with committed({"disk_dir": tmp_path}) as svc:
        hit = svc.lookup(TOKENS, is_deferred=True)
        for run in hit.deferred.runs:
            assert svc.stack.settle(run)
        fused_calls = Counting(monkeypatch, byte_kernels, "colsum64_copy_many")
        state = pool().new_state()
        assert hit.load_into(state)
        assert fused_calls.calls == 0
        assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 1000))


def corrupt_data_byte(disk_dir, key: str, where: str) -> None:
    """Flip one bit of record `key`'s data region on disk (a corrupted later copy): its first or
    last byte (the last: in rows a cut span does not copy, or padding)."""
    from kvcache.disk_tier import DiskTier
    disk = DiskTier(disk_dir, budget_bytes=1 << 30)
    value = np.frombuffer(bytes(disk.get_many([key])[0]), dtype=np.uint8)
    raw = decode_record(value, "fp", expected_key=key, is_borrowed=True)._raw
    start = address(raw) - address(value)
    data = bytearray(value.tobytes())
    data[start if where == "first" else start + raw.nbytes - 1] ^= 0x10
    disk.put_many([(key, bytes(data))])
    disk.close()


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("max_tokens, position", [(None, 1000), (750, 700)])
def test_a_corrupt_record_is_caught_by_the_fused_pass_and_deleted(where, max_tokens, position, tmp_path, monkeypatch):
    svc = committed({"disk_dir": tmp_path})
    hashes = chain_hashes(token_array(TOKENS), 128, "fp", None, len(TOKENS) // 128)
    key = span_key(hashes[6], 2)   # blocks [4, 6): run 2 (cut to block 4 at 700)
    corrupt_data_byte(tmp_path, key, where)
    with svc:
        hit = svc.lookup(TOKENS, max_tokens=max_tokens, is_deferred=True)
        assert hit.num_cached_tokens == position
        fused_calls = Counting(monkeypatch, byte_kernels, "colsum64_copy_many")
        p = pool()
        assert not hit.load_into(p.new_state())   # a miss, never a wrong state
        assert fused_calls.calls == 1              # every run copied and summed in one call, then:
        assert [run.pending is None for run in hit.deferred.runs] == [True, True] + [False] * (
            hit.deferred.num_runs - 2)             # runs 0 and 1 intact, run 2 caught, the rest unsettled
        svc.flush()
        assert svc.stats().tiers["disk"].num_corrupt == 1
        assert svc.stack.tiers[1].contains_many([key]) == [False]
        again = svc.lookup(TOKENS, max_tokens=max_tokens, is_deferred=True)
        assert again.num_cached_tokens == 700      # block 5 exists nowhere else; block 4 as a single
        state = p.new_state()
        assert again.load_into(state)
        assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 700))


@pytest.mark.parametrize("tier", ["redis", "disk"])
def test_without_a_compiler_the_numpy_passes_restore_the_same_and_warn_once(tier, tmp_path, monkeypatch, redis_url,
                                                                            redis_prefix, redis_client):
    monkeypatch.setenv("DSV4_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", "false")                           # a "compiler" that always fails
    byte_kernels._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not restore._fused_enabled() and not byte_kernels.is_available()
            store = stores(tier, redis_url, redis_prefix, tmp_path / "store")
            svc = committed(store)
            numpy_passes = Counting(monkeypatch, checksum, "_colsum64")
            hit = svc.lookup(TOKENS, is_deferred=True)
            p = pool()
            state = p.new_state()
            assert hit.load_into(state)
            assert numpy_passes.calls >= hit.deferred.num_runs
            assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 1000))
            hashes = chain_hashes(token_array(TOKENS), 128, "fp", None, len(TOKENS) // 128)
            key = span_key(hashes[4], 2)   # blocks [2, 4): no single-block records
            corrupt_stored(tier, key, redis_client, redis_prefix, tmp_path / "store")
            with svc:
                assert not svc.lookup(TOKENS, is_deferred=True).load_into(p.new_state())
                svc.flush()
                assert svc.stats().tiers[tier].num_corrupt == 1
                again = svc.lookup(TOKENS, is_deferred=True)
                assert again.num_cached_tokens == 256 and again.load_into(state := p.new_state())
                assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 256))
        assert sum("byte kernels unavailable" in str(c.message) for c in caught) == 1
    finally:
        byte_kernels._library.cache_clear()
