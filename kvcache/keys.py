"""Cache keys: chained prefix hashes of token blocks, and the checkpoint / index keys built on them.

Owns no state. Every hash is a 16-byte blake2b over length-prefixed fields, so keys are fixed
width and unambiguous:

- ``h_0 = H("root", fingerprint, salt)``; ``h_k = H("block", h_{k-1}, tokens of block k-1,
  fingerprint, salt)``: the hash of the first ``k`` blocks of ``block_tokens`` tokens.
- block record key ``"b" + hex(h_k)`` (the entries block ``k-1`` produced);
- span record key ``"s" + hex(H("span", h_k, n))``: the entries of the ``n`` blocks ``[k-n, k)``
  (spans are aligned: ``k`` is a multiple of ``n``);
- checkpoint key ``"c" + hex(H("checkpoint", h_k, tokens[k*B:P], fingerprint, salt))`` for a
  checkpoint at position ``P`` with ``k = P // B``;
- index key ``"i" + hex(h_k)``: the record listing the checkpoint offsets in block k (the
  one-letter prefixes keep the namespaces apart).

The salt (per tenant) and the model fingerprint enter every hash, so tenants and models never
share a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DIGEST_BYTES = 16
BLOCK_TOKENS_MULTIPLE = 128
BLOCK_PREFIX, SPAN_PREFIX, CHECKPOINT_PREFIX, INDEX_PREFIX = "b", "s", "c", "i"


def validate_block_tokens(block_tokens: int) -> int:
    """`block_tokens` must be a positive multiple of 128 (= lcm of the CSA and HCA rates)."""
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int):
        raise ValueError(f"block_tokens must be an int, got {block_tokens!r}")
    if block_tokens <= 0 or block_tokens % BLOCK_TOKENS_MULTIPLE:
        raise ValueError(f"block_tokens must be a positive multiple of 128, got {block_tokens}")
    return block_tokens


def token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a contiguous little-endian int64 array (the bytes that get hashed)."""
    array = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
    if array.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {array.shape}")
    return array


def _salt_bytes(salt: str | bytes | None) -> bytes:
    if salt is None:
        return b""
    return salt if isinstance(salt, bytes) else str(salt).encode()


def _hash(tag: bytes, *fields: bytes) -> bytes:
    digest = hashlib.blake2b(tag, digest_size=DIGEST_BYTES)
    for value in fields:
        digest.update(len(value).to_bytes(8, "little"))
        digest.update(value)
    return digest.digest()


def root_hash(fingerprint: str, salt: str | bytes | None) -> bytes:
    return _hash(b"root", fingerprint.encode(), _salt_bytes(salt))


def chain_hashes(
    tokens: np.ndarray, block_tokens: int, fingerprint: str, salt: str | bytes | None, num_blocks: int
) -> list[bytes]:
    """``[h_0, h_1, ..., h_num_blocks]`` for the first `num_blocks` full blocks of `tokens`."""
    if num_blocks * block_tokens > len(tokens):
        raise ValueError(f"{num_blocks} blocks of {block_tokens} exceed {len(tokens)} tokens")
    fp, salt_b = fingerprint.encode(), _salt_bytes(salt)
    raw = memoryview(tokens.tobytes())
    width = block_tokens * tokens.itemsize
    # the bytes `_hash(b"block", parent, block, fp, salt)` digests, fed without per-field calls
    base = hashlib.blake2b(b"block" + DIGEST_BYTES.to_bytes(8, "little"), digest_size=DIGEST_BYTES)
    middle = width.to_bytes(8, "little")
    tail = len(fp).to_bytes(8, "little") + fp + len(salt_b).to_bytes(8, "little") + salt_b
    parent = root_hash(fingerprint, salt)
    hashes = [parent]
    for start in range(0, num_blocks * width, width):
        digest = base.copy()
        digest.update(parent + middle)
        digest.update(raw[start:start + width])
        digest.update(tail)
        parent = digest.digest()
        hashes.append(parent)
    return hashes


def block_key(block_hash: bytes) -> str:
    return BLOCK_PREFIX + block_hash.hex()


def span_key(end_hash: bytes, num_blocks: int) -> str:
    """Key of the span record of the `num_blocks` blocks that end where `end_hash` ends."""
    return SPAN_PREFIX + _hash(b"span", end_hash, num_blocks.to_bytes(8, "little")).hex()


def checkpoint_key(
    parent_hash: bytes, partial_tokens: np.ndarray, fingerprint: str, salt: str | bytes | None
) -> str:
    fields = (parent_hash, partial_tokens.tobytes(), fingerprint.encode(), _salt_bytes(salt))
    return CHECKPOINT_PREFIX + _hash(b"checkpoint", *fields).hex()


def index_key(parent_hash: bytes) -> str:
    return INDEX_PREFIX + parent_hash.hex()
