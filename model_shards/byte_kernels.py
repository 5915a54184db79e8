"""Byte copies that also sum what they read: the KV cache restore's verify + copy in ONE pass.

Why: a restored record's bytes were read twice, once by its checksum pass (kvcache/checksum.py,
``colsum64``: sums of its 8-byte words by columns of a fixed row width) and once by the copy into
the state's pages; at 12.9 MB (tiny preset, 64K tokens) the two passes took ~1.5x a warm
``read()`` of the same file. `colsum64_copy` reads every word of a record's data region once:
words inside a copied range are added to their column's sum and stored to the destination in
the same loop, the others only summed. The caller turns the sums into the digest (the same
SHA-256 over the same column sums as checksum.py, so the digest is the same bit for bit) and,
on a mismatch, discards what it copied into.

    colsum64_copy(base, num_words, width, segments)   -> the column sums, or None (bad ranges)
    colsum64_copy_many(records, segments, num_threads) -> every record's sums in one call, or None
    copy_segments(segments, num_threads)              -> plain copies (already verified bytes)

`segments` are flat ints ``[source address, byte count, destination address, ...]``: every
source range must lie inside the region and the ranges must be sorted by source and not
overlap (checked in C before anything is written; destinations are the caller's
responsibility). Addresses are raw pointers: the caller keeps the arrays alive.
`colsum64_copy_many` does `colsum64_copy` for several records in one call (a restore's run
records: one call per load instead of one per record, each ~10 us of Python and ctypes):
``records`` is ``[base, num_words, width, num_segments] * n`` and ``segments`` the records'
segments one record after another; every record's ranges are checked before anything is
written.

The C source is built once per machine (native_build.py, ``cc -O3 -march=native``); without a
compiler (or on a failed build) `is_available` is False, with one warning, and callers keep
their numpy path (a checksum pass, then a copy). Little-endian machines only (the sums are
digested as little-endian words): elsewhere `is_available` is False.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np

from .native_build import build_or_warn

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]

_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef uint64_t u64x4 __attribute__((vector_size(32)));

static inline u64x4 ld(const uint8_t* p) { u64x4 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(uint8_t* p, u64x4 v) { memcpy(p, &v, sizeof v); }

/* sums[i] += word i of src, i < n */
static void sum_words(uint64_t* restrict sums, const uint8_t* restrict src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        u64x4 a = ld(src + 8 * i), b = ld(src + 8 * i + 32);
        u64x4 s = ld((const uint8_t*)(sums + i)), t = ld((const uint8_t*)(sums + i + 4));
        st((uint8_t*)(sums + i), s + a); st((uint8_t*)(sums + i + 4), t + b);
    }
    for (; i < n; i++) { uint64_t w; memcpy(&w, src + 8 * i, 8); sums[i] += w; }
}

/* the same, and word i stored to dst: each word is loaded once */
static void sum_copy_words(uint64_t* restrict sums, const uint8_t* restrict src, uint8_t* restrict dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        u64x4 a = ld(src + 8 * i), b = ld(src + 8 * i + 32);
        u64x4 s = ld((const uint8_t*)(sums + i)), t = ld((const uint8_t*)(sums + i + 4));
        st(dst + 8 * i, a); st(dst + 8 * i + 32, b);
        st((uint8_t*)(sums + i), s + a); st((uint8_t*)(sums + i + 4), t + b);
    }
    for (; i < n; i++) { uint64_t w; memcpy(&w, src + 8 * i, 8); sums[i] += w; memcpy(dst + 8 * i, &w, 8); }
}

static int check_segments(const uint8_t* base, int64_t num_bytes, const int64_t* segs, int64_t num_segs) {
    uintptr_t lo = (uintptr_t)base, hi = lo + (uintptr_t)num_bytes, prev = lo;
    for (int64_t k = 0; k < num_segs; k++) {
        uintptr_t src = (uintptr_t)segs[3 * k];
        int64_t n = segs[3 * k + 1];
        if (n < 0 || src < prev || src > hi || (uintptr_t)n > hi - src) return -1;
        prev = src + (uintptr_t)n;
    }
    return 0;
}

/* colsum64's column sums of the region base[0, 8 * num_words) in rows of `width` words (the
   last row zero-padded) into sums[width], copying the ranges `segs` (see byte_kernels.py) on
   the way. A copied word is summed from the register it was loaded into; bytes of a range that
   share a word with bytes outside it (ranges need not be word-aligned) are copied apart and
   their word summed once, with the uncopied words. The ranges were checked (check_segments). */
static void sum_copy_record(const uint8_t* base, int64_t num_words, int64_t width, uint64_t* sums,
                            const int64_t* segs, int64_t num_segs) {
    memset(sums, 0, (size_t)width * sizeof(uint64_t));
    int64_t k = 0, pos = 0;                      /* the next segment, the next word */
    int64_t start = 0, end = 0;                  /* segment k's whole words [start, end) */
    uint8_t* dst = 0;                            /* where word `start` of segment k goes */
    int has_words = 0;
    while (pos < num_words) {
        while (!has_words && k < num_segs) {     /* the next segment with whole words, edges copied */
            int64_t s = (int64_t)((const uint8_t*)(uintptr_t)segs[3 * k] - base), n = segs[3 * k + 1];
            uint8_t* d = (uint8_t*)(uintptr_t)segs[3 * k + 2];
            int64_t ws = (s + 7) / 8, we = (s + n) / 8;
            if (ws >= we) { if (n) memcpy(d, base + s, (size_t)n); k++; continue; }
            if (8 * ws > s) memcpy(d, base + s, (size_t)(8 * ws - s));
            if (8 * we < s + n) memcpy(d + (8 * we - s), base + 8 * we, (size_t)(s + n - 8 * we));
            start = ws; end = we; dst = d + (8 * ws - s); has_words = 1; k++;
        }
        int64_t row_end = (pos / width + 1) * width;
        if (row_end > num_words) row_end = num_words;
        int64_t col = pos % width;
        if (has_words && pos >= start) {         /* inside the segment's words */
            int64_t stop = end < row_end ? end : row_end;
            sum_copy_words(sums + col, base + 8 * pos, dst + 8 * (pos - start), stop - pos);
            pos = stop;
            if (pos == end) has_words = 0;
        } else {
            int64_t stop = has_words && start < row_end ? start : row_end;
            sum_words(sums + col, base + 8 * pos, stop - pos);
            pos = stop;
        }
    }
    while (k < num_segs) {                       /* (ranges of the last partial word, or empty) */
        int64_t s = (int64_t)((const uint8_t*)(uintptr_t)segs[3 * k] - base), n = segs[3 * k + 1];
        if (n) memcpy((uint8_t*)(uintptr_t)segs[3 * k + 2], base + s, (size_t)n);
        k++;
    }
}

/* Records [r0, r1) of a call: their sums and segments start at `sums` and `segs`. */
typedef struct { const int64_t* recs; uint64_t* sums; const int64_t* segs; int64_t r0, r1; } job_t;

static void* run_job(void* arg) {
    const job_t* j = (const job_t*)arg;
    uint64_t* sums = j->sums;
    const int64_t* s = j->segs;
    for (int64_t r = j->r0; r < j->r1; r++) {
        const int64_t* rec = j->recs + 4 * r;
        sum_copy_record((const uint8_t*)(uintptr_t)rec[0], rec[1], rec[2], sums, s, rec[3]);
        sums += rec[2];
        s += 3 * rec[3];
    }
    return 0;
}

#define MIN_THREAD_BYTES (1 << 20)   /* below this per thread, a thread's start (~20-50 us) outweighs it */
#define MAX_THREADS 16

/* How many threads `num_bytes` of work in at most `max_parts` parts gets: <= num_threads,
   MAX_THREADS and max_parts, >= MIN_THREAD_BYTES each, and at least 1. */
static int64_t thread_count(int64_t num_threads, int64_t num_bytes, int64_t max_parts) {
    int64_t t = num_threads < MAX_THREADS ? num_threads : MAX_THREADS;
    if (t > max_parts) t = max_parts;
    if (t > num_bytes / MIN_THREAD_BYTES) t = num_bytes / MIN_THREAD_BYTES;
    return t < 1 ? 1 : t;
}

/* fn(job i) for the n jobs of `jobs` (each `size` bytes): job 0 on this thread, the others on
   threads of their own (one that cannot start runs here after job 0); returns when all are done. */
static void run_jobs(void* (*fn)(void*), void* jobs, size_t size, int64_t n) {
    pthread_t threads[MAX_THREADS];
    int is_started[MAX_THREADS] = {0};
    for (int64_t i = 1; i < n; i++)
        is_started[i] = pthread_create(&threads[i], 0, fn, (char*)jobs + i * size) == 0;
    if (n > 0) fn(jobs);
    for (int64_t i = 1; i < n; i++) {
        if (is_started[i]) pthread_join(threads[i], 0);
        else fn((char*)jobs + i * size);
    }
}

/* The column sums of n records, copying their segments on the way: recs[4 r .. 4 r + 4) = (base,
   num_words, width, num_segs) of record r, its segments follow record r-1's in segs, its sums
   record r-1's in sums. Every record is checked first: 0, or -1 - r (nothing written) for the
   first record r with a bad width or bad ranges. With num_threads > 1 the records are cut into
   up to that many consecutive groups of about equal bytes (each >= MIN_THREAD_BYTES), one per
   thread (this one runs the first): the records' sums do not depend on each other, so the
   results are the same bytes; different records' destinations must not overlap. */
int colsum64_copy_many(int64_t n, const int64_t* recs, uint64_t* sums, const int64_t* segs, int64_t num_threads) {
    const int64_t* s = segs;
    int64_t total_words = 0;
    for (int64_t r = 0; r < n; r++) {
        const int64_t* rec = recs + 4 * r;
        if (rec[2] < 1 || rec[1] < 0 || rec[3] < 0
            || check_segments((const uint8_t*)(uintptr_t)rec[0], 8 * rec[1], s, rec[3])) return (int)(-1 - r);
        s += 3 * rec[3];
        total_words += rec[1];
    }
    int64_t t = thread_count(num_threads, 8 * total_words, n);
    job_t jobs[MAX_THREADS];
    int64_t r = 0, words = 0, num_jobs = 0;
    s = segs;
    for (int64_t i = 0; i < t && r < n; i++) {   /* job i: records until (i + 1) / t of the words */
        job_t* j = &jobs[num_jobs++];
        j->recs = recs; j->sums = sums; j->segs = s; j->r0 = r;
        do {
            words += recs[4 * r + 1];
            sums += recs[4 * r + 2];
            s += 3 * recs[4 * r + 3];
            r++;
        } while (r < n && (i == t - 1 || words * t < total_words * (i + 1)));
        j->r1 = r;
    }
    run_jobs(run_job, jobs, sizeof(job_t), num_jobs);
    return 0;
}

/* Bytes [lo, hi) of the segments' concatenation: job i of a threaded copy_segments. */
typedef struct { const int64_t* segs; int64_t num_segs, lo, hi; } copy_job_t;

static void* run_copy_job(void* arg) {
    const copy_job_t* j = (const copy_job_t*)arg;
    int64_t at = 0;                              /* where segment k starts in the concatenation */
    for (int64_t k = 0; k < j->num_segs && at < j->hi; k++) {
        const int64_t* seg = j->segs + 3 * k;
        int64_t a = j->lo > at ? j->lo : at, b = j->hi < at + seg[1] ? j->hi : at + seg[1];
        if (a < b)
            memcpy((uint8_t*)(uintptr_t)seg[2] + (a - at), (const uint8_t*)(uintptr_t)seg[0] + (a - at), (size_t)(b - a));
        at += seg[1];
    }
    return 0;
}

/* Copy every segment (no checks: the caller's ranges). With num_threads > 1 the bytes are cut
   into up to that many equal parts (>= MIN_THREAD_BYTES each), a segment split where a part
   ends; every byte is still copied once. */
void copy_segments(const int64_t* segs, int64_t num_segs, int64_t num_threads) {
    int64_t total = 0;
    for (int64_t k = 0; k < num_segs; k++) total += segs[3 * k + 1];
    int64_t t = thread_count(num_threads, total, MAX_THREADS);
    copy_job_t jobs[MAX_THREADS];
    for (int64_t i = 0; i < t; i++) {
        jobs[i].segs = segs; jobs[i].num_segs = num_segs;
        jobs[i].lo = total * i / t; jobs[i].hi = total * (i + 1) / t;
    }
    run_jobs(run_copy_job, jobs, sizeof(copy_job_t), t);
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None (warned once) without a C compiler,
    on a failed build, or on a big-endian machine."""
    if sys.byteorder != "little":
        return None
    lib = build_or_warn("dsv4_byte_kernels", _SOURCE, _FLAGS, "byte kernels",
                        "the KV cache restore verifies and copies in two numpy passes")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.colsum64_copy_many.argtypes = [i64, ptr, ptr, ptr, i64]
    lib.colsum64_copy_many.restype = ctypes.c_int
    lib.copy_segments.argtypes = [ptr, i64, i64]
    lib.copy_segments.restype = None
    return lib


