"""Optional FP8 storage of KV latents: e4m3 with one power-of-two scale per 64 non-rope values.

Owns no state. Follows the official V4 inference code: the non-rope dims of window latents and
compressed entries are stored as float8 e4m3 in blocks of 64 along the last dim, each block with
a float32 power-of-two scale; the trailing `rope_dim` dims are kept as computed. A quantized
tensor ``X`` is stored as three tensors ``X#fp8``, ``X#scale`` and ``X#rope``; scales are per row,
so quantizing then slicing rows equals slicing then quantizing (blocks and checkpoints can be
quantized separately and concatenated after dequantization).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_SIZE = 64
DEFAULT_SUFFIXES = (".window", ".comp.entries")
_FP8, _SCALE, _ROPE = "#fp8", "#scale", "#rope"


def _pad_blocks(x: torch.Tensor) -> torch.Tensor:
    width = x.shape[-1]
    num_blocks = -(-width // BLOCK_SIZE)
    padded = torch.nn.functional.pad(x, (0, num_blocks * BLOCK_SIZE - width))
    return padded.reshape(*x.shape[:-1], num_blocks, BLOCK_SIZE)


def quantize(x: torch.Tensor, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 values [..., D - rope_dim], float32 scales [..., ceil((D - rope_dim) / 64)], rope)."""
    width = x.shape[-1] - rope_dim
    blocks = _pad_blocks(x[..., :width].float())
    amax = blocks.abs().amax(dim=-1)
    scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))), torch.ones_like(amax))
    values = (blocks / scale.unsqueeze(-1)).to(FP8_DTYPE)
    values = values.reshape(*x.shape[:-1], blocks.shape[-2] * BLOCK_SIZE)[..., :width].contiguous()
    return values, scale, x[..., width:].clone()


def dequantize(values: torch.Tensor, scale: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    width = values.shape[-1]
    blocks = _pad_blocks(values.float()) * scale.unsqueeze(-1)
    restored = blocks.reshape(*values.shape[:-1], blocks.shape[-2] * BLOCK_SIZE)[..., :width].to(rope.dtype)
    return torch.cat([restored, rope], dim=-1)


def quantize_tensors(
    tensors: Mapping[str, torch.Tensor], rope_dim: int, suffixes: Iterable[str] = DEFAULT_SUFFIXES
) -> dict[str, torch.Tensor]:
    """Replace each floating tensor whose name ends with one of `suffixes` by its FP8 parts."""
    suffixes = tuple(suffixes)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(suffixes) and tensor.is_floating_point() and tensor.dim() >= 1 \
                and tensor.shape[-1] > rope_dim:
            out[name + _FP8], out[name + _SCALE], out[name + _ROPE] = quantize(tensor, rope_dim)
        else:
            out[name] = tensor
    return out


def dequantize_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `quantize_tensors` (tensors without FP8 parts pass through unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(_FP8):
            base = name[: -len(_FP8)]
            out[base] = dequantize(tensor, tensors[base + _SCALE], tensors[base + _ROPE])
        elif not name.endswith((_SCALE, _ROPE)):
            out[name] = tensor
    return out


def is_quantized(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(name.endswith(_FP8) for name in tensors)
