"""Pure-torch FP8 / FP4 weight (de)quantization in DeepSeek-V4 checkpoint layout.

Only ``torch`` and ``math`` are used; everything runs on CPU (or any device
torch supports) without custom kernels.

Formats
=======

FP8 e4m3 with 128x128 block scales (dense / attention / shared-expert weights)
------------------------------------------------------------------------------
* Weight ``q``: ``torch.float8_e4m3fn``, shape ``[out, in]`` (finite max 448).
* Scale ``s``: shape ``[ceil(out/128), ceil(in/128)]``; element ``s[i, j]``
  covers rows ``128*i : 128*(i+1)`` and columns ``128*j : 128*(j+1)``; the
  last block row / column may be partial (e.g. ``[130, 200]`` -> ``[2, 2]``).
* ``W = q.float() * s`` expanded over its block.
* Scale dtype is either ``float32`` (``scale_fmt="float32"``) or "ue8m0":
  a pure power of two stored as ``torch.float8_e8m0fnu`` (one unsigned
  exponent byte ``b``; value ``2**(b-127)``, ``b == 255`` is NaN).
  ``bfloat16`` scales are also accepted for dequantization, and so are raw
  ``uint8`` exponent bytes (same meaning as ``float8_e8m0fnu``).
* Quantization, per block: ``amax = max|w|``;
  ``scale = amax / 448`` (float32 mode) or the smallest power of two
  ``>= amax / 448`` (ue8m0 mode); all-zero blocks get ``scale = 1.0``.
  ``q = clamp(w / scale, -448, 448)`` cast with torch's round-to-nearest-even.

FP4 e2m1 with 1x32 ue8m0 group scales (routed-expert weights)
--------------------------------------------------------------
* Representable values: ``{0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}``.
* Nibble = sign bit ``0x8`` | 3-bit magnitude code indexing
  ``[0, 0.5, 1, 1.5, 2, 3, 4, 6]`` (this is exactly the IEEE-like e2m1 bit
  pattern: code = exponent(2 bits) << 1 | mantissa(1 bit)).
* Two values per byte, packed along the input (last) dimension: element
  ``2j`` is the LOW nibble and element ``2j+1`` the HIGH nibble of byte ``j``.
* Packed weight: ``int8`` of shape ``[out, in/2]`` (as stored in the
  checkpoints); ``uint8`` and ``torch.float4_e2m1fn_x2`` (same bytes) are
  accepted too.
* Scale: ``float8_e8m0fnu`` of shape ``[out, in/32]``, one per 32 consecutive
  inputs: ``W[r, c] = fp4[r, c] * scale[r, c // 32]``.
* Quantization, per group: ``scale`` = smallest power of two ``>= amax / 6``
  (exponent clamped to ``[-127, 127]``; all-zero groups get ``1.0``), then
  ``w / scale`` (exact: power-of-two divide) is rounded to the nearest
  representable magnitude; **ties go to the even magnitude code**
  (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), which is the same
  as IEEE round-half-to-even on the 1-bit mantissa.  Values that round to zero
  are written as +0 (nibble 0x0, never 0x8); 0x8 (-0) decodes to 0.
  Leading dimensions (e.g. stacked experts ``[E, out, in/2]``) are allowed;
  grouping is along the last dimension only.

safetensors
-----------
safetensors >= 0.6 (tested with 0.8) stores ``float8_e4m3fn`` (``F8_E4M3``),
``float8_e8m0fnu`` (``F8_E8M0``) and ``float4_e2m1fn_x2`` (``F4``) natively,
so no conversion is needed.  For older stacks, :func:`e8m0_to_uint8` /
:func:`uint8_to_e8m0` reinterpret ue8m0 scales as raw exponent bytes (a free
view) and every function here accepts ``uint8`` scales as exponent bytes.

Memory
------
Dequantization allocates the output (``numel * dtype.itemsize`` bytes) and
processes it in row chunks of about ``CHUNK_ELEMS`` (2**22) elements, so the
peak *extra* memory is the output tensor plus a few chunk-sized temporaries,
independent of the weight size: fp8 keeps the chunk of ``q`` as float32 and
the chunk's expanded scale (2 x 16 MiB); fp4 keeps the nibbles (uint8), their
int64 LUT indices and the float32 values (~13 B/element, ~52 MiB).  Measured
peak RSS growth (CPU, float32 output, incl. allocator slack): fp8 [4096, 8256]
-> 129 MiB output + ~87 MiB; fp4 [4096, 8192] -> 128 MiB output + ~72 MiB
(a naive ``q.float() * expanded_scale`` needs ~3x the output).  Lower
``CHUNK_ELEMS`` to trade speed for memory.  Quantization likewise allocates
only the (1-byte / half-byte) outputs plus chunk-sized temporaries.
"""

