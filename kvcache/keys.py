"""Cache keys: chained prefix hashes of token blocks, and the checkpoint / index keys built on them.

Owns no state but a bounded memo of `span_key` (a pure function: a lookup asks for each of its
span keys twice, and a resent prompt asks again); `ChainMemo` (the chain hashes of the last few
token sequences hashed) is owned by whoever passes it to `ChainHashes` (the service). Every hash is 16 bytes (SHA-256,
truncated: SHA-NI makes it about twice as fast as blake2b here), so keys are fixed width; every
hashed field is fixed width or length-prefixed, so they are unambiguous. Token ids are hashed as
little-endian uint32 (`token_bytes`); a sequence holding an id outside [0, 2**32) (no real
vocabulary has one) is hashed as int64 under another root: never a collision, only no shared
keys with its in-range prefixes.

- ``h_0 = H("root", fingerprint, salt, block_tokens, token width)``; blocks are chained through
  *anchors* every `GROUP_BLOCKS` (32) blocks: with ``g = (k - 1) // 32``,
  ``h_k = H("block", fingerprint, salt, h_{32g}, tokens of blocks [32g, k))``: the hash of the
  first ``k`` blocks of ``block_tokens`` tokens (each ``h_k`` depends on every token before
  ``k * block_tokens``; its parent is the anchor ``h_{32g}``).
  `ChainHashes` computes them lazily: an anchor costs one hash call over its 32 blocks, a block
  inside a group one running-hash step, so a lookup pays per-block work only where it reads
  per-block keys (the index records of the last blocks), not for every block of a long context.
  The token ids are converted to their hashed bytes once per sequence (one ``astype``), and a
  lookup hashes each of them once: about 0.15 ms for 64K tokens here, SHA-256 at ~1.8 GB/s. A
  sequence that shares a prefix with one hashed recently (a resent prompt, the next turn of an
  agent loop) reuses its hashes up to the last anchor inside the shared prefix (`ChainMemo`:
  the prefix is compared byte for byte, ~10 us for 64K tokens, so the hashes are exactly the
  ones this definition gives).
- block record key ``"b" + hex(h_k)`` (the entries block ``k-1`` produced);
- span record key ``"s" + hex(H("span", h_k, n))``: the entries of the ``n`` blocks ``[k-n, k)``
  (spans are aligned: ``k`` is a multiple of ``n``);
- checkpoint key ``"c" + hex(H("checkpoint", h_k, tokens[k*B:P], fingerprint, salt))`` for a
  checkpoint at position ``P`` with ``k = P // B``;
- index key ``"i" + hex(h_k)``: the record listing the checkpoint offsets in block k (the
  one-letter prefixes keep the namespaces apart).

The salt (per tenant) and the model fingerprint enter every hash (span keys through ``h_k``), so
tenants and models never share a key. Key scheme 2 (this one: SHA-256, uint32 ids, anchors)
replaced scheme 1 (blake2b over int64 ids, chained block by block) together with record format
3: records stored under scheme-1 keys are simply never looked up again and age out of the LRU.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Sequence

import numpy as np

from kvcache.token_prefix import shared_u32_prefix

DIGEST_BYTES = 16
BLOCK_TOKENS_MULTIPLE = 128
GROUP_BLOCKS = 32  # blocks per anchor of the chain (part of the key scheme)
KEY_SCHEME = 2
BLOCK_PREFIX, SPAN_PREFIX, CHECKPOINT_PREFIX, INDEX_PREFIX = "b", "s", "c", "i"


def validate_block_tokens(block_tokens: int) -> int:
    """`block_tokens` must be a positive multiple of 128 (= lcm of the CSA and HCA rates)."""
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int):
        raise ValueError(f"block_tokens must be an int, got {block_tokens!r}")
    if block_tokens <= 0 or block_tokens % BLOCK_TOKENS_MULTIPLE:
        raise ValueError(f"block_tokens must be a positive multiple of 128, got {block_tokens}")
    return block_tokens


def token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a contiguous little-endian int64 array."""
    array = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
    if array.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {array.shape}")
    return array


def token_width(tokens: np.ndarray) -> int:
    """Bytes per hashed token id: 4 when every id is in [0, 2**32) (always, for a real
    vocabulary), else 8. One width per sequence: it enters the root hash."""
    # one pass: as uint64 a negative id is above 2**63, so `max >> 32` is 0 only if all are in range
    return 4 if len(tokens) == 0 or int(np.asarray(tokens, dtype="<i8").view("<u8").max()) >> 32 == 0 else 8


def token_bytes(tokens: np.ndarray, width: int) -> memoryview:
    """The bytes hashed for `tokens` at `width` (see `token_width`), as a flat byte view."""
    array = np.ascontiguousarray(tokens.astype("<u4" if width == 4 else "<i8", copy=False))
    return memoryview(array).cast("B")


def _salt_bytes(salt: str | bytes | None) -> bytes:
    if salt is None:
        return b""
    return salt if isinstance(salt, bytes) else str(salt).encode()


