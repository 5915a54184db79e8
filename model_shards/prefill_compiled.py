"""Prefill's elementwise-heavy pieces compiled on GPUs (transforms in the gpt-fast sense: the math
stays in mhc.py and attention.py): PrefillMHC (mHC's weights and merge of large eager steps),
PrefillAttention (the sink-aware softmax attention of a large query block) and PrefillIndexer
(the Lightning Indexer's head-weighted scores and top-k mask of a large query block).

PrefillMHC. Eagerly, a prefill step's mHC is a chain of full passes over the [T, hc, hidden]
residual and batched matmuls of T tiny products. Profiled on an H100 (medium preset, bf16, one
8K-token prompt, 8 layers): the merge's bf16 ``baddbmm`` of T [hc, hc] x [hc, hidden] products ran
as a 32x32-tile WMMA GEMM for 21.7 ms of the step's 161 ms of kernels, the fp32 flatten copies and
the RMSNorm over [T, hc * hidden] another ~10 + 7 ms. Compiled, the collapse and the merge are each
one pass over the residual (unrolled over hc, float32, as mhc.py does inside compiled regions), the
RMSNorm is fused with the upcast, and the [T, hc * hidden] x [hc * hidden, (2+hc) hc] fp32 product
stays one cuBLAS matmul (`mm_f32`: for T in the thousands a broadcast reduction would re-read the
rows (2+hc) hc times). With the window keys aligned (attention.py), 8K-token prefill 1.36x.

PrefillIndexer. A CSA layer's query block picks its compressed entries from the indexer's
scores: Σ_h w_h ReLU(q_h . K) over [s, n_I, N] float32 dot products (the bmm stays outside, a
bf16 tensor-core GEMM: compressor.index_dots). Eagerly the ReLU, the two scalings and the head sum
are four passes over that tensor (~11 ms of an 8K prompt's 84 ms of kernels, H200); compiled, one
pass with the mask and the top-k: 14 ms less kernel time and 1.09x tokens/s for an 8K prompt (H100).

PrefillAttention. Eagerly, `attention.attend` over a 1024-query block is ~20 kernels, most of them
full passes over the [H, s, keys] logits (scale, mask, max, subtract, exp, sum); compiled, the
matmuls stay cuBLAS calls and the rest fuses into a few reductions: 1.04-1.11x more (H100), and a
third fewer aten ops per prefill step.

Numerics: the same math as the eager path but for summation order (e.g. the collapse and the merge
sum the hc terms in float32 in order, where eagerly the merge is a bf16 batched matmul), so results
match the eager step to rounding, not bitwise (fp32 CUDA vs CPU: 1.7e-6 either way); decode steps
(CUDA graphs, compiled regions) and CPUs are not affected. The token / query dimensions are
compiled symbolic: one compile per process, made at engine start (`warm_up`; DenseModel.warm_up_prefill
took 23 s with a cold Inductor cache and 7.5 s with a warm one on an H200 without PrefillIndexer, 13 s
and 7 s on an H100 with it);
if compiling fails it warns once and the eager path runs (`Compiled`).

Owns: each class its compiled functions (one of each per DenseModel, which hands its
PrefillAttention and PrefillIndexer to its Attention layers).
"""

from __future__ import annotations

import torch

from .fused import Compiled
from .attention import attend, index_mask
from .mhc import hc_args, hc_merge, hc_weights
from .ops import sinkhorn_rows

MIN_TOKENS = 256   # smaller steps (decode, short chunks) stay eager: they are launch-bound anyway


def mm_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T in float32: one matmul (cuBLAS when compiled)."""
    return torch.mm(x.float(), weight.float().t())


def prefill_weights(h, fn, base, scale, hc: int, num_iters: int, eps: float, hc_eps: float):
    """mhc.hc_weights with the fp32 product as one matmul and Sinkhorn in its one-row form."""
    return hc_weights(h, fn, base, scale, hc, num_iters, eps, hc_eps, sinkhorn_rows, linear_fn=mm_f32)


class _LargeStepPiece:
    """What the compiled prefill pieces share: on / off, the device types they run on, the
    smallest step (tokens or queries) they take, and a count of their compiled calls."""

    def __init__(self, is_enabled: bool = True, device_types: tuple[str, ...] = ("cuda",),
                 min_tokens: int = MIN_TOKENS):
        self.is_enabled = is_enabled
        self.device_types = device_types
        self.min_tokens = min_tokens
        self.num_calls = 0   # compiled calls made (tests and profiles)

    def _takes(self, t: torch.Tensor, num_tokens: int) -> bool:
        """A step of `num_tokens` on t's device, outside an enclosing compile."""
        return (self.is_enabled and t.device.type in self.device_types and num_tokens >= self.min_tokens
                and not torch.compiler.is_compiling())

    def _can_warm_up(self, dense) -> bool:
        """Whether `_takes` could ever hold for `dense` (enabled, its device type)."""
        return self.is_enabled and dense.device.type in self.device_types


