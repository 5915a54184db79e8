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
    linear_groups(x, w)          x [M, G*K], w [G, N, K] -> [M, G*N]  (per-group linear_rows)
    sinkhorn(comb, iters, eps)   mHC's Sinkhorn passes on [..., n, n]
    routed_experts               (cpu_experts.py: the routed experts of a decode step)

They are registered torch ops (`torch.ops.dsv4.*`, a CPU kernel and a fake), so compiled regions
call them as opaque kernels; `linear` below picks `linear_rows` for few-row fp32 CPU inputs,
`grouped_linear` `linear_groups`, and cpu_experts.DecodeExperts is an ExpertBank's decode path. The C source is compiled once per machine with the
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

import torch
import torch.nn.functional as F

from .native_build import build_or_warn

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
   depends on where its row or column falls. Not inlined: inlined into the loops around it, GCC ran
   out of general registers, kept the row pointers in vector registers and reloaded every weight
   vector once per input row (2 loads per FMA: ~1 FMA a cycle where 2 are possible; measured 1.6-1.9x
   slower at 3-8 rows). */
static __attribute__((noinline)) void tile(const float* w0, const float* w1, const float* w2, const float* w3,
                        const float* x0, const float* x1, int64_t K, float out[2][4], const float* next,
                        int64_t ld_next) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (int64_t k = 0; k < K; k += 8) {
        if (next && !(k & 15)) {   /* one cache line of each next row per 16 floats of this one */
            __builtin_prefetch(next + k); __builtin_prefetch(next + ld_next + k);
            __builtin_prefetch(next + 2 * ld_next + k); __builtin_prefetch(next + 3 * ld_next + k);
        }
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
   once per call. The tiles of rows n prefetch rows n + 4..n + 7 (measured: the weight stream
   then overlaps the FMAs, 10-20% faster over a decode step's matrices at 1-8 rows). */
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
            tile(wr[0], wr[1], wr[2], wr[3], x0, mm == 2 ? x0 + ldx : x0, K, out,
                 n + 8 <= n1 ? w + (n + 4) * ldw : 0, ldw);
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

/* Grouped rows: y[m, g*N + n] = sum_k x[m, g*K + k] w[g, n, k] for G groups (attention's grouped
   output projection). The G*N output columns are split over the threads as one range, each
   column from the same tile as linear_rows. */
void linear_groups(const float* x, int64_t ldx, const float* w, float* y, int64_t M, int64_t G, int64_t N,
                   int64_t K, int num_threads) {
    if (num_threads <= 1 || G * N < 8) {
        for (int64_t g = 0; g < G; g++) rows_range(x + g * K, ldx, w + g * N * K, K, y + g * N, G * N, M, K, 0, N);
        return;
    }
    #pragma omp parallel num_threads(num_threads)
    {
        int64_t c0, c1;
        split(G * N, omp_get_thread_num(), omp_get_num_threads(), &c0, &c1);
        for (int64_t g = 0; g < G; g++) {
            int64_t n0 = c0 - g * N < 0 ? 0 : c0 - g * N, n1 = c1 - g * N > N ? N : c1 - g * N;
            if (n0 < n1) rows_range(x + g * K, ldx, w + g * N * K, K, y + g * N, G * N, M, K, n0, n1);
        }
    }
}

/* mHC's Sinkhorn on B matrices n x n (row-major, in place): a column pass, then num_iters - 1
   (row pass, column pass) pairs; a pass divides each element by its column's (row's) sum + eps,
   the sums taken first, in index order (numpy's order for these sizes: bitwise ops.sinkhorn). */
void sinkhorn(float* a, int64_t B, int64_t n, int64_t num_iters, float eps) {
    float sums[64];
    for (int64_t b = 0; b < B; b++) {
        float* m = a + b * n * n;
        for (int64_t it = 0; it < 2 * num_iters - 1; it++) {
            int is_col = (it % 2 == 0);   /* column passes at even steps: first and last */
            for (int64_t i = 0; i < n; i++) {
                float s = 0.0f;
                for (int64_t j = 0; j < n; j++) s += is_col ? m[j * n + i] : m[i * n + j];
                sums[i] = s + eps;
            }
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < n; j++) m[i * n + j] /= sums[is_col ? j : i];
        }
    }
}

/* y[t] += scale[m] * (act[m] @ w2t) for the rows t = rows[m], over w2t's rows [i0, i1): act [M, I],
   w2t [I, D] (D % 8 == 0). Streams those rows once; each is added into the M outputs (in L1). */
static void down_rows(const float* act, int64_t I, const float* w2t, int64_t D, const int64_t* rows,
                      const float* scale, int64_t M, float* y, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
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
   (limit <= 0: no clamp); y[rows] += weight * (act @ w2t[e]). Every thread takes a fixed share
   [i0, i1) of every hit expert's intermediate units (gate rows i, up rows I + i, down rows i: the
   unit's whole path, so no thread waits for another): each streams the same bytes whatever the
   routing (a split by experts left one thread most of them whenever few experts were hit). Threads
   write private outputs, summed in thread order at the end, so a result does not depend on timing.
   `scratch`: num_threads * T * D + per-thread work space of (T * k) * (3I + D) floats, zeroed here. */
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
    if (num_pairs == 0 || I < 8 * nt) nt = 1;
    int64_t work = P * (3 * I + D);
    memset(scratch, 0, (size_t)nt * T * D * sizeof(float));
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        float* yt = scratch + (int64_t)t * T * D;
        float* ws = scratch + (int64_t)nt * T * D + (int64_t)t * work;
        float *xs = ws, *h = xs + P * D, *act = h + P * 2 * I;   /* [M, D], [M, 2I], [M, I] */
        int64_t rows[64]; float scale[64];
        int64_t i0, i1;
        split(I, t, n, &i0, &i1);            /* this thread's intermediate units, multiples of 4 */
        for (int64_t e = 0; e < E; e++) {
            int64_t b = start[e], c = start[e + 1];
            if (b == c || i0 == i1) continue;
            for (int64_t q = b; q < c; q += 64) {
                int64_t M = c - q < 64 ? c - q : 64;
                for (int64_t m = 0; m < M; m++) {
                    int64_t p = order[q + m];
                    rows[m] = p / k; scale[m] = weights[p];
                    memcpy(xs + m * D, x + rows[m] * D, D * sizeof(float));
                }
                const float* we = w13 + e * 2 * I * D;
                rows_range(xs, D, we, D, h, 2 * I, M, D, i0, i1);            /* gate units [i0, i1) */
                rows_range(xs, D, we, D, h, 2 * I, M, D, I + i0, I + i1);    /* their up rows */
                for (int64_t m = 0; m < M; m++) {
                    for (int64_t i = i0; i < i1; i++) {
                        float g = h[m * 2 * I + i], u = h[m * 2 * I + I + i];
                        if (limit > 0) { g = g < limit ? g : limit; u = u < -limit ? -limit : (u > limit ? limit : u); }
                        act[m * I + i] = g / (1.0f + expf(-g)) * u;
                    }
                }
                down_rows(act, I, w2t + e * I * D, D, rows, scale, M, yt, i0, i1);
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


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (native_build.py: cached per machine, atomically),
    or None (warned once) when there is no C compiler or the build fails."""
    lib = build_or_warn("dsv4_kernels", _SOURCE, _FLAGS, "CPU decode kernels",
                        "few-row matmuls use torch")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.linear_rows.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.linear_rows.restype = None
    lib.routed_experts.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr, ptr, ptr,
                                   ctypes.c_int]
    lib.routed_experts.restype = None
    lib.linear_groups.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.linear_groups.restype = None
    lib.sinkhorn.argtypes = [ptr, i64, i64, i64, ctypes.c_float]
    lib.sinkhorn.restype = None
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
_OPS.define("linear_groups(Tensor x, Tensor w) -> Tensor")
_OPS.define("sinkhorn(Tensor comb, int num_iters, float eps) -> Tensor")


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


def _grouped_bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`linear_groups`' math as torch's batched matmul (its fallback, any device and dtype)."""
    G, N, K = w.shape
    return torch.bmm(x.reshape(-1, G, K).transpose(0, 1), w.transpose(1, 2)).transpose(0, 1).reshape(-1, G * N)


def linear_groups(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, G*K] (group g: columns [g*K, (g+1)*K)) and w [G, N, K] -> [M, G*N]: group g's columns
    of the output are x's group g @ w[g].T (attention's grouped output projection). Each column
    is computed exactly as `linear_rows` computes it; torch's bmm when the kernels or the layout
    do not fit."""
    lib = _library()
    G, N, K = w.shape
    M = x.shape[0]
    if (lib is None or K % 8 or x.dim() != 2 or x.shape[1] != G * K or x.dtype != torch.float32
            or w.dtype != torch.float32 or x.stride(-1) != 1 or (M > 1 and x.stride(0) < G * K)
            or not w.is_contiguous() or x.device.type != "cpu" or w.device.type != "cpu"):
        return _grouped_bmm(x, w)
    y = torch.empty(M, G * N)
    if M:
        lib.linear_groups(x.data_ptr(), x.stride(0), w.data_ptr(), y.data_ptr(), M, G, N, K,
                          torch.get_num_threads() if G * N * K >= PARALLEL_MIN_WEIGHTS else 1)
    return y


_OPS.impl("linear_groups", linear_groups, "CPU")


@torch.library.register_fake("dsv4::linear_groups")
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0] * w.shape[1])


def sinkhorn(comb: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor | None:
    """ops.sinkhorn of fp32 CPU comb [..., n, n] (n <= 64) in C, bitwise equal to its numpy form;
    None when the kernels are missing (the caller then runs its own)."""
    lib = _library()
    n = comb.shape[-1]
    if lib is None or n > 64 or comb.dtype != torch.float32 or comb.device.type != "cpu":
        return None
    out = comb.detach().contiguous().clone()
    lib.sinkhorn(out.data_ptr(), out.numel() // (n * n), n, num_iters, eps)
    return out


def _sinkhorn_op(comb: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    out = sinkhorn(comb, num_iters, eps)
    if out is None:
        raise ValueError("dsv4::sinkhorn takes fp32 CPU [..., n, n] (n <= 64) and needs the kernels")
    return out


_OPS.impl("sinkhorn", _sinkhorn_op, "CPU")


@torch.library.register_fake("dsv4::sinkhorn")
def _(comb, num_iters, eps):
    return torch.empty_like(comb, memory_format=torch.contiguous_format)


def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`linear_groups` for few-row fp32 CPU inputs (traceable: the op in compiled regions), torch's
    bmm otherwise: x [M, G*K], w [G, N, K] -> [M, G*N]."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.shape[0] <= MAX_ROWS:
        return torch.ops.dsv4.linear_groups(x, w) if torch.compiler.is_compiling() else linear_groups(x, w)
    G, N, K = w.shape
    M = x.shape[0]
    return torch.bmm(x.reshape(M, G, K).transpose(0, 1), w.transpose(1, 2)).transpose(0, 1).reshape(M, G * N)


def sinkhorn_compiled_cpu(comb: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    """mHC's Sinkhorn inside compiled CPU regions: the C kernel as one opaque op (Inductor would
    unroll the 2 * num_iters - 1 passes into ~40 buffers), eagerly the direct call."""
    if torch.compiler.is_compiling():
        return torch.ops.dsv4.sinkhorn(comb, num_iters, eps)
    return _sinkhorn_op(comb, num_iters, eps)