def is_available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


def colsum64_copy(base: int, num_words: int, width: int, segments: list[int]) -> np.ndarray | None:
    """The column sums (uint64 [width]: native = little-endian words, usable as a buffer) of the
    `num_words` words at address `base` in rows of `width` words, copying `segments` (see the
    module docstring) on the way; None (nothing written) if a range lies outside the region,
    overlaps another or is out of order. Needs `is_available`. (`colsum64_copy_many` of one.)"""
    return colsum64_copy_many([base, num_words, width, len(segments) // 3], segments)


def colsum64_copy_many(records, segments, num_threads: int = 1) -> np.ndarray | None:
    """`colsum64_copy` of several records in one call: ``records`` holds ``(base, num_words,
    width, num_segments)`` per record (flat ints: a list or an int64 array), ``segments`` each
    record's segments (as in `colsum64_copy`) one record after another. Returns every record's
    column sums, one after another in one uint64 array (record r's: the `width` words after
    those of records < r), or None (nothing written) if any record's ranges are bad. Needs
    `is_available`.

    `num_threads` > 1: the records are shared out over up to that many threads (whole records,
    consecutive, about equal bytes, at least 1 MiB each; the calling thread runs one share and
    the GIL is released meanwhile). Each record's sums are computed as with one thread, so the
    results are the same; the destinations of different records must not overlap."""
    recs = np.ascontiguousarray(records, dtype=np.int64).reshape(-1)
    segs = np.ascontiguousarray(segments, dtype=np.int64).reshape(-1)
    listed = records if type(records) is list else recs.tolist()   # (checked as ints: cheaper than numpy here)
    widths, counts = listed[2::4], listed[3::4]
    if len(recs) % 4 or min(widths, default=1) < 1 or 3 * sum(counts) != len(segs):
        return None
    sums = np.empty(sum(widths), dtype=np.uint64)
    if _library().colsum64_copy_many(len(recs) // 4, recs.ctypes.data, sums.ctypes.data, segs.ctypes.data,
                                     max(1, int(num_threads))):
        return None
    return sums


def copy_segments(segments, num_threads: int = 1) -> None:
    """Copy every ``(source, byte count, destination)`` of `segments` (flat ints: a list or an
    int64 array; no checks: the caller's ranges). `num_threads` > 1: the bytes are cut into up
    to that many equal parts (at least 1 MiB each), one per thread, segments split where a part
    ends (sources and destinations must not overlap). Needs `is_available`."""
    if len(segments):
        if type(segments) is np.ndarray:
            segs = np.ascontiguousarray(segments, dtype=np.int64).reshape(-1)
            _library().copy_segments(segs.ctypes.data, len(segs) // 3, max(1, int(num_threads)))
        else:
            _library().copy_segments((ctypes.c_int64 * len(segments))(*segments), len(segments) // 3,
                                     max(1, int(num_threads)))
