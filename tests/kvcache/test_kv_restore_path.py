"""The restore path's pieces: the colsum64 checksum, deferred verification (a record is checked
right before its bytes are copied, and a corrupt one is still a miss, deleted, and looked for
below), stale format versions, the lazy key chain, the byte-copy assembly and the buffer pool."""

import numpy as np
import pytest
import torch

import kvcache.record as record_module
from kvcache import checksum, layout
from kvcache.disk_tier import DiskTier
from kvcache.keys import (
    GROUP_BLOCKS, ChainHashes, chain_hashes, checkpoint_key, span_key, token_array, token_width,
)
from kvcache.memory import BufferPool
from kvcache.record import Record, RecordError, decode_record, encode_record
from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state

LAY = SyntheticLayout()
FP = "restore-path-fp"
TOKENS = [int(t) for t in (np.arange(9000) * 7919 + 13) % 50000]
POSITION = 8800  # two full 4096-token spans, then single blocks


def service(**kwargs):
    return KVCacheService(LAY.entry_rates, FP, **kwargs)


def words(num_words: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, num_words, dtype=np.uint64)


def colsum(array: np.ndarray) -> str:
    return checksum.compute("colsum64", b"header", memoryview(array.view(np.uint8)))


# -- colsum64 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_words", [0, 1, 2, 512, 513, 514, 5000, 300_000])
def test_colsum64_row_width_is_odd_and_spans_a_page(num_words):
    width = checksum.col_words(num_words)
    assert width % 2 == 1 and width >= checksum.MIN_COL_WORDS > 512 and width * 512 >= num_words


@pytest.mark.parametrize("num_words", [1, 17, 513, 2000, 40_000])
def test_colsum64_detects_single_words_short_runs_and_two_or_three_words(num_words):
    rng = np.random.default_rng(num_words)
    data = words(num_words, num_words)
    reference = colsum(data)
    width = checksum.col_words(num_words)
    assert colsum(data[:-1]) != reference or num_words == 0  # truncated
    assert checksum.compute("colsum64", b"other", memoryview(data.view(np.uint8))) != reference
    for trial in range(300):
        changed = data.copy()
        if trial % 3 == 0:  # a run of up to one row width of consecutive words, all changed
            start = int(rng.integers(0, num_words))
            stop = min(num_words, start + int(rng.integers(1, width + 1)))
            changed[start:stop] ^= rng.integers(1, 2**63, stop - start, dtype=np.uint64)
        else:  # two or three words anywhere (never all in one column), bit flips or new values
            positions = rng.choice(num_words, size=min(num_words, 2 + trial % 2), replace=False)
            if len(positions) > 1 and len({int(p) % width for p in positions}) == 1:
                continue
            for position in positions:
                flip = np.uint64(1) << np.uint64(trial % 64)
                changed[position] ^= flip if trial % 2 else rng.integers(1, 2**63, dtype=np.uint64)
        assert colsum(changed) != reference


def test_colsum64_detects_swapped_and_misplaced_pages():
    data = words(64 * 512, 3)  # 64 pages of 4 KiB
    reference = colsum(data)
    pages = data.reshape(64, 512)
    for a, b in [(0, 1), (3, 40), (10, 63)]:
        swapped = pages.copy()
        swapped[[a, b]] = swapped[[b, a]]
        assert colsum(swapped.reshape(-1)) != reference
        misplaced = pages.copy()
        misplaced[a] = pages[b]  # a page written where another belongs
        assert colsum(misplaced.reshape(-1)) != reference


def test_colsum64_misses_only_cancelling_changes_within_one_column():
    """The documented blind spot (what rowcol64 would catch): two words a row width apart
    exchanged."""
    data = words(4000, 4)
    width = checksum.col_words(len(data))
    swapped = data.copy()
    swapped[[7, 7 + width]] = swapped[[7 + width, 7]]
    assert colsum(swapped) == colsum(data)
    assert checksum.compute("rowcol64", b"header", memoryview(swapped.view(np.uint8))) != \
        checksum.compute("rowcol64", b"header", memoryview(data.view(np.uint8)))


# -- records: deferred verification, stale versions ------------------------------------------

def span_record(key="s1"):
    tensors = {"a": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(3, 5).bfloat16()}
    return Record("span", key, tensors), tensors


def test_deferred_verification_runs_before_the_bytes_are_used():
    rec, tensors = span_record()
    data = bytearray(encode_record(rec, FP))
    lazy = decode_record(bytes(data), FP, expected_key="s1", is_borrowed=True, verify=False)
    assert not lazy.is_verified and lazy.num_bytes == rec.num_bytes
    assert bitwise_equal(lazy.tensors, tensors) and lazy.is_verified  # the accessor verified it
    position = bytes(data).find(tensors["a"][10].numpy().tobytes())
    data[position] ^= 0x04  # inside tensor "a"
    corrupt = decode_record(bytes(data), FP, expected_key="s1", is_borrowed=True, verify=False)
    views = corrupt.byte_views(verify=False)  # shapes and places, no check yet
    assert views["a"][2] == (64, 64)
    for use in (corrupt.verify, lambda: corrupt.tensors, corrupt.byte_views, corrupt.owned):
        with pytest.raises(RecordError, match="checksum"):
            use()
    with pytest.raises(RecordError, match="checksum"):
        decode_record(bytes(data), FP, expected_key="s1", is_borrowed=True)


