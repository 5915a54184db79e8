"""Few-row fp32 matmuls on CPUs, as small C kernels (a transform in the gpt-fast sense: the math is
`F.linear`'s and the routed experts', only how the weights are read changes).

Why: a decode step multiplies a handful of rows (batch 1-16) by every weight matrix once, so it is
bound by how fast the weights stream from memory. MKL's sgemm reads them far below bandwidth at
few rows (measured ~10 GB/s on the 2-core AMD EPYC these benchmarks run on, against 28-40 GB/s
for a plain pass over the same bytes), and oneDNN's fast path needs packed weights that
torch.compile cannot take as inputs. These kernels read every weight row once, from a register
tile of 4 weight rows x 2 input rows (8 accumulators of 8 floats: the loads and FMAs overlap
the stream), and split the output columns over the threads.

    linear_rows(x, w)            x [..., K] @ w[N, K].T -> [..., N]   (<= MAX_ROWS rows)
    routed_experts(x, ids, weights, w13, w2t, limit)
                                 Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) -> [T, D]

Both are registered torch ops (`torch.ops.dsv4.*`, a CPU kernel and a fake), so compiled regions
call them as opaque kernels; `linear` below picks `linear_rows` for few-row fp32 CPU inputs, and
`DecodeExperts` is an ExpertBank's decode path. The C source is compiled once per machine with the
system C compiler (`cc -O3 -march=native -fopenmp`; with the torch wheels used here its OpenMP
calls bind to torch's own libgomp, so there is one thread pool) into $DSV4_KERNEL_CACHE (default
~/.cache/dsv4-serve/kernels), keyed by the source, the flags and the CPU's feature flags. Without a
compiler (or on a failed build) it says so once: `linear_rows` runs F.linear and `DecodeExperts`
steps aside for the bank's grouped GEMM. Slower, never wrong.

Owns: the loaded library (one per process, `_library`). Summation order differs from MKL's, so
results match F.linear to fp32 rounding (~1e-6 relative), not bitwise; each kernel's own order is
fixed (threads own fixed column ranges / expert ranges), so a call is deterministic.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings

import torch
import torch.nn.functional as F

MAX_ROWS = 16                   # linear_rows: more rows than this and MKL's blocked sgemm wins
PARALLEL_MIN_WEIGHTS = 1 << 17  # linear_rows: smaller weight matrices (floats) run on one thread
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 ld(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float* p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum(v8 v) {   /* a fixed order: the same result on every call */
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* out[r][c] = w_r . x_c for 4 weight rows and 2 input rows (K % 8 == 0): 8 vector accumulators,
   4 weight loads and 2 input loads per 8 FMAs. Every output of the kernels comes from this one
   tile (tails repeat a row pointer and drop the extra outputs), so a dot product's rounding never
   depends on where its row or column falls. */
static inline void tile(const float* w0, const float* w1, const float* w2, const float* w3,
                        const float* x0, const float* x1, int64_t K, float out[2][4]) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (int64_t k = 0; k < K; k += 8) {
        v8 r0 = ld(w0 + k), r1 = ld(w1 + k), r2 = ld(w2 + k), r3 = ld(w3 + k);
        v8 c0 = ld(x0 + k), c1 = ld(x1 + k);
        a0 += r0 * c0; a1 += r1 * c0; a2 += r2 * c0; a3 += r3 * c0;
        b0 += r0 * c1; b1 += r1 * c1; b2 += r2 * c1; b3 += r3 * c1;
    }
    out[0][0] = hsum(a0); out[0][1] = hsum(a1); out[0][2] = hsum(a2); out[0][3] = hsum(a3);
    out[1][0] = hsum(b0); out[1][1] = hsum(b1); out[1][2] = hsum(b2); out[1][3] = hsum(b3);
}

/* y[m, n] = sum_k x[m, k] w[n, k] for n in [n0, n1). The 4 weight rows of a tile (16K floats at
   most) stay in L1 while the input row pairs pass over them: each weight row is read from memory
   once per call. */
static void rows_range(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
                       int64_t M, int64_t K, int64_t n0, int64_t n1) {
    float out[2][4];
    for (int64_t n = n0; n < n1; n += 4) {
        int64_t nn = n1 - n < 4 ? n1 - n : 4;
        const float* wr[4];
        for (int r = 0; r < 4; r++) wr[r] = w + (n + (r < nn ? r : nn - 1)) * ldw;
        for (int64_t m = 0; m < M; m += 2) {
            int64_t mm = M - m < 2 ? M - m : 2;
            const float* x0 = x + m * ldx;
            tile(wr[0], wr[1], wr[2], wr[3], x0, mm == 2 ? x0 + ldx : x0, K, out);
            for (int64_t c = 0; c < mm; c++)
                for (int64_t r = 0; r < nn; r++) y[(m + c) * ldy + n + r] = out[c][r];
        }
    }
}

/* The column range of thread t of nt: multiples of 4 columns, as even as that allows. */
static void split(int64_t N, int t, int nt, int64_t* n0, int64_t* n1) {
    int64_t quads = (N + 3) / 4;
    int64_t q0 = quads * t / nt, q1 = quads * (t + 1) / nt;
    *n0 = q0 * 4 < N ? q0 * 4 : N;
    *n1 = q1 * 4 < N ? q1 * 4 : N;
}

void linear_rows(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
                 int64_t M, int64_t N, int64_t K, int num_threads) {
    if (num_threads <= 1 || N < 8) { rows_range(x, ldx, w, ldw, y, ldy, M, K, 0, N); return; }
    #pragma omp parallel num_threads(num_threads)
    {
        int64_t n0, n1;
        split(N, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        rows_range(x, ldx, w, ldw, y, ldy, M, K, n0, n1);
    }
}

/* y[t] += scale[m] * (act[m] @ w2t) for the rows t = rows[m]: act [M, I], w2t [I, D] (D % 8 == 0).
   Streams w2t's rows once; each row is added into the M outputs (which stay in L1). */
static void down_rows(const float* act, int64_t I, const float* w2t, int64_t D, const int64_t* rows,
                      const float* scale, int64_t M, float* y) {
    for (int64_t i = 0; i < I; i++) {
        const float* r = w2t + i * D;
        for (int64_t m = 0; m < M; m++) {
            float a = act[m * I + i] * scale[m];
            if (a == 0.0f) continue;
            v8 av = {a, a, a, a, a, a, a, a};
            float* out = y + rows[m] * D;
            for (int64_t d = 0; d < D; d += 8) st(out + d, ld(out + d) + av * ld(r + d));
        }
    }
}

/* The routed experts of a decode step: pairs (t, j) with local_ids[t, j] >= 0, grouped by expert.
   Expert e: h = x[rows] @ w13[e].T [M, 2I]; act = silu(min(gate, limit)) * clamp(up, -limit, limit)
   (limit <= 0: no clamp); y[rows] += weight * (act @ w2t[e]). Threads take fixed contiguous ranges
   of experts (balanced by pairs) and write private outputs, summed in thread order at the end, so
   a call's result does not depend on timing. `scratch`: num_threads * T * D + per-thread work
   space of (T * k) * (3I + D) floats, zeroed here. */
void routed_experts(const float* x, int64_t T, int64_t D, int64_t I, const int64_t* local_ids,
                    const float* weights, int64_t k, int64_t E, const float* w13, const float* w2t,
                    float limit, float* y, float* scratch, int64_t* order, int num_threads) {
    int64_t P = T * k;
    /* counting sort of the pairs by expert (stable: pair order within an expert) */
    int64_t* start = order + P;              /* [E + 1] */
    memset(start, 0, (E + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) if (local_ids[p] >= 0) start[local_ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    int64_t* fill = start + E + 1;           /* [E] */
    memcpy(fill, start, E * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) if (local_ids[p] >= 0) order[fill[local_ids[p]]++] = p;
    int64_t num_pairs = start[E];
    int nt = num_threads < 1 ? 1 : num_threads;
    if (num_pairs < 2 * nt) nt = 1;
    int64_t work = P * (3 * I + D);
    memset(scratch, 0, (size_t)nt * T * D * sizeof(float));
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        float* yt = scratch + (int64_t)t * T * D;
        float* ws = scratch + (int64_t)nt * T * D + (int64_t)t * work;
        float *xs = ws, *h = xs + P * D, *act = h + P * 2 * I;   /* [M, D], [M, 2I], [M, I] */
        int64_t rows[64]; float scale[64];
        /* experts [e0, e1): the ones whose pairs fall in this thread's share of all pairs */
        int64_t p0 = num_pairs * t / n, p1 = num_pairs * (t + 1) / n;
        for (int64_t e = 0; e < E; e++) {
            int64_t b = start[e], c = start[e + 1];
            if (b == c || b < p0 || b >= p1) continue;   /* an expert belongs to the thread owning its first pair */
            for (int64_t q = b; q < c; q += 64) {
                int64_t M = c - q < 64 ? c - q : 64;
                for (int64_t m = 0; m < M; m++) {
                    int64_t p = order[q + m];
                    rows[m] = p / k; scale[m] = weights[p];
                    memcpy(xs + m * D, x + rows[m] * D, D * sizeof(float));
                }
                rows_range(xs, D, w13 + e * 2 * I * D, D, h, 2 * I, M, D, 0, 2 * I);
                for (int64_t m = 0; m < M; m++) {
                    for (int64_t i = 0; i < I; i++) {
                        float g = h[m * 2 * I + i], u = h[m * 2 * I + I + i];
                        if (limit > 0) { g = g < limit ? g : limit; u = u < -limit ? -limit : (u > limit ? limit : u); }
                        act[m * I + i] = g / (1.0f + expf(-g)) * u;
                    }
                }
                down_rows(act, I, w2t + e * I * D, D, rows, scale, M, yt);
            }
        }
    }
    for (int64_t i = 0; i < T * D; i++) {
        float s = 0.0f;
        for (int t = 0; t < nt; t++) s += scratch[(int64_t)t * T * D + i];
        y[i] = s;
    }
}
"""


