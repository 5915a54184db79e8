"""FusedLinear: several nn.Linear layers that read the same input, run as one matmul.

Owns: the concatenated weight [sum of out features, in] of its linears. On first use the weights
are concatenated once and each Linear's weight is re-pointed to its rows of the fused tensor (a
view), so the checkpoint names and `state_dict()` stay as they were and no memory is duplicated.
The fused tensor is rebuilt whenever any weight changes: another tensor assigned (a load), data
moved (`.to()`), or an in-place write (the version counter), all of which the cache key sees.

A transform in the gpt-fast sense: the math is exactly the separate linears' (each output column
is the same dot product), only the number of kernel launches changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinear:
    def __init__(self, linears: list[nn.Linear]):
        self._linears = linears
        self._sizes = [lin.out_features for lin in linears]
        self._fused: torch.Tensor | None = None
        self._key: tuple | None = None

    def _cache_key(self) -> tuple:
        return tuple((id(lin.weight), lin.weight.data_ptr(), lin.weight._version) for lin in self._linears)

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
        return list(F.linear(x, self.weight()).split(self._sizes, dim=-1))
