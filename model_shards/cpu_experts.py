"""The routed experts of a CPU decode step as one C kernel call (cpu_kernels.py builds the
library; this is its Python side): pairs grouped by expert with a counting sort, each hit
expert's weights read once.

    routed_experts(x, ids, weights, w13, w2t, limit)
                                 Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) -> [T, D]

A registered op (`torch.ops.dsv4.routed_experts`, a CPU kernel and a fake) like cpu_kernels'
ones; `DecodeExperts` is an ExpertBank's decode path. Owns nothing but its on / off flag.
"""

from __future__ import annotations

import torch

from .cpu_kernels import _OPS, _library, is_available

_OPS.define("routed_experts(Tensor x, Tensor local_ids, Tensor weights, Tensor w13, Tensor w2t, float limit) -> Tensor")


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
