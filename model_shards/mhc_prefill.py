"""PrefillMHC: mHC's weights and merge for large eager steps on GPUs (prefill chunks), compiled
into a few fused kernels (a transform in the gpt-fast sense: the math stays mhc.py's).

Why: eagerly, a prefill step's mHC is a chain of full passes over the [T, hc, hidden] residual and
batched matmuls of T tiny products. Profiled on an H100 (medium preset, bf16, one 8K-token
prompt, 8 layers): the merge's bf16 ``baddbmm`` of T [hc, hc] x [hc, hidden] products ran as a
32x32-tile WMMA GEMM for 21.7 ms of the step's 161 ms of kernels, the fp32 flatten copies and the
RMSNorm over [T, hc * hidden] another ~10 + 7 ms. Compiled, the collapse and the merge are each one
pass over the residual (unrolled over hc, float32, as mhc.py does inside compiled regions), the
RMSNorm is fused with the upcast, and the [T, hc * hidden] x [hc * hidden, (2+hc) hc] fp32 product
stays one cuBLAS matmul (`mm_f32`: for T in the thousands a broadcast reduction would re-read the
rows (2+hc) hc times).

Numerics: the same float32 math as the eager path but for summation order (the collapse and the
merge sum the hc terms in float32 in order, where eagerly the merge is a bf16 batched matmul), so
results match the eager step to rounding, not bitwise; decode steps (CUDA graphs, compiled
regions) and CPUs are not affected. Compiled with the token dimension dynamic (one compile per
process, ~10-30 s at the first prefill on a GPU); if compiling fails it warns once and the eager
path runs (`Compiled`).

Owns: its two compiled functions (one PrefillMHC per DenseModel).
"""

from __future__ import annotations

import torch

from .fused import Compiled
from .mhc import hc_args, hc_merge, hc_weights
from .ops import sinkhorn_rows

MIN_TOKENS = 256   # smaller steps (decode, short chunks) stay eager: they are launch-bound anyway


def mm_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T in float32: one matmul (cuBLAS when compiled)."""
    return torch.mm(x.float(), weight.float().t())


def prefill_weights(h, fn, base, scale, hc: int, num_iters: int, eps: float, hc_eps: float):
    """mhc.hc_weights with the fp32 product as one matmul and Sinkhorn in its one-row form."""
    return hc_weights(h, fn, base, scale, hc, num_iters, eps, hc_eps, sinkhorn_rows, linear_fn=mm_f32)


class PrefillMHC:
    """`weights` / `merge` as mhc.hc_weights / hc_merge, compiled, for steps with a prefill
    segment and >= MIN_TOKENS tokens on `device_types` (default CUDA only): `can_run(h, batch)`.
    Decode-only steps never use it (CUDA graphs capture them; their replays are checked bitwise
    against the same steps run eagerly)."""

    def __init__(self, is_enabled: bool = True, device_types: tuple[str, ...] = ("cuda",),
                 min_tokens: int = MIN_TOKENS):
        self.is_enabled = is_enabled
        self.device_types = device_types
        self.min_tokens = min_tokens
        self.num_calls = 0   # compiled calls made (weights + merges; tests and profiles)
        self._weights = Compiled(prefill_weights, dynamic_dims={"h": (0,)})
        self._merge = Compiled(hc_merge, dynamic_dims={"out": (0,), "h": (0,), "post": (0,), "comb": (0,)})

    def can_run(self, h: torch.Tensor, batch) -> bool:
        return (self.is_enabled and h.device.type in self.device_types and h.shape[0] >= self.min_tokens
                and bool(batch.prefill_segments) and not torch.compiler.is_compiling())

    @torch.no_grad()
    def warm_up(self, dense) -> None:
        """Compile both functions now (one throwaway call each at `min_tokens` rows, with layer
        0's mHC parameters), so that the first prompt does not wait for it: the token count is
        compiled symbolic and the parameters are arguments, so every layer and size reuses them.
        Does nothing where `can_run` would never hold (disabled, another device type)."""
        if not self.is_enabled or dense.device.type not in self.device_types:
            return
        cfg, block = dense.cfg, dense.layers[0]
        h = torch.zeros(self.min_tokens, cfg.hc_mult, cfg.hidden_size, dtype=dense.dtype, device=dense.device)
        collapsed, post, comb = self.weights(h, block.hc_attn_fn, block.hc_attn_base, block.hc_attn_scale,
                                            *hc_args(cfg))
        self.merge(collapsed, h, post, comb)

    def weights(self, h, fn, base, scale, hc: int, num_iters: int, eps: float, hc_eps: float):
        """h [T, hc, hidden] -> (collapsed [T, hidden], post [T, hc], comb [T, hc, hc])."""
        self.num_calls += 1
        return self._weights(h, fn, base, scale, hc, num_iters, eps, hc_eps)

    def merge(self, out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """[T, hidden], [T, hc, hidden] -> [T, hc, hidden] (mhc.hc_merge)."""
        self.num_calls += 1
        return self._merge(out, h, post, comb)
