"""Small tensor functions shared by the model files (pure torch, no state)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import RopeSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32; the (float32) weight multiplies before the cast back."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest entries along the last dim, ties broken towards the LOWER index.

    torch.topk gives no tie order, so results could depend on tensor sizes (e.g. the number of
    compressed entries in a batch). A stable descending sort keeps equal scores in index order.
    Returns int64 indices, [..., k], ordered by score descending.
    """
    k = min(k, scores.shape[-1])
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin for `positions` [...]: each [..., rope_dim // 2]."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the TRAILING 2*cos.shape[-1] channels of x.

    x: [..., S, (heads,) D]; cos / sin broadcast against x without its last dim, i.e. [..., S, half]
    with a head axis inserted by the caller when x has one. Pairs are (x[2i], x[2i+1]) of the rope
    slice, rotated as the complex number x[2i] + i x[2i+1] times e^{i θ}. Math in float32.
    Passing -sin applies the inverse rotation (used on the attention output).
    """
    half = cos.shape[-1]
    nope, rope = x[..., : x.shape[-1] - 2 * half], x[..., x.shape[-1] - 2 * half:]
    r = rope.float().unflatten(-1, (half, 2))
    a, b = r[..., 0], r[..., 1]
    c, s = cos.float(), sin.float()
    rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)