@pytest.mark.parametrize("algorithm", checksum.ALGORITHMS)
def test_every_algorithm_round_trips_and_catches_a_flipped_byte(algorithm):
    rec, tensors = span_record()
    data = bytearray(encode_record(rec, FP, checksum=algorithm))
    assert bitwise_equal(decode_record(bytes(data), FP, verify=False, is_borrowed=True).tensors, tensors)
    data[bytes(data).find(tensors["a"][3].numpy().tobytes()) + 1] ^= 0x80
    with pytest.raises(RecordError):
        decode_record(bytes(data), FP, is_borrowed=True, verify=False).verify()


def encode_as_version(record, version, monkeypatch):
    monkeypatch.setattr(record_module, "FORMAT_VERSION", version)
    try:
        return bytes(encode_record(record, FP, checksum="rowcol64"))
    finally:
        monkeypatch.undo()


# -- the service: corrupt, stale and misfiled records under deferred verification -------------

def commit_all(**stores):
    with service(**stores) as svc:
        svc.commit(TOKENS, {p: synthetic_state(LAY, TOKENS, p) for p in (4096, POSITION)})
        svc.flush()
        return {key: svc.stack.device.get_many([key])[0] for key in svc.stack.device.lru_keys()}


def span_keys(records):
    """The keys of the two spans, in token order."""
    hashes = chain_hashes(token_array(TOKENS), 128, FP, None, 64)
    keys = [span_key(hashes[32], 32), span_key(hashes[64], 32)]
    assert all(records[key].kind == "span" for key in keys)
    return keys


def corrupt_value(value: bytes) -> bytes:
    data = bytearray(value)
    data[len(data) // 2] ^= 0x10  # inside the tensor bytes of a span
    return bytes(data)


def test_a_corrupt_span_in_redis_is_deleted_and_read_from_disk_instead(tmp_path, redis_url, redis_prefix, redis_client):
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=tmp_path)
    key = span_keys(commit_all(**stores))[1]
    redis_client.set(redis_prefix + key, corrupt_value(redis_client.get(redis_prefix + key)))
    with service(device_bytes=0, **stores) as svc:
        result = svc.lookup(TOKENS)
        assert result.num_cached_tokens == POSITION  # the disk copy served the span
        assert bitwise_equal(result.state_tensors, synthetic_state(LAY, TOKENS, POSITION))
        assert result.num_blocks_by_tier == {"redis": 32 + 4, "disk": 32}
        assert svc.stats().tiers["redis"].num_corrupt == 1
        svc.flush()  # the disk hit is written back up to Redis
    decode_record(redis_client.get(redis_prefix + key), FP, expected_key=key).verify()  # the intact copy
    with service(device_bytes=0, redis_url=redis_url, redis_prefix=redis_prefix) as svc:
        assert svc.lookup(TOKENS).num_blocks_by_tier == {"redis": 68}


@pytest.mark.parametrize("tier", ["redis", "disk"])
@pytest.mark.parametrize("algorithm", checksum.ALGORITHMS)
def test_a_corrupt_span_is_a_miss_and_deleted_under_every_checksum(tier, algorithm, tmp_path, redis_url,
                                                                    redis_prefix, redis_client):
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix) if tier == "redis" else dict(disk_dir=tmp_path)
    key = span_keys(commit_all(checksum=algorithm, **stores))[1]  # blocks [32, 64)
    if tier == "redis":
        redis_client.set(redis_prefix + key, corrupt_value(redis_client.get(redis_prefix + key)))
    else:
        value = bytes(DiskTier(tmp_path, budget_bytes=1 << 30).get_many([key])[0])
        DiskTier(tmp_path, budget_bytes=1 << 30).put_many([(key, corrupt_value(value))])  # a later copy wins
    with service(device_bytes=0, **stores) as svc:
        result = svc.lookup(TOKENS)
        assert result.num_cached_tokens == 4096  # the checkpoint at the end of the first span
        assert bitwise_equal(result.state_tensors, synthetic_state(LAY, TOKENS, 4096))
        svc.flush()
        assert svc.stats().tiers[tier].num_corrupt == 1
        assert svc.stack.tiers[1].contains_many([key]) == [False]