def _cache_dir() -> str:
    return os.environ.get("DSV4_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv4-serve",
                                                                "kernels")


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for): a cached build is only reused on
    a CPU with the same features."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (atomically: concurrent processes may race), or None
    (warned once) when there is no C compiler or the build fails."""
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"dsv4_kernels_{key}.so")
    try:
        if not os.path.exists(path):
            os.makedirs(_cache_dir(), exist_ok=True)
            staged = f"{path}.{os.getpid()}.tmp"    # built beside its final name, then renamed in
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "kernels.c")
                with open(src, "w") as f:
                    f.write(_SOURCE)
                cc = os.environ.get("CC", "cc")
                subprocess.run([cc, *_FLAGS, src, "-o", staged, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(staged, path)
        lib = ctypes.CDLL(path)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"CPU decode kernels unavailable ({type(e).__name__}: {e} {detail.decode(errors='replace')[:300]}); "
                      "few-row matmuls use torch")
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.linear_rows.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.linear_rows.restype = None
    lib.routed_experts.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr, ptr, ptr,
                                   ctypes.c_int]
    lib.routed_experts.restype = None
    return lib


def is_available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


# ---- the ops ------------------------------------------------------------------------------------
# Registered with the plain dispatcher API (a CPU kernel and a fake): ~12 us a call, where
# torch.library.custom_op's Python wrapper costs ~80 us. Eager callers skip even that (`linear`,
# DecodeExperts call the functions directly); compiled regions reach them as opaque ops.
_OPS = torch.library.Library("dsv4", "DEF")
_OPS.define("linear_rows(Tensor x, Tensor w) -> Tensor")
_OPS.define("routed_experts(Tensor x, Tensor local_ids, Tensor weights, Tensor w13, Tensor w2t, float limit) -> Tensor")


def linear_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for fp32 CPU x [..., K] with few rows; F.linear itself when the kernels are
    missing or the layout does not fit (K not a multiple of 8, strided rows). Kept lean: it runs
    ~50 times a decode step."""
    lib = _library()
    K, N = x.shape[-1], w.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    if (lib is None or K % 8 or x2.dtype != torch.float32 or w.dtype != torch.float32 or x2.stride(-1) != 1
            or w.stride(-1) != 1 or w.stride(0) < K or (M > 1 and x2.stride(0) < K)
            or x2.device.type != "cpu" or w.device.type != "cpu"):
        return F.linear(x, w)
    y = torch.empty(M, N)
    if M:
        # small matrices stay on one thread: waking the pool costs more than it saves
        lib.linear_rows(x2.data_ptr(), x2.stride(0), w.data_ptr(), w.stride(0), y.data_ptr(), N, M, N, K,
                        torch.get_num_threads() if N * K >= PARALLEL_MIN_WEIGHTS else 1)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


