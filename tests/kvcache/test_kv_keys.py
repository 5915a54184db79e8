import numpy as np
import pytest

from kvcache.keys import (
    block_key, chain_hashes, checkpoint_key, index_key, token_array, validate_block_tokens,
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
