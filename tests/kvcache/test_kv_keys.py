import hashlib

import numpy as np
import pytest

from kvcache.keys import (
    GROUP_BLOCKS, ChainHashes, ChainMemo, block_key, chain_hashes, checkpoint_key, index_key, root_hash, span_key,
    token_array, token_width, validate_block_tokens,
)


@pytest.mark.parametrize("value", [128, 256, 4096])
def test_block_tokens_multiples_of_128_are_accepted(value):
    assert validate_block_tokens(value) == value


@pytest.mark.parametrize("value", [0, -128, 64, 100, 129, 128.0, True, "128"])
def test_block_tokens_must_be_a_positive_multiple_of_128(value):
    with pytest.raises(ValueError):
        validate_block_tokens(value)


def test_chain_hashes_are_prefix_consistent_and_fixed_width():
    tokens = token_array(np.arange(1000) % 97)
    long = chain_hashes(tokens, 128, "fp", "salt", 7)
    short = chain_hashes(tokens[:300], 128, "fp", "salt", 2)
    assert long[:3] == short
    assert len(set(long)) == len(long)
    assert all(len(block_key(h)) == 33 for h in long)
    with pytest.raises(ValueError):
        chain_hashes(tokens[:300], 128, "fp", "salt", 3)


def test_a_changed_token_changes_its_block_and_every_later_one():
    tokens = token_array(np.arange(1000))
    other = tokens.copy()
    other[300] += 1  # in block 2
    a = chain_hashes(tokens, 128, "fp", None, 7)
    b = chain_hashes(other, 128, "fp", None, 7)
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:]))


def test_salt_and_fingerprint_enter_every_key():
    tokens = token_array(np.arange(512))
    base = chain_hashes(tokens, 128, "fp", "tenant-a", 4)
    for other in (chain_hashes(tokens, 128, "fp", "tenant-b", 4), chain_hashes(tokens, 128, "fp2", "tenant-a", 4)):
        assert not set(base) & set(other)
    assert chain_hashes(tokens, 128, "fp", None, 4) == chain_hashes(tokens, 128, "fp", "", 4)
    assert chain_hashes(tokens, 128, "fp", "x", 4) == chain_hashes(tokens, 128, "fp", b"x", 4)


def test_checkpoint_and_index_keys_are_distinct_namespaces():
    tokens = token_array(np.arange(300))
    hashes = chain_hashes(tokens, 128, "fp", "s", 2)
    ckpt_a = checkpoint_key(hashes[2], tokens[256:300], "fp", "s")
    ckpt_b = checkpoint_key(hashes[2], tokens[256:299], "fp", "s")
    ckpt_salted = checkpoint_key(hashes[2], tokens[256:300], "fp", "t")
    at_boundary = checkpoint_key(hashes[2], tokens[256:256], "fp", "s")
    keys = {ckpt_a, ckpt_b, ckpt_salted, at_boundary, index_key(hashes[2]), block_key(hashes[2])}
    assert len(keys) == 6
    assert ckpt_a[0] == "c" and index_key(hashes[2])[0] == "i" and block_key(hashes[2])[0] == "b"


def reference_chain(tokens: np.ndarray, block_tokens: int, fingerprint: str, salt: bytes, num_blocks: int) -> list[bytes]:
    """Key scheme 2 written out from the keys.py docstring, one SHA-256 call per block (no lazy
    groups, no running hashes): what `chain_hashes` must keep computing, however it is sped up."""
    def field(value: bytes) -> bytes:
        return len(value).to_bytes(8, "little") + value

    width = 4 if tokens.min() >= 0 and tokens.max() < 2**32 else 8
    data = tokens.astype("<u4" if width == 4 else "<i8").tobytes()
    root = hashlib.sha256(field(b"root") + field(fingerprint.encode()) + field(salt)
                          + field(block_tokens.to_bytes(8, "little")) + field(width.to_bytes(8, "little")))
    hashes = [root.digest()[:16]]
    for k in range(1, num_blocks + 1):
        g = (k - 1) // GROUP_BLOCKS
        anchor = hashes[g * GROUP_BLOCKS]
        block = data[g * GROUP_BLOCKS * block_tokens * width:k * block_tokens * width]
        digest = hashlib.sha256(field(b"block") + field(fingerprint.encode()) + field(salt) + field(anchor) + block)
        hashes.append(digest.digest()[:16])
    return hashes