_OPS.impl("linear_rows", linear_rows, "CPU")


@torch.library.register_fake("dsv4::linear_rows")
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (no bias): through `linear_rows` for fp32 CPU inputs of at most MAX_ROWS rows,
    else F.linear. Traceable: in a compiled region the choice is a guard on the row count."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.dim() >= 1
            and x.numel() <= MAX_ROWS * x.shape[-1]):
        return torch.ops.dsv4.linear_rows(x, w) if torch.compiler.is_compiling() else linear_rows(x, w)
    return F.linear(x, w)


# ---- routed_experts ----------------------------------------------------------------------------

def routed_experts(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                   w2t: torch.Tensor, limit: float) -> torch.Tensor:
    """Σ_j weights[t, j] · expert_{local_ids[t, j]}(x[t]) for x [T, D] fp32, local_ids [T, k] (-1:
    not held), w13 [E, 2I, D], w2t [E, I, D] -> [T, D]; `limit` the SwiGLU clamp (<= 0: none).
    Requires the kernels (`is_available()`) and D % 8 == 0."""
    lib = _library()
    if lib is None:
        raise RuntimeError("dsv4 CPU kernels are not available")
    T, D = x.shape
    k, E, I = local_ids.shape[1], w13.shape[0], w2t.shape[1]
    if (D % 8 or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (x, w13, w2t))
            or local_ids.device.type != "cpu" or weights.device.type != "cpu"):
        raise ValueError(f"routed_experts takes fp32 CPU inputs with hidden % 8 == 0 (got {x.dtype} on "
                         f"{x.device}, hidden {D})")
    x, w13, w2t = x.contiguous(), w13.contiguous(), w2t.contiguous()
    ids = local_ids.to(torch.int64).contiguous()
    wts = weights.to(torch.float32).contiguous()
    nt = max(1, torch.get_num_threads())
    P = T * k
    scratch = torch.empty(nt * T * D + nt * P * (3 * I + D), dtype=torch.float32)
    order = torch.empty(P + 2 * E + 1, dtype=torch.int64)
    y = torch.empty(T, D, dtype=torch.float32)
    lib.routed_experts(x.data_ptr(), T, D, I, ids.data_ptr(), wts.data_ptr(), k, E, w13.data_ptr(),
                       w2t.data_ptr(), float(limit), y.data_ptr(), scratch.data_ptr(), order.data_ptr(), nt)
    return y


