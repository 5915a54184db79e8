"""Record checksums: what `record.py` stores as ``kv.checksum`` (``"<algo>:<hex>"``).

Owns no state. Each algorithm digests a small header (every field a reader relies on besides
the tensor bytes) and the record's data region (a multiple of 8 bytes for the sum-based ones):

- ``"colsum64"`` (the default): the data region viewed as ``n`` little-endian uint64 words in
  rows of `col_words(n)` words (odd, at least 513, and at least ``n / 512``), the last row
  zero-padded; the digest is SHA-256 (first 16 bytes) over the header, ``n``, the row width and
  every column's sum (mod 2**64). ONE numpy reduction that runs at memory bandwidth (the
  column sums live in L1), so verifying costs about half a copy of the bytes (``"rowcol64"``
  needs two reductions, crc32 and blake2b are byte-serial and 5-40x slower here). A change
  goes unnoticed only if it leaves every column sum as it was:
  - always detected: any change confined to one word, or to any run of `col_words(n)`
    (>= 513) consecutive words (4 KiB and more: each column then holds at most one changed
    word); any change of two or three words unless all of them share a column (lie multiples
    of the row width apart) and their changes cancel; truncation and appended bytes (``n`` is
    digested, the header holds the shapes);
  - random damage passes with probability at most ~2**-64 (every column it touches must keep
    its sum), and so does a swap, loss, duplication or misplacement of 4 KiB pages: the row
    width is odd and at least n / 512, so no multiple of 512 words inside the buffer is a
    multiple of it and a moved word never lands in its own column.
  What it gives up against ``"rowcol64"``: two words exactly k row widths apart (k >= 1) whose
  changes cancel (e.g. swapped with each other) are not noticed; rowcol64 catches every change
  of up to three words. Corruption in this system comes from storage and transport (bit flips,
  torn, truncated or misplaced writes), not from an adversary (anyone who can write the store
  can also write a valid checksum), and those patterns are caught.
  The sums need not come from this module: `verify_column_sums` checks sums made by a pass that
  copied the bytes at the same time (model_shards/byte_kernels.py, the restore's fused verify +
  copy); the digest is defined once (`_colsum64_digest`), so both give the same bits.
- ``"rowcol64"``: the words in rows of `row_words(n)` words (the power of two nearest above
  sqrt(n), at least 16); the digest is blake2b-128 over the header, the length, every row's sum
  and every column's sum (both mod 2**64) and the words of the last, partial row. Two
  reductions. Guarantee: every corruption confined to at most 3 words is detected (some row or
  column then holds exactly one changed word, so its sum changes); the smallest undetected
  pattern is 4 words on a rectangle with cancelling deltas; random damage ~2**-64.
- ``"crc32"`` (zlib) and ``"blake2b"`` (128-bit, cryptographic): byte-serial, slower.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

ALGORITHMS = ("colsum64", "rowcol64", "crc32", "blake2b")
DEFAULT_ALGORITHM = "colsum64"
MIN_ROW_WORDS = 16
MIN_COL_WORDS = 513  # odd, and a 4 KiB page (512 words) fits in one row
_PAGE_WORDS = 512


class UnknownChecksum(ValueError):
    """The stored checksum names an algorithm this reader does not know."""


def row_words(num_words: int) -> int:
    """Row width of `rowcol64` for `num_words` words: 2**ceil(log2(sqrt(n))), at least 16."""
    width = MIN_ROW_WORDS
    while width * width < num_words:
        width *= 2
    return width


def col_words(num_words: int) -> int:
    """Row width of `colsum64` for `num_words` words: odd, >= 513 and >= num_words / 512."""
    return max(MIN_COL_WORDS, -(-num_words // _PAGE_WORDS)) | 1


_WORD = np.dtype("<u8")
_add_reduce = np.add.reduce


def _colsum64(header: bytes, data) -> str:
    if type(data) is np.ndarray and data.ndim == 1 and data.dtype.char == "B" and data.flags.c_contiguous:
        words = data.view(_WORD)  # (a byte array's view: no buffer-protocol round trip)
    else:
        words = np.frombuffer(data, dtype=_WORD)  # raises for a length that is not a multiple of 8
    num_words = len(words)
    width = col_words(num_words)
    num_rows = num_words // width
    if num_rows:
        sums = _add_reduce(words[:num_rows * width].reshape(num_rows, width), 0, _WORD)
    else:
        sums = np.zeros(width, dtype=_WORD)
    if num_words > num_rows * width:
        tail = words[num_rows * width:]
        sums[:len(tail)] += tail  # the last row, zero-padded
    return _colsum64_digest(header, num_words, width, sums)


def _colsum64_digest(header: bytes, num_words: int, width: int, sums) -> str:
    """colsum64's hex digest from its column sums (`width` little-endian uint64 words, any
    buffer): the one place the digest is defined (`_colsum64` and `verify_column_sums`)."""
    digest = hashlib.sha256(header)
    digest.update(num_words.to_bytes(8, "little") + width.to_bytes(8, "little"))
    digest.update(sums)
    return digest.hexdigest()[:32]


def verify_column_sums(stored: str, header: bytes, num_words: int, sums) -> bool:
    """Whether `stored` (a ``"colsum64:<hex>"`` checksum) matches data of `num_words` words
    whose column sums (rows of `col_words(num_words)` words, as `width` little-endian uint64
    words in a buffer) are `sums`: the check of a pass that summed the words while copying
    them (model_shards/byte_kernels.py). False for any other algorithm or a wrong width."""
    width = col_words(num_words)
    num_bytes = sums.nbytes if type(sums) is np.ndarray else memoryview(sums).nbytes
    if not stored.startswith("colsum64:") or num_bytes != 8 * width:
        return False
    return "colsum64:" + _colsum64_digest(header, num_words, width, sums) == stored


def _rowcol64(header: bytes, data: memoryview) -> str:
    if data.nbytes % 8:
        raise ValueError(f"rowcol64 needs a multiple of 8 bytes, got {data.nbytes}")
    words = np.frombuffer(data, dtype="<u8")
    width = row_words(len(words))
    num_full = (len(words) // width) * width
    digest = hashlib.blake2b(header, digest_size=16)
    digest.update(data.nbytes.to_bytes(8, "little"))
    if num_full:
        rows = words[:num_full].reshape(-1, width)
        digest.update(rows.sum(axis=1, dtype=np.uint64).tobytes())
        digest.update(rows.sum(axis=0, dtype=np.uint64).tobytes())
    digest.update(words[num_full:].tobytes())
    return digest.hexdigest()


def compute(algorithm: str, header: bytes, data: memoryview) -> str:
    """``"<algorithm>:<hex digest>"`` of `header` and the bytes of `data` (a 1-D byte view)."""
    if algorithm == "colsum64":
        num_bytes = data.nbytes if type(data) is np.ndarray else memoryview(data).nbytes
        if num_bytes % 8:
            raise ValueError(f"colsum64 needs a multiple of 8 bytes, got {num_bytes}")
        return "colsum64:" + _colsum64(header, data)
    if algorithm == "rowcol64":
        return f"rowcol64:{_rowcol64(header, data)}"
    if algorithm == "crc32":
        return f"crc32:{zlib.crc32(data, zlib.crc32(header)):08x}"
    if algorithm == "blake2b":
        digest = hashlib.blake2b(header, digest_size=16)
        digest.update(data)
        return f"blake2b:{digest.hexdigest()}"
    raise UnknownChecksum(f"unknown checksum algorithm {algorithm!r}")


def verify(stored: str, header: bytes, data: memoryview) -> bool:
    """Whether `stored` (``"<algorithm>:<hex>"``) matches; raises `UnknownChecksum`."""
    return compute(stored.partition(":")[0], header, data) == stored