@pytest.mark.parametrize("tier", ["redis", "disk"])
def test_records_of_the_previous_format_version_are_misses_and_deleted(tier, tmp_path, redis_url, redis_prefix,
                                                                        redis_client, monkeypatch):
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix) if tier == "redis" else dict(disk_dir=tmp_path)
    records = commit_all(**stores)
    old = {key: encode_as_version(rec, record_module.FORMAT_VERSION - 1, monkeypatch) for key, rec in records.items()}
    if tier == "redis":
        redis_client.mset({redis_prefix + key: value for key, value in old.items()})
    else:
        DiskTier(tmp_path, budget_bytes=1 << 30).put_many(list(old.items()))
    hashes = chain_hashes(token_array(TOKENS), 128, FP, None, 32)
    unread = checkpoint_key(hashes[32], token_array(TOKENS)[4096:4096], FP, None)  # no index points at it now
    with service(device_bytes=0, **stores) as svc:
        assert svc.lookup(TOKENS, max_tokens=POSITION).num_cached_tokens == 0
        svc.flush()
        read = [key for key in old if key != unread]
        assert svc.stats().tiers[tier].num_corrupt == len(read)  # indexes, checkpoint 8800, spans, blocks
        assert svc.stack.tiers[1].contains_many(read) == [False] * len(read)


# -- keys -------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_blocks", [0, 1, GROUP_BLOCKS - 1, GROUP_BLOCKS, GROUP_BLOCKS + 1, 3 * GROUP_BLOCKS + 5])
def test_lazy_chain_hashes_match_the_full_chain_in_any_order(num_blocks):
    tokens = token_array(np.arange(num_blocks * 128 + 50) % 1000)
    full = chain_hashes(tokens, 128, "fp", "salt", num_blocks)
    assert len(full) == num_blocks + 1 and len(set(full)) == len(full)
    lazy = ChainHashes(tokens, 128, "fp", "salt", num_blocks)
    order = np.random.default_rng(num_blocks).permutation(num_blocks + 1)
    assert [lazy[int(k)] for k in order] == [full[int(k)] for k in order]
    assert lazy[-1] == full[-1] and lazy[1:3] == full[1:3]
    with pytest.raises(IndexError):
        lazy[num_blocks + 1]


def test_token_ids_outside_uint32_hash_under_another_root():
    small = token_array(np.arange(256))
    assert token_width(small) == 4
    for odd in (-1, 2**32):
        other = small.copy()
        other[200] = odd
        assert token_width(other) == 8
        assert not set(chain_hashes(other, 128, "fp", None, 2)) & set(chain_hashes(small, 128, "fp", None, 2))


# -- assembly and memory ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_byte_assembly_equals_the_tensor_assembly(dtype):
    lay = SyntheticLayout(dtype=dtype) if dtype != torch.float8_e4m3fn else SyntheticLayout()
    rates, state = lay.entry_rates, synthetic_state(lay, TOKENS, POSITION)
    if dtype == torch.float8_e4m3fn:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    spans = [layout.range_tensors(state, rates, first, 32, 128) for first in (0, 32)]
    singles = [layout.range_tensors(state, rates, b, 1, 128) for b in range(64, POSITION // 128)]
    checkpoint = layout.checkpoint_tensors(state, rates, 128)
    runs = [Record("span", "s", t).byte_views() for t in spans]
    runs += [Record("block", "b", t).byte_views() for t in singles]
    seen = []
    assembled = layout.assemble_state_bytes(runs, checkpoint, rates, 128, before_run=seen.append)
    assert seen == list(reversed(range(len(runs))))  # tail first: the head ends freshest
    assert bitwise_equal(assembled, state) and bitwise_equal(assembled, layout.assemble_state(
        spans + singles, checkpoint, rates, 128))
    cut = [{name: layout.leading_rows(view, 16 * 128 // rates[name]) for name, view in runs[0].items()}]
    short = layout.checkpoint_tensors(synthetic_state(lay, TOKENS, 2048), rates, 128)
    if dtype == torch.float8_e4m3fn:
        short = {k: v.to(dtype) if v.is_floating_point() else v for k, v in short.items()}
    assert layout.state_num_tokens(layout.assemble_state_bytes(cut, short, rates, 128)) == 2048
    with pytest.raises(ValueError):
        layout.assemble_state_bytes(runs[1:], checkpoint, rates, 128)  # a run missing


def test_pooled_buffers_are_reused_only_when_no_view_remains():
    pool = BufferPool(max_idle_bytes=16 << 20)
    first = pool.take(3 << 20)
    address = first.data_ptr()
    view = first[100:200].view(torch.int32)
    del first
    assert pool.take(3 << 20).data_ptr() != address  # a view still holds it (and that take is dropped)
    del view
    reused = pool.take(3 << 20)
    assert reused.data_ptr() == address and pool.num_reused >= 1
    assert pool.take(64 << 20).numel() == 64 << 20  # far larger: a new buffer
    del reused
    pool.take(1 << 20)  # idle buffers past the limit are unmapped, least recently taken first
    assert pool.num_idle_bytes <= 16 << 20