import math

import torch

__all__ = [
    "FP8_MAX",
    "FP4_MAX",
    "FP4_VALUES",
    "CHUNK_ELEMS",
    "E8M0_DTYPE",
    "FP4X2_DTYPE",
    "quantize_fp8_block",
    "dequantize_fp8_block",
    "quantize_fp4",
    "dequantize_fp4",
    "pack_fp4_codes",
    "unpack_fp4_codes",
    "e8m0_to_float",
    "float_to_e8m0",
    "e8m0_to_uint8",
    "uint8_to_e8m0",
    "is_fp8",
    "is_e8m0",
    "is_fp4_packed",
    "fp8_scale_shape",
    "fp4_scale_shape",
    "dequantize",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
#: Magnitudes indexed by the 3-bit code; nibble 8..15 are the negatives.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)
FP4X2_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
#: Target number of elements per processing chunk.
CHUNK_ELEMS = 1 << 22

_E8M0_MIN_EXP = -127
_E8M0_MAX_EXP = 127

# 16-entry decode table: nibble -> float value.
_FP4_LUT = torch.tensor(list(FP4_VALUES) + [-v for v in FP4_VALUES], dtype=torch.float32)
# Rounding thresholds between consecutive magnitude codes i and i+1.
_FP4_MIDPOINTS = tuple((FP4_VALUES[i] + FP4_VALUES[i + 1]) / 2 for i in range(7))


# --------------------------------------------------------------------------- e8m0 helpers


def is_e8m0(t: torch.Tensor) -> bool:
    """True if ``t`` holds ue8m0 scales (``float8_e8m0fnu``)."""
    return E8M0_DTYPE is not None and t.dtype == E8M0_DTYPE


def e8m0_to_uint8(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret ``float8_e8m0fnu`` scales as their raw exponent bytes (a view)."""
    if t.dtype == torch.uint8:
        return t
    if not is_e8m0(t):
        raise TypeError(f"expected float8_e8m0fnu or uint8, got {t.dtype}")
    return t.view(torch.uint8)


def uint8_to_e8m0(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret raw exponent bytes as ``float8_e8m0fnu`` (a view)."""
    if is_e8m0(t):
        return t
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 exponent bytes, got {t.dtype}")
    if E8M0_DTYPE is None:
        raise RuntimeError("this torch build has no float8_e8m0fnu dtype; keep uint8 bytes")
    return t.view(E8M0_DTYPE)


def e8m0_to_float(t: torch.Tensor) -> torch.Tensor:
    """Decode ue8m0 scales (``float8_e8m0fnu`` or uint8 exponent bytes) to float32.

    Byte ``b`` -> ``2**(b - 127)`` exactly (``b == 0`` -> 2**-127, a float32
    subnormal); ``b == 255`` -> NaN.  Implemented with bit manipulation, so it
    is exact and does not depend on torch's own e8m0 casting rules.
    """
    b = e8m0_to_uint8(t).to(torch.int32)
    bits = b << 23
    bits = torch.where(b == 0, torch.full_like(bits, 0x00400000), bits)
    bits = torch.where(b == 255, torch.full_like(bits, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(x))`` for positive finite float32 ``x`` (int32 result).

    Values at or below 2**-127 give -127 (or lower-clamped later)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    exp_field = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    normal = (exp_field - 127) + (mant != 0).to(torch.int32)
    # Subnormal: value = mant * 2**-149 < 2**-126; > 2**-127 iff mant > 2**22.
    sub = torch.where(mant > (1 << 22), torch.full_like(mant, -126), torch.full_like(mant, -127))
    return torch.where(exp_field == 0, sub, normal)


def _exp_to_float(e: torch.Tensor) -> torch.Tensor:
    """int32 exponent in [-127, 127] -> float32 ``2**e`` exactly."""
    return e8m0_to_float((e + 127).to(torch.uint8))


def float_to_e8m0(t: torch.Tensor | float, as_uint8: bool = False) -> torch.Tensor:
    """Encode positive scales as ue8m0 (``float8_e8m0fnu``).

    Powers of two in ``[2**-127, 2**127]`` are encoded exactly.  Other values
    are rounded UP to the next power of two (the direction that never lets a
    quantized value overflow), and clamped to ``[2**-127, 2**127]``.  Zero,
    negative, infinite or NaN inputs raise ``ValueError``.  With
    ``as_uint8=True`` (or on a torch without the dtype) the raw exponent bytes
    are returned instead.
    """
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=torch.float32)
    if is_e8m0(t):
        return t.view(torch.uint8) if as_uint8 else t
    x = t.to(torch.float32)
    if x.numel() and not bool(((x > 0) & torch.isfinite(x)).all()):
        raise ValueError("float_to_e8m0: scales must be positive and finite")
    e = _ceil_log2(x).clamp_(_E8M0_MIN_EXP, _E8M0_MAX_EXP)
    b = (e + 127).to(torch.uint8)
    if as_uint8 or E8M0_DTYPE is None:
        return b
    return b.view(E8M0_DTYPE)


def _scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    if is_e8m0(scale) or scale.dtype == torch.uint8:
        return e8m0_to_float(scale)
    if not scale.is_floating_point():
        raise TypeError(f"unsupported scale dtype {scale.dtype}")
    return scale.to(torch.float32)


# --------------------------------------------------------------------------- predicates


def is_fp8(t: torch.Tensor) -> bool:
    """True for an FP8 e4m3 weight (``torch.float8_e4m3fn``) that needs block scales."""
    return isinstance(t, torch.Tensor) and t.dtype == FP8_DTYPE


def fp8_scale_shape(shape, block: int = 128) -> tuple[int, int]:
    """Expected block-scale shape for a ``[out, in]`` FP8 weight."""
    out, inn = shape[-2], shape[-1]
    return (math.ceil(out / block), math.ceil(inn / block))


def fp4_scale_shape(packed_shape, group: int = 32) -> tuple[int, ...]:
    """Expected scale shape for a packed FP4 weight ``[..., in/2]``: ``[..., in/group]``."""
    *lead, half = packed_shape
    return (*lead, (2 * half) // group)


def is_fp4_packed(t: torch.Tensor, scale: torch.Tensor | None = None, group: int = 32) -> bool:
    """Decide whether ``t`` is a packed FP4 (e2m1 x2) weight.

    * ``torch.float4_e2m1fn_x2`` -> always True.
    * ``int8`` / ``uint8`` -> if ``scale`` is None, True (DeepSeek-V4
      checkpoints use int8 only for packed FP4 expert weights); if ``scale``
      is given, True only when it is a ue8m0 scale (``float8_e8m0fnu`` or
      uint8 exponent bytes) of shape ``[..., 2*t.shape[-1]/group]`` with the
      same leading dims.
    * anything else -> False.
    """
    if not isinstance(t, torch.Tensor):
        return False
    if FP4X2_DTYPE is not None and t.dtype == FP4X2_DTYPE:
        return True
    if t.dtype not in (torch.int8, torch.uint8) or t.dim() < 1:
        return False
    if scale is None:
        return True
    if not (is_e8m0(scale) or scale.dtype == torch.uint8):
        return False
    if (2 * t.shape[-1]) % group:
        return False
    return tuple(scale.shape) == fp4_scale_shape(tuple(t.shape), group)


# --------------------------------------------------------------------------- FP8


def _fp8_chunk_rows(inn: int, block: int) -> int:
    rows = max(1, CHUNK_ELEMS // max(1, inn))
    return max(block, (rows // block) * block)


def _check_2d(t: torch.Tensor, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {tuple(t.shape)}")


def quantize_fp8_block(
    w: torch.Tensor, block: int = 128, scale_fmt: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to FP8 e4m3 with ``block x block`` scales.

    Returns ``(q, scale)``: ``q`` is ``float8_e4m3fn`` with ``w``'s shape;
    ``scale`` is ``[ceil(out/block), ceil(in/block)]`` float32
    (``scale_fmt="float32"``, ``amax/448``) or ``float8_e8m0fnu``
    (``scale_fmt="ue8m0"``, smallest power of two >= ``amax/448``).
    All-zero blocks get scale 1.0.  Non-finite inputs raise ``ValueError``.
    """
    if scale_fmt not in ("float32", "ue8m0"):
        raise ValueError(f"scale_fmt must be 'float32' or 'ue8m0', got {scale_fmt!r}")
    _check_2d(w, "weight")
    if block <= 0:
        raise ValueError("block must be positive")
    out, inn = w.shape
    nrb, ncb = fp8_scale_shape(w.shape, block)
    pad_c = ncb * block - inn
    q = torch.empty((out, inn), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((nrb, ncb), dtype=torch.float32, device=w.device)
    step = _fp8_chunk_rows(inn, block)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        x = w[r0:r1].to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("quantize_fp8_block: weight contains inf/NaN")
        rows = r1 - r0
        rb = math.ceil(rows / block)
        pad_r = rb * block - rows
        xa = x.abs()
        if pad_r or pad_c:
            xa = torch.nn.functional.pad(xa, (0, pad_c, 0, pad_r))
        amax = xa.view(rb, block, ncb, block).amax(dim=(1, 3))
        del xa
        if scale_fmt == "float32":
            s = amax / FP8_MAX
            tiny = torch.finfo(torch.float32).tiny
            s = torch.where(amax == 0, torch.ones_like(s), s.clamp_min(tiny))
        else:
            s = amax / FP8_MAX
            e = _ceil_log2(torch.where(amax == 0, torch.ones_like(s), s))
            s = _exp_to_float(e.clamp_(_E8M0_MIN_EXP, _E8M0_MAX_EXP))
        scale[r0 // block : r0 // block + rb] = s
        s_full = s.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :inn]
        x = torch.div(x, s_full).clamp_(-FP8_MAX, FP8_MAX)  # not in place: x may alias w
        q[r0:r1] = x.to(FP8_DTYPE)
    if scale_fmt == "ue8m0":
        scale = float_to_e8m0(scale)
    return q, scale


def dequantize_fp8_block(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize an FP8 e4m3 weight with block scales: ``q.float() * scale``.

    ``scale`` may be float32, bfloat16/float16, ``float8_e8m0fnu`` or uint8
    exponent bytes, shape ``[ceil(out/block), ceil(in/block)]``.
    Peak extra memory: the output plus ~3 chunk-sized float32 temporaries.
    """
    if not is_fp8(q):
        raise TypeError(f"expected float8_e4m3fn weight, got {q.dtype}")
    _check_2d(q, "fp8 weight")
    out, inn = q.shape
    want = fp8_scale_shape(q.shape, block)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"fp8 scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
            f"with block {block} (expected {want})"
        )
    s = _scale_to_float(scale).to(q.device)
    result = torch.empty((out, inn), dtype=dtype, device=q.device)
    step = _fp8_chunk_rows(inn, block)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        rows = r1 - r0
        sc = s[r0 // block : math.ceil(r1 / block)]
        s_full = sc.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :inn]
        x = q[r0:r1].to(torch.float32)
        if dtype == torch.float32:
            torch.mul(x, s_full, out=result[r0:r1])
        else:
            x.mul_(s_full)
            result[r0:r1] = x
    return result


# --------------------------------------------------------------------------- FP4


def _as_uint8_bytes(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype == torch.uint8:
        return packed
    if packed.dtype == torch.int8 or (FP4X2_DTYPE is not None and packed.dtype == FP4X2_DTYPE):
        return packed.view(torch.uint8)
    raise TypeError(f"packed fp4 must be int8, uint8 or float4_e2m1fn_x2, got {packed.dtype}")


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit nibbles ``[..., n]`` (n even, values 0..15) into int8 ``[..., n/2]``.

    Element ``2j`` goes to the low nibble, ``2j+1`` to the high nibble.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"last dimension must be even to pack fp4, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    packed = (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)
    return packed.view(torch.int8)


def unpack_fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4_codes`: ``[..., n/2]`` bytes -> uint8 nibbles ``[..., n]``."""
    b = _as_uint8_bytes(packed)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def _fp4_chunk_rows(cols: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, cols))


def quantize_fp4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., in]`` to packed FP4 e2m1 with per-``group`` ue8m0 scales.

    Returns ``(packed int8 [..., in/2], scale float8_e8m0fnu [..., in/group])``.
    Rounding: nearest representable value, ties to the even magnitude code
    (see module docstring).  Raises ``ValueError`` if ``in`` is not a multiple
    of ``group`` (``group`` itself must be even) or if ``w`` is not finite.
    """
    if group <= 0 or group % 2:
        raise ValueError(f"fp4 group size must be a positive even number, got {group}")
    if w.dim() < 1:
        raise ValueError("quantize_fp4 needs at least a 1-D tensor")
    inn = w.shape[-1]
    if inn % group:
        raise ValueError(
            f"quantize_fp4: input dimension {inn} is not a multiple of the group size {group} "
            f"(fp4 packs 2 values per byte and uses one scale per {group} inputs)"
        )
    lead = tuple(w.shape[:-1])
    w2 = w.reshape(-1, inn)
    n = w2.shape[0]
    ng = inn // group
    packed = torch.empty((n, inn // 2), dtype=torch.uint8, device=w.device)
    exps = torch.empty((n, ng), dtype=torch.uint8, device=w.device)
    step = _fp4_chunk_rows(inn)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        x = w2[r0:r1].to(torch.float32).reshape(r1 - r0, ng, group)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("quantize_fp4: weight contains inf/NaN")
        amax = x.abs().amax(dim=-1)
        e = _ceil_log2(torch.where(amax == 0, torch.ones_like(amax), amax / FP4_MAX))
        e.clamp_(_E8M0_MIN_EXP, _E8M0_MAX_EXP)
        exps[r0:r1] = (e + 127).to(torch.uint8)
        s = _exp_to_float(e)
        x = x / s.unsqueeze(-1)  # exact: power-of-two scale
        mag = x.abs()
        code = torch.zeros(mag.shape, dtype=torch.uint8, device=w.device)
        for i, mid in enumerate(_FP4_MIDPOINTS):
            # tie at the midpoint goes to the even code: i even -> stay, i odd -> go up
            code += (mag >= mid) if i % 2 else (mag > mid)
        del mag
        code |= ((x < 0) & (code != 0)).to(torch.uint8) << 3
        code = code.reshape(r1 - r0, inn)
        packed[r0:r1] = (code[:, 0::2]) | (code[:, 1::2] << 4)
    packed = packed.view(torch.int8).reshape(*lead, inn // 2)
    exps = exps.reshape(*lead, ng)
    scale = uint8_to_e8m0(exps) if E8M0_DTYPE is not None else exps
    return packed, scale


def dequantize_fp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group: int = 32,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize packed FP4 ``[..., in/2]`` with scales ``[..., in/group]``.

    ``packed`` may be int8, uint8 or float4_e2m1fn_x2; ``scale`` may be
    ``float8_e8m0fnu``, uint8 exponent bytes, or float32/bfloat16.
    Peak extra memory: the output plus a few chunk-sized temporaries.
    """
    b = _as_uint8_bytes(packed)
    if b.dim() < 1:
        raise ValueError("packed fp4 weight must be at least 1-D")
    if group <= 0 or group % 2:
        raise ValueError(f"fp4 group size must be a positive even number, got {group}")
    inn = 2 * b.shape[-1]
    if inn % group:
        raise ValueError(f"fp4 input dimension {inn} is not a multiple of group {group}")
    want = fp4_scale_shape(tuple(b.shape), group)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"fp4 scale shape {tuple(scale.shape)} does not match packed weight "
            f"{tuple(b.shape)} with group {group} (expected {want})"
        )
    lead = tuple(b.shape[:-1])
    b2 = b.reshape(-1, inn // 2)
    n = b2.shape[0]
    ng = inn // group
    s2 = _scale_to_float(scale).reshape(n, ng).to(b.device)
    lut = _FP4_LUT.to(b.device)
    result = torch.empty((n, inn), dtype=dtype, device=b.device)
    step = _fp4_chunk_rows(inn)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = r1 - r0
        bc = b2[r0:r1]
        nib = torch.stack((bc & 0xF, bc >> 4), dim=-1).view(rows, ng, group)
        x = lut[nib.long()]
        del nib
        x.mul_(s2[r0:r1].unsqueeze(-1))
        result[r0:r1] = x.view(rows, inn)
    return result.reshape(*lead, inn)


# --------------------------------------------------------------------------- dispatch


def dequantize(
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    group: int = 32,
) -> torch.Tensor:
    """Loader convenience: dequantize ``weight`` according to its dtype.

    FP8 (``float8_e4m3fn``) -> :func:`dequantize_fp8_block`; packed FP4
    (int8/uint8/float4_e2m1fn_x2, see :func:`is_fp4_packed`) ->
    :func:`dequantize_fp4`; any other dtype is just cast to ``dtype``
    (``scale`` must then be None).
    """
    if is_fp8(weight):
        if scale is None:
            raise ValueError("fp8 weight needs its block scale")
        return dequantize_fp8_block(weight, scale, block=block, dtype=dtype)
    if is_fp4_packed(weight, scale, group=group):
        if scale is None:
            raise ValueError("fp4 weight needs its group scale")
        return dequantize_fp4(weight, scale, group=group, dtype=dtype)
    if scale is not None:
        raise ValueError(
            f"got a scale for a {weight.dtype} weight of shape {tuple(weight.shape)} "
            "that is neither fp8 nor a matching packed fp4 tensor"
        )
    return weight.to(dtype)
