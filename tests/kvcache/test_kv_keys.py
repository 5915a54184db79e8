import hashlib

import numpy as np
import pytest

from kvcache.keys import (
    GROUP_BLOCKS, ChainHashes, block_key, chain_hashes, checkpoint_key, index_key, span_key, token_array,
    token_width, validate_block_tokens,
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
