"""Fewer kernel launches for the same math: FusedLinear and Sinkhorn (transforms in the gpt-fast
sense: the model's math stays in the plain modules; these only change how it is launched).

FusedLinear: several nn.Linear layers that read the same input, run as one matmul.
Owns: the concatenated weight [sum of out features, in] of its linears. On first use the weights
are concatenated once and each Linear's weight is re-pointed to its rows of the fused tensor (a
view), so the checkpoint names and `state_dict()` stay as they were and no memory is duplicated.
The fused tensor is rebuilt whenever any weight changes: another tensor assigned (a load), data
moved (`.to()`), or an in-place write (the version counter), all of which the cache key sees.

The math is exactly the separate linears' (each output column is the same dot product).

Sinkhorn: mHC's Sinkhorn normalisation (ops.sinkhorn) with its GPU loop compiled into a few kernels.
Owns: the compiled function (one per model that holds it).

Compiled: any pure tensor function through torch.compile, with a clean eager fallback (what
regions.DecodeRegions builds its regions from). Owns: the compiled function.
"""

from __future__ import annotations

import inspect
import types
import warnings

import torch
from torch import nn

from .cpu_kernels import linear
from .ops import sinkhorn, sinkhorn_rows


class FusedLinear:
    def __init__(self, linears: list[nn.Linear]):
        self._linears = linears
        self._sizes = [lin.out_features for lin in linears]
        self._fused: torch.Tensor | None = None
        self._key: tuple | None = None

    def _cache_key(self) -> tuple:
        # `_parameters`, not `lin.weight`: Module.__getattr__ costs ~1 us a lookup, and this runs
        # for every fused call of a decode step
        weights = [lin._parameters["weight"] for lin in self._linears]
        return tuple((id(w), w.data_ptr(), w._version) for w in weights)

    def weight(self) -> torch.Tensor:
        """[sum of out features, in]: the concatenated weights (rebuilt when one changed)."""
        if self._fused is None or self._cache_key() != self._key:
            fused = torch.cat([lin.weight.detach() for lin in self._linears])
            start = 0
            for lin, n in zip(self._linears, self._sizes):
                lin.weight = nn.Parameter(fused[start: start + n], requires_grad=lin.weight.requires_grad)
                start += n
            self._fused, self._key = fused, self._cache_key()
        return self._fused

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., in] -> one [..., out_i] view per linear, in order."""
        return list(linear(x, self.weight()).split(self._sizes, dim=-1))


class Sinkhorn:
    """`sinkhorn` with the GPU loop fused: on CUDA the ~3 * 2 * num_iters tiny kernels (the largest
    share of a decode step's launches) become a few, through torch.compile of the one-row form
    (ops.sinkhorn_rows), built on first use. If
    compiling fails (no Triton, no compiler) it says so once and stays eager. CPU: the numpy path
    of ops.sinkhorn. Owned by the model that calls it (DenseModel), so the compiled function has an owner."""

    def __init__(self, is_compiled_on_gpu: bool = True):
        self.is_compiled_on_gpu = is_compiled_on_gpu
        self._compiled = None

    def __call__(self, comb: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
        if comb.device.type != "cuda" or not self.is_compiled_on_gpu:
            return sinkhorn(comb, num_iters, eps)
        if self._compiled is None:
            self._compiled = torch.compile(sinkhorn_rows, dynamic=True, fullgraph=True)
        try:
            return self._compiled(comb, num_iters, eps)
        except Exception as e:  # noqa: BLE001 - any compile failure: stay correct, just slower
            warnings.warn(f"fused GPU Sinkhorn unavailable ({type(e).__name__}: {e}); running it eagerly")
            self.is_compiled_on_gpu = False
            return sinkhorn_rows(comb, num_iters, eps)


def call_compiled(compiled, args: tuple, max_recompiles: int):
    """compiled(*args) under no_grad; past dynamo's recompile limit, again with the limit raised to
    `max_recompiles` (patching the config costs ~1 ms a call, so only once it is hit)."""
    with torch.no_grad():
        try:
            return compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            with torch._dynamo.config.patch(recompile_limit=max_recompiles):
                return compiled(*args)


def private_copy(fn):
    """`fn` as a new function over a copy of its code object. Dynamo keys its cache and its
    recompile count on the code object, so every `Compiled` of the same function would otherwise
    share one cache, and its different uses (say three compressor kinds, each with a one-row and a
    many-row variant) would add up to dynamo's recompile limit and its warnings."""
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


class Compiled:
    """`fn` through torch.compile (one graph, fullgraph), built on first call; shared by the
    compiled decode paths (regions.DecodeRegions). If compiling fails (no C++ compiler / Triton, an
    unsupported op) it warns once and calls `fn` eagerly from then on: slower, never wrong.
    Runs under no_grad (inference only: one grad mode, fewer recompiles). Each Compiled has its own
    dynamo cache (`private_copy`)."""

    MAX_RECOMPILES = 32

    def __init__(self, fn, dynamic_dims: dict[str, tuple[int, ...]] | None = None):
        """`dynamic_dims`: {argument name: dims} of the sizes that vary between calls (rows, pages,
        slots), compiled symbolic from the first call on (the arguments come positionally).
        Everything else (weights, ints, the hc / head / rope sizes) stays static, so that tiny
        fixed loops unroll, and no later size change recompiles (a GPU recompile takes seconds,
        mid-serving). Without it: torch's dynamic=True (every size symbolic)."""
        self.fn = fn
        names = list(inspect.signature(fn).parameters)
        self._dynamic_at = [(names.index(name), dims) for name, dims in (dynamic_dims or {}).items()]
        self.is_compiled = True
        self._compiled = None

    def __call__(self, *args):
        if not self.is_compiled:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(private_copy(self.fn), dynamic=None if self._dynamic_at else True,
                                           fullgraph=True)
        if self._dynamic_at:
            for i, dims in self._dynamic_at:
                if args[i] is not None:
                    for d in dims:
                        torch._dynamo.maybe_mark_dynamic(args[i], d)
        try:
            return call_compiled(self._compiled, args, self.MAX_RECOMPILES)
        except Exception as e:  # noqa: BLE001 - a compile failure: stay correct, run eagerly
            out = self.fn(*args)    # raises too if the arguments were wrong: not the compiler's fault
            warnings.warn(f"compiled {getattr(self.fn, '__name__', 'function')} unavailable "
                          f"({type(e).__name__}: {e}); running it eagerly")
            self.is_compiled = False
            return out

    def __getstate__(self):   # compiled code does not copy: a copy compiles again on first use
        return {**self.__dict__, "_compiled": None}