class PrefillMHC(_LargeStepPiece):
    """`weights` / `merge` as mhc.hc_weights / hc_merge, compiled, for steps with a prefill
    segment and >= MIN_TOKENS tokens on `device_types` (default CUDA only): `can_run(h, batch)`.
    Decode-only steps never use it (CUDA graphs capture them; their replays are checked bitwise
    against the same steps run eagerly)."""

    def __init__(self, is_enabled: bool = True, device_types: tuple[str, ...] = ("cuda",),
                 min_tokens: int = MIN_TOKENS):
        super().__init__(is_enabled, device_types, min_tokens)   # num_calls: weights + merges
        self._weights = Compiled(prefill_weights, dynamic_dims={"h": (0,)})
        self._merge = Compiled(hc_merge, dynamic_dims={"out": (0,), "h": (0,), "post": (0,), "comb": (0,)})

    def can_run(self, h: torch.Tensor, batch) -> bool:
        return self._takes(h, h.shape[0]) and bool(batch.prefill_segments)

    @torch.no_grad()
    def warm_up(self, dense) -> None:
        """Compile both functions now (one throwaway call each at `min_tokens` rows, with layer
        0's mHC parameters), so that the first prompt does not wait for it: the token count is
        compiled symbolic and the parameters are arguments, so every layer and size reuses them.
        Does nothing where `can_run` would never hold (disabled, another device type)."""
        if not self._can_warm_up(dense):
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


class PrefillAttention(_LargeStepPiece):
    """`attention.attend`, compiled, for query blocks of >= `min_tokens` queries on `device_types`
    (default CUDA only): `can_run(q)`. Called as `attend` is."""

    def __init__(self, is_enabled: bool = True, device_types: tuple[str, ...] = ("cuda",),
                 min_tokens: int = MIN_TOKENS):
        super().__init__(is_enabled, device_types, min_tokens)
        self._attend = Compiled(attend, dynamic_dims={"q": (1,), "keys": (0,), "key_ok": (0, 1), "entries": (0,),
                                                      "entry_ok": (0, 1)})

    def can_run(self, q: torch.Tensor) -> bool:
        """q [H, s, D]: a block of s queries."""
        return self._takes(q, q.shape[-2])

    def __call__(self, q, keys, key_ok, entries, entry_ok, sink, scale: float) -> torch.Tensor:
        self.num_calls += 1
        return self._attend(q, keys, key_ok, entries, entry_ok, sink, scale)

    @torch.no_grad()
    def warm_up(self, dense) -> None:
        """Compile now, with and without compressed entries (throwaway blocks of `min_tokens`
        queries laid out as `Attention._attend_segment` passes them), so that the first prompt
        does not wait. Does nothing where `can_run` would never hold."""
        if not self._can_warm_up(dense):
            return
        cfg, s = dense.cfg, self.min_tokens
        H, D = cfg.num_attention_heads, cfg.head_dim
        zeros = dict(dtype=dense.dtype, device=dense.device)
        q = torch.zeros(s, H, D, **zeros).transpose(0, 1)                       # [H, s, D], as sliced there
        keys = torch.zeros(s + 8, D, **zeros)
        key_ok = torch.ones(s, s + 8, dtype=torch.bool, device=dense.device)
        entries = torch.zeros(8, D, **zeros)
        entry_ok = torch.ones(s, 8, dtype=torch.bool, device=dense.device)
        sink = dense.layers[0].attn.attn_sink
        self(q, keys, key_ok, None, None, sink, D ** -0.5)
        self(q, keys, key_ok, entries, entry_ok, sink, D ** -0.5)


class PrefillIndexer(_LargeStepPiece):
    """`attention.index_mask` (the indexer's top-k entries of a prefill block), compiled, for
    blocks of >= `min_tokens` queries on `device_types` (default CUDA only): `can_run(dots)`.
    Called as `index_mask` is. The head-weighted ReLU sum reads the block's [s, n_I, N] float32
    dot products once, fused, instead of four eager passes over them (relu, scale, weights, sum)."""

    def __init__(self, is_enabled: bool = True, device_types: tuple[str, ...] = ("cuda",),
                 min_tokens: int = MIN_TOKENS):
        super().__init__(is_enabled, device_types, min_tokens)
        self._mask = Compiled(index_mask, dynamic_dims={"dots": (0, 2), "head_weights": (0,), "causal": (0, 1)})

    def can_run(self, dots: torch.Tensor) -> bool:
        """dots [s, n_I, N]: a block of s queries."""
        return self._takes(dots, dots.shape[0])

    def __call__(self, dots, head_weights, causal, k: int, head_dim: int) -> torch.Tensor:
        self.num_calls += 1
        return self._mask(dots, head_weights, causal, k, head_dim)

    @torch.no_grad()
    def warm_up(self, dense) -> None:
        """Compile now (a throwaway block of `min_tokens` queries over index_topk + 8 entries), so
        that the first long prompt does not wait. Does nothing where `can_run` would never hold
        (disabled, another device type, a model without CSA layers)."""
        if not self._can_warm_up(dense) or all(block.attn.indexer is None for block in dense.layers):
            return
        cfg = dense.cfg
        s, n = self.min_tokens, cfg.index_topk + 8
        dots = torch.zeros(s, cfg.index_n_heads, n, device=dense.device)
        head_weights = torch.zeros(s, cfg.index_n_heads, device=dense.device)
        causal = torch.ones(s, n, dtype=torch.bool, device=dense.device)
        self(dots, head_weights, causal, cfg.index_topk, cfg.index_head_dim)
