"""Span records: a commit stores full spans of `span_tokens` plus single blocks for each
position's unfinished span; a lookup uses a span wherever its tokens cover it (cutting it when
the checkpoint ends inside it) and single blocks elsewhere, so every checkpoint stays reachable."""

import numpy as np
import pytest

from kvcache.keys import block_key, chain_hashes, span_key, token_array
from kvcache.service import KVCacheConfig, KVCacheService
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state

LAY = SyntheticLayout()
TOKENS = [int(t) for t in (np.arange(1000) * 7919 + 13) % 50000]
POSITIONS = (256, 512, 700, 1000)
OTHER = [50001 + i for i in range(100)]


def committed_service(**kwargs) -> KVCacheService:
    svc = KVCacheService(LAY.entry_rates, "fp", checkpoint_tokens=256, **kwargs)
    result = svc.commit(TOKENS, {p: synthetic_state(LAY, TOKENS, p) for p in POSITIONS})
    assert result.num_new_blocks == 7 and result.num_checkpoints == 4
    return svc


def run_keys(tokens=TOKENS):
    hashes = chain_hashes(token_array(tokens), 128, "fp", None, len(tokens) // 128)
    spans = [span_key(hashes[end], 2) for end in range(2, len(hashes), 2)]
    return spans, [block_key(h) for h in hashes[1:]]


def assert_state(result, position, kinds):
    assert result.num_cached_tokens == position
    assert bitwise_equal(result.state_tensors, synthetic_state(LAY, TOKENS, position))
    assert result.num_records_by_tier == {"device": kinds}


def test_a_commit_writes_full_spans_and_the_unfinished_spans_blocks():
    assert KVCacheConfig(checkpoint_tokens=256).span_blocks == 2
    with committed_service() as svc:
        spans, blocks = run_keys()
        stored = set(svc.stack.device.lru_keys())
        assert set(spans) <= stored  # blocks [0, 6) as three spans
        assert {blocks[4], blocks[6]} <= stored  # the unfinished spans of 700 and 1000
        assert not {blocks[0], blocks[1], blocks[2], blocks[3], blocks[5]} & stored
        assert len(stored) == 3 + 2 + 4 + 4  # spans, blocks, checkpoints, index records


@pytest.mark.parametrize("query, max_tokens, position, num_records", [
    (TOKENS, None, 1000, 3 + 1 + 1),             # three spans, block 6, the checkpoint
    (TOKENS[:720] + OTHER, None, 700, 2 + 1 + 1),  # diverges inside span 2: its block 4 alone
    (TOKENS, 750, 700, 3 + 1),                   # the tokens cover span 2: cut to its first block
    (TOKENS[:600] + OTHER, None, 512, 2 + 1),
    (TOKENS[:300] + OTHER, None, 256, 1 + 1),
])
def test_lookup_uses_spans_where_the_tokens_cover_them(query, max_tokens, position, num_records):
    with committed_service() as svc:
        assert_state(svc.lookup(query, max_tokens=max_tokens), position, num_records)


def test_a_missing_span_falls_back_to_blocks_or_a_shorter_prefix():
    with committed_service() as svc:
        spans, blocks = run_keys()
        svc.stack.device.delete_many([spans[2]])  # blocks 4 and 5; block 4 is also stored alone
        assert_state(svc.lookup(TOKENS, max_tokens=750), 700, 2 + 1 + 1)
        assert_state(svc.lookup(TOKENS), 700, 2 + 1 + 1)  # 1000 needs block 5
        svc.stack.device.delete_many([spans[1]])  # blocks 2 and 3 exist nowhere else
        assert_state(svc.lookup(TOKENS), 256, 1 + 1)


def test_span_configuration():
    assert KVCacheConfig().span_blocks == 32
    assert KVCacheConfig(checkpoint_tokens=1000).span_blocks == 1  # not a whole number of blocks
    assert KVCacheConfig(span_tokens=512).span_blocks == 4
    with pytest.raises(ValueError):
        KVCacheService(LAY.entry_rates, "fp", span_tokens=200)
    with committed_service(span_tokens=128) as svc:  # no spans: one record per block
        assert all(not key.startswith("s") for key in svc.stack.device.lru_keys())
        assert_state(svc.lookup(TOKENS), 1000, 7 + 1)