@pytest.mark.parametrize("num_blocks, block_tokens, wide", [
    (0, 128, False), (1, 128, False), (GROUP_BLOCKS, 128, False), (2 * GROUP_BLOCKS + 3, 128, False),
    (GROUP_BLOCKS + 1, 256, False), (GROUP_BLOCKS + 2, 128, True),
])
def test_chain_hashes_are_the_documented_scheme(num_blocks, block_tokens, wide):
    tokens = token_array(np.random.default_rng(num_blocks).integers(0, 129_280, num_blocks * block_tokens + 7))
    if wide:
        tokens[5] = -3  # outside uint32: every id hashed as int64
    assert token_width(tokens) == (8 if wide else 4)
    expected = reference_chain(tokens, block_tokens, "fp", b"tenant", num_blocks)
    assert chain_hashes(tokens, block_tokens, "fp", "tenant", num_blocks) == expected
    lazy = ChainHashes(tokens, block_tokens, "fp", b"tenant", num_blocks)  # tail first, as a lookup reads
    assert [lazy[k] for k in reversed(range(num_blocks + 1))] == expected[::-1]


@pytest.mark.parametrize("value, width", [(0, 4), (2**32 - 1, 4), (2**32, 8), (-1, 8), (-2**63, 8), (2**63 - 1, 8)])
def test_token_width_is_4_exactly_when_every_id_fits_uint32(value, width):
    assert token_width(token_array([7, value, 3])) == width
    assert token_width(token_array([])) == 4


def test_span_keys_depend_on_the_end_hash_and_the_length():
    hashes = chain_hashes(token_array(np.arange(64 * 128) % 1000), 128, "fp", None, 64)
    keys = {span_key(hashes[32], 32), span_key(hashes[64], 32), span_key(hashes[64], 64), span_key(hashes[64], 32)}
    assert len(keys) == 3 and all(key[0] == "s" and len(key) == 33 for key in keys)


def reference(tokens: np.ndarray, num_blocks: int, salt: bytes = b"tenant", fingerprint: str = "fp") -> list[bytes]:
    return reference_chain(tokens, 128, fingerprint, salt, num_blocks)


def hashed(tokens: np.ndarray, num_blocks: int, memo: ChainMemo, salt: bytes = b"tenant",
           fingerprint: str = "fp") -> ChainHashes:
    """A chain of `tokens` through `memo`, every hash computed tail first (as a lookup reads)."""
    chain = ChainHashes(tokens, 128, fingerprint, salt, num_blocks, memo=memo)
    for k in reversed(range(num_blocks + 1)):
        chain[k]
    return chain


def test_the_same_tokens_again_reuse_every_hash_and_are_the_scheme():
    """A sequence hashed before (a resent prompt): the memo gives the new chain every hash (no
    SHA-256 call at all) and they are the documented scheme's."""
    memo = ChainMemo()
    tokens = token_array(np.random.default_rng(1).integers(0, 129_280, (2 * GROUP_BLOCKS + 5) * 128 + 9))
    num_blocks = 2 * GROUP_BLOCKS + 5
    first = hashed(tokens, num_blocks, memo)
    assert (memo.num_hits, memo.num_misses) == (0, 1)
    again = ChainHashes(tokens.copy(), 128, "fp", b"tenant", num_blocks, memo=memo)
    assert (memo.num_hits, memo.num_misses) == (1, 1) and len(memo) == 1   # (the new chain replaced the old)
    assert again._array is first._array                                    # (the same ids: one array)
    assert again._anchors == first._anchors and again._groups == first._groups
    assert list(again) == reference(tokens, num_blocks)


@pytest.mark.parametrize("diverge_at", [None, 0, 5, 128 * GROUP_BLOCKS - 1, 128 * GROUP_BLOCKS,
                                        128 * (GROUP_BLOCKS + 3) + 1])