_ANCHOR_FRAME = DIGEST_BYTES.to_bytes(8, "little")  # an anchor is framed as a 16-byte field


def _hash(tag: bytes, *fields: bytes) -> bytes:
    digest = hashlib.sha256(len(tag).to_bytes(8, "little") + tag)
    for value in fields:
        digest.update(len(value).to_bytes(8, "little"))
        digest.update(value)
    return digest.digest()[:DIGEST_BYTES]


def root_hash(fingerprint: str, salt: str | bytes | None, block_tokens: int = 128, width: int = 4) -> bytes:
    fields = (fingerprint.encode(), _salt_bytes(salt), block_tokens.to_bytes(8, "little"), width.to_bytes(8, "little"))
    return _hash(b"root", *fields)


class ChainHashes(Sequence):
    """``[h_0, h_1, ..., h_num_blocks]`` of `tokens` (see the module docstring), computed on
    first access and kept. Indexing and slicing as a list; `chain_hashes` gives the list.
    `memo`: a `ChainMemo` to take the hashes of a shared prefix from, and to remember this chain in."""

    def __init__(self, tokens: np.ndarray, block_tokens: int, fingerprint: str,
                 salt: str | bytes | None, num_blocks: int, *, memo: ChainMemo | None = None):
        if num_blocks < 0 or num_blocks * block_tokens > len(tokens):
            raise ValueError(f"{num_blocks} blocks of {block_tokens} exceed {len(tokens)} tokens")
        tokens = tokens[:num_blocks * block_tokens]
        # (entry, shared ids) or None
        found = None if memo is None else memo.find(tokens, fingerprint, _salt_bytes(salt), block_tokens)
        if found is not None and found[1] == len(tokens) == len(found[0]._array):   # the same ids
            width, array = found[0]._width, found[0]._array   # (shared: never written)
        else:
            width = token_width(tokens)
            # the hashed bytes of all the tokens as one array of this chain's own (converted once:
            # one ``astype``, not one per group; a copy, so the memo never sees the caller change them)
            array = np.array(tokens, dtype="<u4" if width == 4 else "<i8")
            if found is not None and found[0]._width != width:   # (another root: nothing shared)
                found = None
        self._width, self._array = width, array
        self._data = memoryview(array).cast("B")
        self._block_tokens = block_tokens
        self._num_blocks = num_blocks
        # what every block hash digests before its anchor: the tag, fingerprint and salt, framed as
        # `_hash` frames its fields (computed once; each block hash starts from a copy)
        self._base = hashlib.sha256(len(b"block").to_bytes(8, "little") + b"block")
        for value in (fingerprint.encode(), _salt_bytes(salt)):
            self._base.update(len(value).to_bytes(8, "little") + value)
        self._params = (fingerprint, _salt_bytes(salt), block_tokens, width)  # what h_0 hashes
        self._anchors: list[bytes] = []  # h_0, h_32, h_64, ... (h_0 made below unless the memo knows it)
        self._groups: dict[int, list[bytes]] = {}  # g -> [h_{32g+1}, ..., h_{32g+32}] (or fewer at the end)
        if memo is not None:
            memo.adopt(self, found)
        if not self._anchors:
            self._anchors.append(root_hash(fingerprint, salt, block_tokens, width))

    def __len__(self) -> int:
        return self._num_blocks + 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        k = index + len(self) if index < 0 else index
        if not 0 <= k < len(self):
            raise IndexError(index)
        if k % GROUP_BLOCKS == 0:
            return self._anchor(k // GROUP_BLOCKS)
        group = (k - 1) // GROUP_BLOCKS
        return self._group(group)[k - 1 - group * GROUP_BLOCKS]

    def _start(self, anchor: bytes):
        digest = self._base.copy()
        digest.update(_ANCHOR_FRAME + anchor)
        return digest

    def _group_bytes(self, group: int) -> memoryview:
        """The hashed bytes of a group's tokens: a slice of all the tokens' bytes."""
        group_bytes = GROUP_BLOCKS * self._block_tokens * self._width
        return self._data[group * group_bytes:(group + 1) * group_bytes]

    def _anchor(self, group: int) -> bytes:
        """h_{32 * group}: one hash call per group of 32 blocks on the way."""
        anchors = self._anchors
        while len(anchors) <= group:
            g = len(anchors) - 1
            digest = self._start(anchors[g])
            digest.update(self._group_bytes(g))
            anchors.append(digest.digest()[:DIGEST_BYTES])
        return anchors[group]

    def _group(self, group: int) -> list[bytes]:
        hashes = self._groups.get(group)
        if hashes is None:
            digest = self._start(self._anchor(group))
            data, width, hashes = self._group_bytes(group), self._block_tokens * self._width, []
            update, append = digest.update, hashes.append
            for start in range(0, min(GROUP_BLOCKS, self._num_blocks - group * GROUP_BLOCKS) * width, width):
                update(data[start:start + width])
                append(digest.copy().digest()[:DIGEST_BYTES])
            self._groups[group] = hashes
            if len(hashes) == GROUP_BLOCKS and len(self._anchors) == group + 1:
                self._anchors.append(hashes[-1])
        return hashes


class ChainMemo:
    """The `ChainHashes` of the last few token sequences hashed (`max_entries`, at most
    `max_bytes` of hashed token bytes in all), most recently used first; thread-safe.

    Why: a lookup hashes every token of its sequence (~0.15 ms per 64K tokens), and the
    sequences a cache is asked about come back: a resent prompt, a retried request, the next
    turn of a conversation (the same tokens plus some). `adopt` gives a new chain the hashes an
    earlier chain of the same root (fingerprint, salt, block size, token width) already has for
    their shared prefix: the anchors and groups of 32 blocks that lie wholly inside it (all of
    them for the same tokens). Exact: the prefix is compared byte for byte (hashed bytes, so
    the width is the same too), and each of those hashes is a function of that prefix alone
    (see the module docstring). Each chain keeps its own lists (copied), so chains computing
    their remaining hashes at the same time never share a list."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 64 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: list[ChainHashes] = []
        self._lock = threading.Lock()
        self.num_hits = self.num_misses = 0   # adoptions with / without a shared group or root

    def find(self, tokens: np.ndarray, fingerprint: str, salt: bytes, block_tokens: int
             ) -> tuple[ChainHashes, int] | None:
        """The remembered chain of this fingerprint, salt and block size that shares the most
        leading token ids with `tokens` (the ids as given, int64), and how many it shares; None
        if none shares any. (The caller checks the token width, which the root hashes too.)"""
        with self._lock:
            entries = list(self._entries)
        best = None
        for entry in entries:
            if entry._params[:3] != (fingerprint, salt, block_tokens):
                continue
            other = entry._array
            shared = shared_u32_prefix(tokens, other) if entry._width == 4 else _shared_tokens(tokens, other)
            if shared and (best is None or shared > best[1]):
                best = (entry, shared)
                if shared == len(tokens) == len(other):
                    break
        return best

    def adopt(self, chain: ChainHashes, found: tuple[ChainHashes, int] | None) -> None:
        """Give `chain` (fresh: no hashes yet) the hashes of `found` (`find`: a chain of the
        same root and how many leading ids they share) that lie wholly inside their shared
        prefix (all of them for the same ids), then remember `chain` (most recently used)."""
        is_same = False
        if found is not None:
            best, shared = found
            is_same = best._array is chain._array
            anchors, groups = best._anchors[:], best._groups.copy()   # (copies: atomic under the GIL)
            if not is_same:
                num_groups = shared // (GROUP_BLOCKS * chain._block_tokens)
                anchors = anchors[:num_groups + 1]
                groups = {g: hashes for g, hashes in groups.items() if g < num_groups}
            chain._anchors[:], chain._groups = anchors, groups
        with self._lock:
            self.num_hits += found is not None
            self.num_misses += found is None
            kept = [e for e in self._entries if e is not chain and not (is_same and e is found[0])]
            kept.insert(0, chain)
            num_bytes = 0
            for i, entry in enumerate(kept):
                num_bytes += entry._array.nbytes
                if i >= self.max_entries or (i and num_bytes > self.max_bytes):
                    del kept[i:]
                    break
            self._entries = kept

    def clear(self) -> None:
        with self._lock:
            self._entries = []

    def __len__(self) -> int:
        return len(self._entries)


def _shared_tokens(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading elements `a` and `b` share (as numbers)."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if np.array_equal(a[:n], b[:n]):
        return n
    return int(np.argmax(a[:n] != b[:n]))



def chain_hashes(
    tokens: np.ndarray, block_tokens: int, fingerprint: str, salt: str | bytes | None, num_blocks: int
) -> list[bytes]:
    """``[h_0, h_1, ..., h_num_blocks]`` for the first `num_blocks` full blocks of `tokens`."""
    return list(ChainHashes(tokens, block_tokens, fingerprint, salt, num_blocks))


def block_key(block_hash: bytes) -> str:
    return BLOCK_PREFIX + block_hash.hex()


@functools.lru_cache(maxsize=1 << 14)  # see the module docstring (a few MiB at most)
def span_key(end_hash: bytes, num_blocks: int) -> str:
    """Key of the span record of the `num_blocks` blocks that end where `end_hash` ends."""
    return SPAN_PREFIX + _hash(b"span", end_hash, num_blocks.to_bytes(8, "little")).hex()


def checkpoint_key(
    parent_hash: bytes, partial_tokens: np.ndarray, fingerprint: str, salt: str | bytes | None
) -> str:
    width = token_width(partial_tokens)
    fields = (parent_hash, width.to_bytes(8, "little"), token_bytes(partial_tokens, width),
              fingerprint.encode(), _salt_bytes(salt))
    return CHECKPOINT_PREFIX + _hash(b"checkpoint", *fields).hex()


def index_key(parent_hash: bytes) -> str:
    return INDEX_PREFIX + parent_hash.hex()
