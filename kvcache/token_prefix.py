"""How long a prefix a token array shares with the hashed token bytes of a chain hashed before
(keys.py `ChainMemo`): one C pass, with numpy when there is no C compiler.

Owns nothing but the loaded C helper (built once per machine, model_shards/native_build.py).
Why: a lookup of a sequence hashed recently (a resent prompt, the next turn) finds its chain
hashes by comparing every token with the ones hashed then; in numpy that is three passes over
the token ids (their range, their conversion to uint32, the comparison) and a conversion buffer,
~0.1 ms at 64K tokens when the ids are not in cache; in C one pass that reads each id once.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np

from model_shards.native_build import build_or_warn

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]

_SOURCE = r"""
#include <stdint.h>

/* How many leading ids of a[0, n) equal the uint32 words b[0, n) as numbers (an id outside
   [0, 2**32) equals none). Compares 64 ids at a time without branching, then finds the first
   difference inside the first block that has one. */
int64_t shared_u32_prefix(const int64_t* a, const uint32_t* b, int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t diff = 0;
        for (int k = 0; k < 64; k++) diff |= (uint64_t)a[i + k] ^ (uint64_t)b[i + k];
        if (diff) break;
    }
    for (; i < n; i++) if ((uint64_t)a[i] != (uint64_t)b[i]) return i;
    return n;
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    if sys.byteorder != "little":
        return None
    lib = build_or_warn("dsv4_token_prefix", _SOURCE, _FLAGS, "token prefix helper",
                        "the KV cache compares token prefixes with numpy")
    if lib is not None:
        lib.shared_u32_prefix.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        lib.shared_u32_prefix.restype = ctypes.c_int64
    return lib


def shared_u32_prefix(tokens: np.ndarray, words: np.ndarray) -> int:
    """How many leading ids of `tokens` (a contiguous int64 array) equal `words` (a contiguous
    uint32 array) as numbers; an id outside [0, 2**32) equals no word."""
    n = min(len(tokens), len(words))
    if n == 0:
        return 0
    lib = _library()
    if lib is not None and tokens.dtype == np.int64 and tokens.flags.c_contiguous and words.flags.c_contiguous:
        return int(lib.shared_u32_prefix(tokens.ctypes.data, words.ctypes.data, n))
    a, b = tokens[:n], words[:n].astype(np.int64)
    if np.array_equal(a, b):
        return n
    return int(np.argmax(a != b))