_OPS.impl("routed_experts", routed_experts, "CPU")


@torch.library.register_fake("dsv4::routed_experts")
def _(x, local_ids, weights, w13, w2t, limit):
    return torch.empty_like(x)


class DecodeExperts:
    """An ExpertBank's CPU decode path: `routed_experts` for steps with few (token, expert) pairs.
    Past `MAX_PAIRS_PER_EXPERT` pairs per held expert (prefill) MKL's grouped GEMM reads its weights
    as fast and computes faster, and the bank uses that. Owns: only its on / off flag."""

    MAX_PAIRS_PER_EXPERT = 4

    def __init__(self, is_enabled: bool = True):
        self.is_enabled = is_enabled

    def can_run(self, x: torch.Tensor, w13: torch.Tensor, num_pairs: int, num_experts: int) -> bool:
        return (self.is_enabled and x.device.type == "cpu" and x.dtype == torch.float32
                and w13.dtype == torch.float32 and x.shape[-1] % 8 == 0
                and 0 < num_pairs <= self.MAX_PAIRS_PER_EXPERT * num_experts and is_available())

    def __call__(self, x, local_ids, weights, w13, w2t, limit: float) -> torch.Tensor:
        """x [T, D], local_ids / weights [T, k] -> [T, D] (pairs with id -1 are skipped)."""
        return routed_experts(x, local_ids, weights, w13.detach(), w2t.detach(), float(limit))
