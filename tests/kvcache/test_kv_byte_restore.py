"""The deferred restore's byte path: records decoded from Redis or disk hand
``SequenceState.load`` their row blocks as byte views ``(uint8 array, dtype, shape)`` (no tensor
per block), which the load copies with one numpy byte copy each into the pool's pages (or
converts, for another dtype or device). The restored state equals the exported one bitwise, with
the pages in one run or scattered, spans whole or cut; a corrupt record is still a miss and
deleted; bad byte blocks raise before anything changes. Also: the disk tier read from a cold
page cache (its segment evicted: `DiskTier.drop_cached_pages`, prefetch) restores the same bytes,
and the load's window and page-allocation shortcuts do exactly what the general code does."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from kvcache.keys import chain_hashes, span_key, token_array
from kvcache.segments import page_cache_fraction
from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state
from kv_model_helpers import corrupt_stored, stores
from model_shards.random_checkpoint import PRESETS
from model_shards.state import LayerState, SequenceState
from model_shards.state_load import load_window
from model_shards.state_pool import StatePool

CFG = PRESETS["tiny"]                      # the layout SyntheticLayout() describes
LAY = SyntheticLayout.from_model_config(CFG)
TOKENS = [int(t) for t in (np.arange(1000) * 7919 + 13) % 50000]
POSITIONS = (256, 512, 700, 1000)


def committed(store: dict) -> KVCacheService:
    """TOKENS committed at POSITIONS (spans of 2 blocks) through a writer; then a reader of
    the store alone (device tier off for byte tiers, so every hit is decoded from bytes)."""
    writer = KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, **store)
    writer.commit(TOKENS, {p: synthetic_state(LAY, TOKENS, p) for p in POSITIONS})
    writer.flush()
    if not store:
        return writer
    writer.close()
    return KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, device_bytes=0, **store)


def pool(page_size: int = 4, num_pages: int = 8) -> StatePool:
    return StatePool(CFG, torch.float32, "cpu", num_slots=2, page_size=page_size, num_pages=num_pages)


def scattered(p: StatePool) -> list[SequenceState]:
    """Interleave the pool's free pages (states holding every other page): a load then gets
    pages that are not one run. Returns the holders (keep them alive)."""
    holders = [p.new_state() for _ in range(4)]
    for _ in range(8):
        for state in holders:
            for layer in state.layers:
                for cs in (layer.comp, layer.index):
                    if cs is not None and cs.rate == 4:
                        cs.append_entries(torch.zeros(p.page_size, cs.dim))
    del holders[::2]
    gc.collect()
    return holders


def is_one_run(pages: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(pages, pages[1:]))


@pytest.mark.parametrize("tier", ["device", "redis", "disk"])
@pytest.mark.parametrize("query, max_tokens, position", [
    (TOKENS, None, 1000),              # three spans, block 6, the checkpoint
    (TOKENS, 750, 700),                # span 2 cut to its first block
    (TOKENS[:300] + [50001] * 50, None, 256),
])
@pytest.mark.parametrize("pages", ["one_run", "scattered"])
def test_a_deferred_restore_is_the_state_bitwise(tier, query, max_tokens, position, pages, tmp_path,
                                                 redis_url, redis_prefix):
    with committed(stores(tier, redis_url, redis_prefix, tmp_path)) as svc:
        hit = svc.lookup(query, max_tokens=max_tokens, is_deferred=True)
        assert hit.num_cached_tokens == position and hit.checkpoint_tier == tier
        blocks = hit.deferred.tensors["1.comp.entries"]
        assert len(blocks) == hit.deferred.num_runs + 1        # one per run, then the checkpoint's
        run_blocks = blocks[:-1]
        if tier == "device":
            assert all(isinstance(b, torch.Tensor) for b in run_blocks)
        else:  # byte views of the fetched bytes: no tensor built per block
            assert run_blocks and all(type(b) is tuple and b[0].dtype == np.uint8 for b in run_blocks)
        p = pool()
        holders = scattered(p) if pages == "scattered" else []
        state = p.new_state()
        assert hit.load_into(state)
        assert is_one_run(state.page_ids[4]) == (pages == "one_run")
        assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, position))
        standalone = SequenceState.new(CFG)       # the capacity-doubling buffers, no pages
        assert svc.lookup(query, max_tokens=max_tokens, is_deferred=True).load_into(standalone)
        assert bitwise_equal(standalone.export(), synthetic_state(LAY, TOKENS, position))
        assert svc.stats().tiers[tier].num_corrupt == 0
        del holders


@pytest.mark.parametrize("tier", ["redis", "disk"])
def test_a_corrupt_span_fails_the_byte_load_and_is_deleted(tier, tmp_path, redis_url, redis_prefix, redis_client):
    store = stores(tier, redis_url, redis_prefix, tmp_path)
    svc = committed(store)
    hashes = chain_hashes(token_array(TOKENS), 128, "fp", None, len(TOKENS) // 128)
    key = span_key(hashes[4], 2)   # blocks [2, 4): run 1 of a hit at 1000
    corrupt_stored(tier, key, redis_client, redis_prefix, tmp_path)
    with svc:
        hit = svc.lookup(TOKENS, is_deferred=True)
        assert hit.num_cached_tokens == 1000 and type(hit.deferred.tensors["1.comp.entries"][1]) is tuple
        p = pool()
        assert not hit.load_into(p.new_state())   # a miss, never a wrong state
        svc.flush()
        assert svc.stats().tiers[tier].num_corrupt == 1
        assert svc.stack.tiers[1].contains_many([key]) == [False]
        again = svc.lookup(TOKENS, is_deferred=True)   # blocks 2-3 exist nowhere else
        assert again.num_cached_tokens == 256
        state = p.new_state()
        assert again.load_into(state)
        assert bitwise_equal(state.export(), synthetic_state(LAY, TOKENS, 256))


def test_a_restore_from_an_evicted_segment_reads_the_same_bytes(tmp_path):
    with committed({"disk_dir": tmp_path}) as svc:
        disk = svc.stack.tiers[-1]
        (name,) = disk.segment_names()
        path = tmp_path / name
        expected = synthetic_state(LAY, TOKENS, 1000)
        for _ in range(2):
            disk.drop_cached_pages()
            if page_cache_fraction(path) > 0.5:
                pytest.skip("this file system keeps the file in memory (tmpfs?)")
            assert page_cache_fraction(path) == 0.0
            hit = svc.lookup(TOKENS, is_deferred=True)   # the prefetch asked for the records
            state = pool().new_state()
            assert hit.load_into(state)
            assert bitwise_equal(state.export(), expected)
            assert page_cache_fraction(path) > 0.0
        buffers = [disk.get_many([key])[0] for key in disk.lru_keys()]   # (in memory: no prefetch)
        reader = disk._readers[name]
        assert reader.prefetch(buffers) == 0
        disk.drop_cached_pages()
        assert reader.prefetch(buffers) > 0   # evicted: asked for again
        assert all(bytes(b) == bytes(v) for b, v in zip(buffers, disk.get_many(disk.lru_keys())))


# -- SequenceState.load with byte blocks ---------------------------------------------------------

def as_byte_blocks(state: dict, cuts: list[float], every: int = 1) -> dict:
    """`state` with every entries tensor cut at the fractions `cuts` of its rows, blocks as
    byte views (every `every`-th one; the others stay tensors)."""
    out = dict(state)
    for name, t in state.items():
        if name.endswith(".entries"):
            bounds = [0] + [int(c * t.shape[0]) for c in cuts] + [t.shape[0]]
            blocks = [t[a:b] for a, b in zip(bounds, bounds[1:])]
            out[name] = [(b.contiguous().view(-1).view(torch.uint8).numpy(), b.dtype, tuple(b.shape))
                         if i % every == 0 else b for i, b in enumerate(blocks)]
    return out


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("cuts", [[], [0.5], [0.1, 0.1, 0.37, 0.8, 0.99]])
def test_byte_blocks_load_the_same_state_as_tensors(cuts, every):
    exported = synthetic_state(LAY, TOKENS, 1000)
    p = pool(num_pages=4)   # the load grows the pages
    holders = scattered(pool())
    for state in (p.new_state(), SequenceState.new(CFG)):
        state.load(as_byte_blocks(exported, cuts, every))
        assert bitwise_equal(state.export(), exported)
    del holders


def test_byte_blocks_of_another_dtype_are_converted_like_tensors():
    exported = synthetic_state(LAY, TOKENS, 700)
    wide = {k: (v.double() if v.is_floating_point() else v) for k, v in exported.items()}
    state = pool().new_state()
    state.load(as_byte_blocks(wide, [0.3]))   # float32 values held as float64: converted back exactly
    assert bitwise_equal(state.export(), exported)


@pytest.mark.parametrize("damage", ["rows", "width", "bytes", "not_uint8", "two_d", "short_tuple", "dtype"])
def test_bad_byte_blocks_raise_before_anything_changes(damage):
    exported = synthetic_state(LAY, TOKENS, 700)
    blocks = as_byte_blocks(exported, [0.5])
    name = "3.index.entries"
    data, dtype, shape = blocks[name][0]
    bad = {
        "rows": (data, dtype, (shape[0] + 1, shape[1])),
        "width": (data, dtype, (shape[0] * 2, shape[1] // 2)),
        "bytes": (data[:-4], dtype, shape),
        "not_uint8": (data.view(np.int8), dtype, shape),
        "two_d": (data.reshape(shape[0], -1), dtype, shape),
        "short_tuple": (data, dtype),
        "dtype": (data, "float32", shape),
    }[damage]
    blocks[name] = [bad] + blocks[name][1:]
    p = pool()
    free_pages = {rate: p.num_free_pages(rate) for rate in p.rates}
    state = p.new_state()
    with pytest.raises((ValueError, KeyError, TypeError)):
        state.load(blocks)
    assert state.num_tokens == 0 and all(not ids for ids in state.page_ids.values())
    assert all(layer.num_tokens == 0 for layer in state.layers)
    assert {rate: p.num_free_pages(rate) for rate in p.rates} == free_pages
    state.load(exported)   # still fresh
    assert bitwise_equal(state.export(), exported)


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 127, 128, 129, 200, 255, 256, 257, 1000])
def test_the_loaded_window_is_what_set_window_writes(num_tokens):
    W, D = 128, 8
    window = torch.arange(min(num_tokens, W - 1) * D, dtype=torch.float64).reshape(-1, D) + 1
    want = LayerState(W, D, torch.float32, "cpu")
    want.set_window(window.to(torch.float32), num_tokens)
    got = LayerState(W, D, torch.float32, "cpu")
    load_window(got, window, num_tokens)
    assert got.num_tokens == want.num_tokens == num_tokens
    assert torch.equal(got.ring, want.ring) and torch.equal(got.window, want.window)


def test_pages_are_taken_in_the_order_one_pop_at_a_time_takes_them():
    p = pool(num_pages=8)
    free = list(p._free_pages[4])
    pages: list[int] = []
    p.ensure_pages(pages, 4, 3 * p.page_size + 1)            # 4 pages
    assert pages == [free.pop() for _ in range(4)]
    p.ensure_pages(pages, 4, 20 * p.page_size)               # past the free list: the pool grows
    expected = list(pages)
    q = pool(num_pages=8)
    ids: list[int] = []
    while len(ids) * q.page_size < 20 * q.page_size:          # the one-by-one reference
        if not q._free_pages[4]:
            q._grow_pages(4, 2 * q.num_pages[4])
        ids.append(q._free_pages[4].pop())
    assert pages == ids and expected[:4] == ids[:4]
    assert p.num_pages[4] == q.num_pages[4] and p._free_pages[4] == q._free_pages[4]
