"""Small tensor functions shared by the model files (pure torch, no state)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import RopeSpec
from . import cpu_kernels
from .cpu_kernels import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32; the (float32) weight multiplies after the normalisation, before
    the cast back: x * rsqrt(mean(x^2) + eps) * w."""
    xf = x.float()
    y = F.rms_norm(xf, (xf.shape[-1],), None if weight is None else weight.float(), eps)
    return y.to(x.dtype)


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest entries along the last dim, ties broken towards the LOWER index.

    torch.topk gives no tie order, so results could depend on tensor sizes (e.g. the number of
    compressed entries in a batch). A stable descending sort keeps equal scores in index order.
    Returns int64 indices, [..., k], ordered by score descending.
    """
    k = min(k, scores.shape[-1])
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def sinkhorn(comb: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    """Alternately normalise the columns then the rows of comb [..., n, n] (float32), starting and
    ending with columns: `num_iters` column passes and `num_iters - 1` row passes, each x / (sum + eps).

    The matrices are tiny (hc x hc per token) and the loop is pure per-op overhead, so on CPU it
    runs as one C call (cpu_kernels.sinkhorn), or in numpy in place when the kernels are not built
    (same float32 arithmetic in the same order: both bitwise equal to the torch ops here)."""
    if comb.device.type == "cpu" and comb.dtype == torch.float32:
        out = cpu_kernels.sinkhorn(comb, num_iters, eps)      # the same passes in C (None: not built)
        if out is not None:
            return out
        a = comb.detach().numpy().copy()
        e = np.float32(eps)
        a /= a.sum(axis=-2, keepdims=True) + e
        for _ in range(num_iters - 1):
            a /= a.sum(axis=-1, keepdims=True) + e
            a /= a.sum(axis=-2, keepdims=True) + e
        return torch.from_numpy(a)
    return sinkhorn_torch(comb, num_iters, eps)


def sinkhorn_torch(comb: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn` as torch ops on any device (what fused.Sinkhorn compiles for GPUs)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(num_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def sinkhorn_rows(comb: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn_torch` with each n x n matrix held as ONE row of n*n values, for compiling on GPUs:
    every column / row sum is a masked sum over the whole row, so one program owns a matrix and
    Inductor fuses all 2*num_iters-1 passes into a few kernels (measured on an H200: 4 launches,
    10 us, against 39 launches, 37 us for the compiled plain loop). The masked sums add exact zeros,
    so the results differ from `sinkhorn_torch` only by summation order (~1e-7)."""
    n = comb.shape[-1]
    x = comb.flatten(-2)                                                   # [..., n*n], k = (k // n, k % n)
    k = torch.arange(n * n, device=comb.device)
    groups = torch.arange(n, device=comb.device)
    in_col = (k[:, None] % n == groups).to(x.dtype)                        # [n*n, n]: element k in column j
    in_row = (k[:, None] // n == groups).to(x.dtype)                       # [n*n, n]: element k in row i

    def normalize(x: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        denom = torch.zeros_like(x)                                        # each element's group sum
        for j in range(n):
            denom = denom + member[:, j] * (x * member[:, j]).sum(dim=-1, keepdim=True)
        return x / (denom + eps)

    x = normalize(x, in_col)
    for _ in range(num_iters - 1):
        x = normalize(x, in_row)
        x = normalize(x, in_col)
    return x.unflatten(-1, (n, n))


def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T in float32 (inputs upcast), for the few-output fp32 products of
    mHC (N = (2+hc)*hc = 24) and the gate logits (N = experts).

    Inside a compiled CUDA graph (the decode regions) it is written as a broadcast product summed
    over K, which Inductor turns into one reduction kernel fused with the upcasts (no fp32 copy of
    the weight): cuBLAS runs such a [T, 8192] x [8192, 24] fp32 product as a SIMT SGEMM split
    over K plus a separate split-K reduce, ~2x slower (H200, batch 64: 16 -> 9 us with mHC's
    RMSNorm, 12 -> 8 us for a gate). Both sum in float32 (only the order differs; the reduction's
    error against float64 measured no larger). Eagerly the broadcast would materialise [T, N, K],
    so eager code and other compilers keep the plain matmul (on CPUs cpu_kernels.linear: the
    few-row kernel at decode)."""
    if x.is_cuda and torch.compiler.is_compiling():
        return (x.float().unsqueeze(-2) * weight.float()).sum(-1)                # [..., N]
    return linear(x.float(), weight.float())


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """V4's clamped SwiGLU: gate clipped from above, up clipped on both sides."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def score_fn(logits: torch.Tensor, name: str) -> torch.Tensor:
    if name == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if name == "softmax":
        return logits.softmax(dim=-1)
    return logits.sigmoid()


# ---- rotary embeddings ----------------------------------------------------------------------

def rope_inv_freq(spec: RopeSpec, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies, one per interleaved pair: [rope_dim // 2] float32.

    YaRN (compressed layers): frequencies whose wavelength is short compared with the original
    context keep their value (extrapolation), long ones are divided by `factor`
    (interpolation), with a linear ramp between the correction dims of beta_fast / beta_slow
    rotations. The ramp bounds are floored / ceiled (YaRN's "truncate").
    """
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    pos_freqs = spec.theta ** exponents
    extrapolation = 1.0 / pos_freqs
    if spec.rope_type != "yarn":
        return extrapolation
    interpolation = 1.0 / (spec.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        # the dim whose wavelength makes `num_rotations` turns over the original context
        return (rope_dim * math.log(spec.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(spec.theta))

    low = max(math.floor(correction_dim(spec.beta_fast)), 0)
    high = min(math.ceil(correction_dim(spec.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 -> pure extrapolation
    return interpolation * (1 - keep) + extrapolation * keep


def rope_cis(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * e^{i θ} for `positions` [...]: complex64 [..., rope_dim // 2], θ = position * inv_freq.
    A complex view of `rope_table`'s real storage, so `torch.view_as_real(cis)` is that table."""
    return torch.view_as_complex(rope_table(inv_freq, positions, scale))


def rope_table(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(scale cos θ, scale sin θ) for `positions` [...]: float32 [..., rope_dim // 2, 2] (rope_real's cs)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return torch.stack([freqs.cos() * scale, freqs.sin() * scale], dim=-1)


def rope_(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the TRAILING 2*cis.shape[-1] channels of x, IN PLACE (returns x).

    x: [..., S, (heads,) D], owned by the caller; cis (complex64, see rope_cis) broadcasts against x
    without its last dim, i.e. [..., S, half] with a head axis inserted by the caller when x has one.
    Pairs (x[2i], x[2i+1]) of the rope slice are rotated as the complex number x[2i] + i x[2i+1]
    times cis: (a c - b s) + i (b c + a s), in float32. `cis.conj()` applies the inverse rotation
    (used on the attention output)."""
    half = cis.shape[-1]
    split = x.shape[-1] - 2 * half
    rope = x[..., split:]
    if x.dtype == torch.float32 and x.stride(-1) == 1 and split % 2 == 0 and all(
            st % 2 == 0 for st in x.stride()[:-1]) and x.storage_offset() % 2 == 0:
        torch.view_as_complex(rope.unflatten(-1, (half, 2))).mul_(cis)     # float32 storage as complex64
        return x
    pairs = torch.view_as_complex(rope.float().unflatten(-1, (half, 2)).contiguous()) * cis
    rope.copy_(torch.view_as_real(pairs).flatten(-2))
    return x


def rope_real(x: torch.Tensor, cs: torch.Tensor, is_inverse: bool = False) -> torch.Tensor:
    """`rope_` out of place in real arithmetic (what a compiled region can fuse; complex tensors
    it cannot): cs = torch.view_as_real(cis) [..., half, 2] holds (cos, sin) and broadcasts against
    x [..., D] like cis does. Each pair (a, b) becomes (a c - b s, a s + b c), the complex product;
    `is_inverse` rotates by -θ (cis.conj())."""
    half = cs.shape[-2]
    split = x.shape[-1] - 2 * half
    pairs = x[..., split:].float().unflatten(-1, (half, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cs[..., 0], cs[..., 1]
    if is_inverse:
        s = -s
    rot = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :split], rot], dim=-1)
