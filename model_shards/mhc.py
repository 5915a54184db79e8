"""Manifold-constrained hyper-connections (mHC): the math that collapses and re-spreads the
residual streams around each block. Pure functions, no state.

The residual is hc_mult streams [T, hc, hidden]. From the RMS-normalised flattened streams a
linear map gives pre [hc], post [hc] and comb [hc, hc]: pre = σ(·)+eps collapses the streams into
the block input, post = 2σ(·) spreads the block output back, and comb = Sinkhorn(softmax(·)+eps)
(rows and columns normalised alternately, so it is close to doubly stochastic) mixes the old
streams:  h'_k = post_k · out + Σ_j comb[j, k] · h_j.
"""

from __future__ import annotations

import torch

from .ops import linear_f32, rms_norm, sinkhorn


def hc_args(cfg) -> tuple[int, int, float, float]:
    """hc_weights' constants from a ModelConfig: (hc_mult, Sinkhorn iterations, eps, hc_eps)."""
    return cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.rms_norm_eps, cfg.hc_eps


def hc_weights(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int,
               num_iters: int, eps: float, hc_eps: float,
               sinkhorn_fn=sinkhorn, linear_fn=linear_f32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, hc, hidden] -> collapsed block input [T, hidden], post [T, hc], comb [T, hc, hc] (float32).
    `eps`: the RMSNorm epsilon; `hc_eps`: mHC's (on pre, comb and inside Sinkhorn). `sinkhorn_fn`,
    `linear_fn`: how Sinkhorn and the float32 product run (the same math)."""
    flat = rms_norm(h.flatten(1).float(), None, eps)
    # mixes * scale + base, with scale[0] on the pre columns, scale[1] on post, scale[2] on comb
    s = scale.float()                                  # (int repeats: no host round trip on a GPU)
    scale_cols = torch.cat([s[:2].repeat_interleave(hc), s[2:].expand(hc * hc)])
    mixes = torch.addcmul(base.float(), linear_fn(flat, fn), scale_cols)         # [T, (2+hc)*hc]
    gates = torch.sigmoid(mixes[:, : 2 * hc])
    pre = gates[:, :hc] + hc_eps
    post = 2 * gates[:, hc:]
    comb = torch.softmax(mixes[:, 2 * hc:].unflatten(-1, (hc, hc)), dim=-1) + hc_eps
    comb = sinkhorn_fn(comb, num_iters, hc_eps)
    if _is_elementwise(h):
        collapsed = pre[:, 0, None] * h[:, 0].float()                           # Σ_k pre_k h_k, k in order
        for k in range(1, h.shape[1]):
            collapsed = collapsed + pre[:, k, None] * h[:, k].float()
        return collapsed.to(h.dtype), post, comb
    collapsed = torch.bmm(pre.unsqueeze(1), h.float()).squeeze(1).to(h.dtype)  # Σ_k pre_k h_k
    return collapsed, post, comb


def hc_merge(out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """h'_k = post_k * out + Σ_j comb[j, k] h_j   ([T, hidden], [T, hc, hidden] -> [T, hc, hidden])."""
    dtype = h.dtype
    if _is_elementwise(h):     # in float32, the j terms added in order
        merged = post.unsqueeze(-1) * out.float().unsqueeze(-2)                 # [T, hc, hidden]
        for j in range(h.shape[1]):
            merged = merged + comb[:, j, :, None] * h[:, j, None, :].float()
        return merged.to(dtype)
    spread = post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2)                  # [T, hc, hidden]
    return torch.baddbmm(spread, comb.to(dtype).transpose(-1, -2), h)


def _is_elementwise(h: torch.Tensor) -> bool:
    """Collapse / merge as hc unrolled multiply-adds rather than a batched matmul: inside compiled
    regions (they fuse into the surrounding loops) and for CPU decode-sized inputs, where a bmm of
    T tiny [1, hc] x [hc, hidden] products costs ~50 us of dispatch and threading. Large eager
    inputs (prefill) keep the bmm: the unrolled form would write hc (merge: hc^2) temporaries."""
    return torch.compiler.is_compiling() or (h.device.type == "cpu" and h.shape[0] <= 64)
