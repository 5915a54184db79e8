"""A record's tensors as bytes and back (record.py's helpers): the dtypes a record may hold,
a contiguous tensor's bytes as a numpy view, and tensor views of a record's data region.

Owns no state (one import-time side effect: torch's one-per-process warning about tensors of
read-only buffers is spent here, since borrowed tensors are never written).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.float8_e4m3fn, torch.float8_e5m2,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}

with warnings.catch_warnings():  # torch warns once per process about read-only buffers; borrowed
    warnings.simplefilter("ignore")  # tensors are never written, so spend that warning here
    torch.from_numpy(np.frombuffer(b"\0" * 8, dtype=np.uint8))


# a tensor's place in a record's data region: (byte offset, byte count, dtype, shape, strides)
Slot = tuple[int, int, torch.dtype, tuple[int, ...], tuple[int, ...]]


def strided_views(raw: np.ndarray, slots: dict[str, Slot]) -> dict[str, torch.Tensor]:
    """Each slot of the uint8 region `raw` as a contiguous tensor view: one `as_strided` per
    tensor on a view of the region in its dtype (slots start at multiples of 16 bytes, so the
    offsets divide; the strides were computed by the parse)."""
    base = torch.from_numpy(raw)
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = {}
    for name, (lo, _, dtype, shape, strides) in slots.items():
        whole = typed.get(dtype)
        if whole is None:
            size = dtype.itemsize
            whole = typed[dtype] = (base if raw.nbytes % size == 0 else base[:raw.nbytes // size * size]).view(dtype)
        out[name] = whole.as_strided(shape, strides, lo // dtype.itemsize)
    return out


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 1, 0, -1):
        strides[i - 1] = strides[i] * shape[i]
    return tuple(strides)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    return name


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a uint8 numpy view (no copy)."""
    return tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy()