def test_a_shared_prefix_reuses_only_the_hashes_inside_it(diverge_at):
    """A longer sequence (the next turn of a conversation) or one that diverges: the hashes
    of the groups of 32 blocks wholly inside the shared ids are reused, every hash is the
    scheme's, and the first chain's hashes are unchanged."""
    memo = ChainMemo()
    rng = np.random.default_rng(2)
    base = token_array(rng.integers(0, 129_280, (GROUP_BLOCKS + 7) * 128))
    first = hashed(base, GROUP_BLOCKS + 7, memo)
    first_hashes = list(first)
    longer = token_array(np.concatenate([base, rng.integers(0, 129_280, (GROUP_BLOCKS + 2) * 128)]))
    if diverge_at is not None:
        longer[diverge_at] = (longer[diverge_at] + 1) % 129_280
    num_blocks = 2 * GROUP_BLOCKS + 9
    chain = ChainHashes(longer, 128, "fp", b"tenant", num_blocks, memo=memo)
    shared = (GROUP_BLOCKS + 7) * 128 if diverge_at is None else diverge_at
    num_groups = shared // (128 * GROUP_BLOCKS)
    assert len(chain._anchors) == num_groups + 1                  # h_0 .. h_{32 g}: known already
    assert sorted(chain._groups) == list(range(num_groups))
    assert [chain[k] for k in reversed(range(num_blocks + 1))] == reference(longer, num_blocks)[::-1]
    assert list(first) == first_hashes == reference(base, GROUP_BLOCKS + 7)


def test_other_roots_share_nothing_and_the_callers_array_may_change():
    memo = ChainMemo()
    tokens = token_array(np.random.default_rng(3).integers(0, 129_280, (GROUP_BLOCKS + 1) * 128))
    hashed(tokens, GROUP_BLOCKS + 1, memo)
    for salt, fingerprint in ((b"other", "fp"), (b"tenant", "fp2")):
        chain = ChainHashes(tokens, 128, fingerprint, salt, GROUP_BLOCKS + 1, memo=memo)
        assert chain._anchors == [root_hash(fingerprint, salt, 128, 4)] and not chain._groups
        assert list(chain) == reference(tokens, GROUP_BLOCKS + 1, salt, fingerprint)
    wide = tokens.copy()
    wide[-1] = 2**32   # the same ids but the last: hashed as int64, another root
    chain = ChainHashes(wide, 128, "fp", b"tenant", GROUP_BLOCKS + 1, memo=memo)
    assert chain._width == 8 and len(chain._anchors) == 1 and not chain._groups
    assert list(chain) == reference(wide, GROUP_BLOCKS + 1)
    again = ChainHashes(wide, 128, "fp", b"tenant", GROUP_BLOCKS + 1, memo=memo)   # (int64 ids compared as such)
    assert again._array is chain._array and list(again) == reference(wide, GROUP_BLOCKS + 1)
    mutable = tokens.copy()
    hashed(mutable, GROUP_BLOCKS + 1, memo)
    mutable[3] += 1   # the caller changes its array after the lookup: the memo kept its own copy
    assert list(ChainHashes(mutable, 128, "fp", b"tenant", GROUP_BLOCKS + 1, memo=memo)) == reference(
        mutable, GROUP_BLOCKS + 1)


def test_the_memo_is_bounded():
    memo = ChainMemo(max_entries=3, max_bytes=3 * 4 * 128 * 4)
    rng = np.random.default_rng(4)
    chains = [ChainHashes(token_array(rng.integers(0, 1000, 128 * 4)), 128, "fp", None, 4, memo=memo) for _ in range(5)]
    assert len(memo) == 3 and memo._entries == chains[:1:-1]   # most recently used first
    big = ChainHashes(token_array(rng.integers(0, 1000, 128 * 16)), 128, "fp", None, 16, memo=memo)
    assert memo._entries == [big]                               # (over the byte bound: only the newest)


@pytest.mark.parametrize("is_compiled", [True, False])
def test_the_shared_prefix_of_ids_and_uint32_words(is_compiled, monkeypatch):
    from kvcache import token_prefix
    if not is_compiled:
        monkeypatch.setattr(token_prefix, "_library", lambda: None)
    else:
        assert token_prefix._library() is not None
    rng = np.random.default_rng(5)
    words = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    for at in (0, 1, 63, 64, 65, 500, 999):
        ids = words.astype(np.int64)
        assert token_prefix.shared_u32_prefix(ids, words) == 1000
        for value in (ids[at] + 1, -1, int(words[at]) + 2**32, -(2**63)):
            changed = ids.copy()
            changed[at] = value
            assert token_prefix.shared_u32_prefix(changed, words) == at
    assert token_prefix.shared_u32_prefix(words[:10].astype(np.int64), words) == 10   # (the shorter decides)
    assert token_prefix.shared_u32_prefix(np.zeros(0, np.int64), words) == 0
