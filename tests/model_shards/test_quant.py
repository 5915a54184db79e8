"""Tests for model_shards.quant (FP8 block / FP4 group quantization, DeepSeek-V4 layout)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from model_shards import quant
from model_shards.quant import (
    FP4_VALUES,
    dequantize,
    dequantize_fp4,
    dequantize_fp8_block,
    e8m0_to_float,
    e8m0_to_uint8,
    float_to_e8m0,
    is_fp4_packed,
    is_fp8,
    pack_fp4_codes,
    quantize_fp4,
    quantize_fp8_block,
    uint8_to_e8m0,
    unpack_fp4_codes,
)

E8M0 = torch.float8_e8m0fnu
FP8 = torch.float8_e4m3fn
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ref_dequant_fp8(q, s, block=128):
    """Naive reference: expand the scale to full size."""
    out, inn = q.shape
    sf = e8m0_to_float(s) if s.dtype == E8M0 else s.float()
    full = sf.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inn]
    return q.float() * full


def _random_fp8_bytes(shape, gen):
    b = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b)  # drop the NaN codes 0x7F / 0xFF
    return b.to(torch.uint8).view(FP8)


# ----------------------------------------------------------------------------- e8m0


def test_e8m0_powers_of_two_exact():
    exps = torch.arange(-127, 128, dtype=torch.int32)
    vals = torch.tensor([math.ldexp(1.0, int(e)) for e in exps], dtype=torch.float32)
    enc = float_to_e8m0(vals)
    assert enc.dtype == E8M0
    assert torch.equal(enc.view(torch.uint8).to(torch.int32), exps + 127)
    dec = e8m0_to_float(enc)
    assert dec.dtype == torch.float32
    assert torch.equal(dec, vals)
    # agrees with torch's own e8m0 -> float conversion for every finite byte
    allb = torch.arange(0, 255, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(e8m0_to_float(allb.view(E8M0)), allb.view(E8M0).float())
    # uint8 exponent bytes decode the same as the e8m0 dtype
    assert torch.equal(e8m0_to_float(allb), e8m0_to_float(allb.view(E8M0)))


def test_e8m0_special_and_rounding():
    assert torch.isnan(e8m0_to_float(torch.tensor([255], dtype=torch.uint8))).all()
    assert e8m0_to_float(torch.tensor([0], dtype=torch.uint8)).item() == math.ldexp(1.0, -127)
    assert e8m0_to_float(torch.tensor([127], dtype=torch.uint8)).item() == 1.0
    # non powers of two round up; out-of-range values clamp
    got = e8m0_to_float(float_to_e8m0(torch.tensor([3.0, 0.3, 1.0000001, 1e-45, 3e38])))
    assert got.tolist() == [4.0, 0.5, 2.0, math.ldexp(1.0, -127), math.ldexp(1.0, 127)]
    assert float_to_e8m0(0.5).view(torch.uint8).item() == 126
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            float_to_e8m0(torch.tensor([1.0, bad]))


def test_e8m0_uint8_views():
    b = torch.tensor([[0, 127, 254]], dtype=torch.uint8)
    e = uint8_to_e8m0(b)
    assert e.dtype == E8M0 and e.data_ptr() == b.data_ptr()
    assert torch.equal(e8m0_to_uint8(e), b)
    assert float_to_e8m0(torch.tensor([2.0]), as_uint8=True).dtype == torch.uint8
    with pytest.raises(TypeError):
        e8m0_to_uint8(torch.ones(2))


# ----------------------------------------------------------------------------- FP8


FP8_SHAPES = [(130, 200), (256, 384), (1, 1), (128, 129), (300, 128)]


@pytest.mark.parametrize("shape", FP8_SHAPES)
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_fp8_exact_round_trip(shape, scale_fmt):
    g = _gen(1)
    out, inn = shape
    q = _random_fp8_bytes(shape, g)
    nrb, ncb = math.ceil(out / 128), math.ceil(inn / 128)
    qb = q.view(torch.uint8).clone()
    # force each block's amax to be exactly 448 (byte 0x7E, or 0xFE = -448)
    for i in range(nrb):
        for j in range(ncb):
            qb[i * 128, j * 128] = 0x7E if (i + j) % 2 == 0 else 0xFE
    q = qb.view(FP8)
    e = torch.randint(-20, 21, (nrb, ncb), generator=g)
    s = torch.ldexp(torch.ones(nrb, ncb), e.float())
    if scale_fmt == "float32":  # non power-of-two scales with few mantissa bits
        s = s * torch.tensor([1.0, 1.375, 1.75, 1.125])[torch.randint(0, 4, (nrb, ncb), generator=g)]
    w = dequantize_fp8_block(q, s)
    assert torch.equal(w, _ref_dequant_fp8(q, s))
    w_copy = w.clone()
    q2, s2 = quantize_fp8_block(w, scale_fmt=scale_fmt)
    assert torch.equal(w, w_copy)  # input left untouched
    assert q2.dtype == FP8 and q2.shape == q.shape
    assert s2.dtype == (torch.float32 if scale_fmt == "float32" else E8M0)
    assert s2.shape == (nrb, ncb)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(e8m0_to_float(s2) if scale_fmt == "ue8m0" else s2, s)
    assert torch.equal(dequantize_fp8_block(q2, s2), w)


@pytest.mark.parametrize("shape", FP8_SHAPES + [(513, 1000)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_fp8_error_bounds(shape, scale_fmt):
    g = _gen(2)
    out, inn = shape
    nrb, ncb = math.ceil(out / 128), math.ceil(inn / 128)
    mags = torch.ldexp(torch.ones(nrb, ncb), torch.randint(-12, 12, (nrb, ncb), generator=g).float())
    magfull = mags.repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inn]
    w = torch.randn(shape, generator=g) * magfull
    q, s = quantize_fp8_block(w, scale_fmt=scale_fmt)
    sf = e8m0_to_float(s) if scale_fmt == "ue8m0" else s
    deq = dequantize_fp8_block(q, s)
    err = (deq - w).abs()

    amax = torch.nn.functional.pad(w.abs(), (0, ncb * 128 - inn, 0, nrb * 128 - out))
    amax = amax.view(nrb, 128, ncb, 128).amax(dim=(1, 3))
    if scale_fmt == "float32":
        assert torch.equal(sf, amax / 448)
    else:
        assert ((sf >= amax / 448) & (sf < amax / 224)).all()
        assert torch.equal(torch.frexp(sf).mantissa, torch.full_like(sf, 0.5))  # powers of two
    sfull = sf.repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inn]
    # e4m3: 3 mantissa bits -> rel. error <= 2^-4 for normals, abs <= 2^-10*scale for subnormals
    assert (err <= w.abs() * 2.0**-4 + sfull * 2.0**-10).all()
    amax_full = amax.repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inn]
    assert (err <= amax_full * 2.0**-3).all()


def test_fp8_zero_and_partial_blocks():
    w = torch.zeros(130, 200)
    w[129, 199] = 3.0  # only the bottom-right (partial) block is non-zero
    for fmt in ("float32", "ue8m0"):
        q, s = quantize_fp8_block(w, scale_fmt=fmt)
        sf = e8m0_to_float(s) if fmt == "ue8m0" else s
        assert s.shape == (2, 2)
        assert sf[0, 0] == 1.0 and sf[0, 1] == 1.0 and sf[1, 0] == 1.0
        assert sf[1, 1] == (3.0 / 448 if fmt == "float32" else 2.0**-7)
        assert torch.equal(dequantize_fp8_block(q, s), w)


def test_fp8_scale_dtypes_and_output_dtype():
    g = _gen(3)
    w = torch.randn(130, 200, generator=g)
    q, s8 = quantize_fp8_block(w, scale_fmt="ue8m0")
    ref = dequantize_fp8_block(q, s8)
    s32 = e8m0_to_float(s8)
    # power-of-two scales are exact in float32, bfloat16 and as uint8 exponent bytes
    assert torch.equal(dequantize_fp8_block(q, s32), ref)
    assert torch.equal(dequantize_fp8_block(q, s32.to(torch.bfloat16)), ref)
    assert torch.equal(dequantize_fp8_block(q, s8.view(torch.uint8)), ref)
    bf = dequantize_fp8_block(q, s8, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, ref.to(torch.bfloat16))
    # ue8m0 scales dequantize no better than 2x coarser than float32 scales
    qf, sf = quantize_fp8_block(w, scale_fmt="float32")
    assert (dequantize_fp8_block(qf, sf) - w).abs().max() <= (ref - w).abs().max() * 2 + 1e-6
    # bf16 input is accepted
    qb, sb = quantize_fp8_block(w.to(torch.bfloat16))
    assert qb.dtype == FP8


def test_fp8_bad_inputs():
    q, s = quantize_fp8_block(torch.randn(130, 200))
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_fp8_block(q, s[:1])
    with pytest.raises(TypeError):
        dequantize_fp8_block(q.float(), s)
    with pytest.raises(ValueError):
        quantize_fp8_block(torch.randn(4, 4), scale_fmt="e8m0")
    with pytest.raises(ValueError):
        quantize_fp8_block(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError):
        quantize_fp8_block(torch.randn(2, 3, 4))


def test_fp8_chunking_matches_reference(monkeypatch):
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 1000)  # several 128-row chunks + partial tail
    g = _gen(4)
    w = torch.randn(700, 300, generator=g) * 10
    for fmt in ("float32", "ue8m0"):
        q, s = quantize_fp8_block(w, scale_fmt=fmt)
        monkeypatch.setattr(quant, "CHUNK_ELEMS", 1 << 30)
        q1, s1 = quantize_fp8_block(w, scale_fmt=fmt)
        monkeypatch.setattr(quant, "CHUNK_ELEMS", 1000)
        assert torch.equal(q.view(torch.uint8), q1.view(torch.uint8))
        assert torch.equal(s.view(torch.uint8), s1.view(torch.uint8))
        ref = _ref_dequant_fp8(q, e8m0_to_float(s) if fmt == "ue8m0" else s)
        assert torch.equal(dequantize_fp8_block(q, s), ref)
        assert torch.equal(dequantize_fp8_block(q, s, dtype=torch.bfloat16), ref.to(torch.bfloat16))


# ----------------------------------------------------------------------------- FP4


def test_fp4_hand_packed_byte_low_nibble_first():
    # element 0 = +1.0 (code 2) in the LOW nibble, element 1 = -3.0 (0x8|5 = 0xD) in the HIGH
    packed = torch.full((1, 16), 0xD2, dtype=torch.uint8).view(torch.int8)
    scale = float_to_e8m0(torch.ones(1, 1))
    deq = dequantize_fp4(packed, scale)
    assert deq.shape == (1, 32)
    assert deq[0, 0::2].eq(1.0).all() and deq[0, 1::2].eq(-3.0).all()
    # scale 2^-1 halves everything
    deq2 = dequantize_fp4(packed, float_to_e8m0(torch.full((1, 1), 0.5)))
    assert deq2[0, :2].tolist() == [0.5, -1.5]
    # quantizing the same values yields the same byte
    w = torch.tensor([[1.0, -3.0] * 16])
    w[0, 2] = 6.0  # pin the scale to 1 (amax 6)
    p, s = quantize_fp4(w)
    assert p.dtype == torch.int8 and p.shape == (1, 16)
    assert s.dtype == E8M0 and s.shape == (1, 1) and e8m0_to_float(s).item() == 1.0
    assert p.view(torch.uint8)[0, 0].item() == 0xD2
    assert p.view(torch.uint8)[0, 1].item() == 0xD7  # 6.0 -> code 7 low, -3.0 high


def test_fp4_full_decode_table():
    nibbles = torch.arange(16, dtype=torch.uint8)
    packed = pack_fp4_codes(torch.cat([nibbles, nibbles]).view(1, 32))
    assert torch.equal(unpack_fp4_codes(packed).view(-1)[:16], nibbles)
    deq = dequantize_fp4(packed, float_to_e8m0(torch.ones(1, 1)))[0, :16]
    expect = list(FP4_VALUES) + [-v for v in FP4_VALUES]
    assert deq.tolist() == expect


@pytest.mark.parametrize("shape", [(5, 64), (3, 8, 96), (1, 32)])
def test_fp4_exact_round_trip(shape):
    g = _gen(5)
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.int32)
    codes = torch.where(codes == 8, torch.zeros_like(codes), codes)  # no -0
    codes[..., ::32] = torch.where(codes[..., ::32] >= 8, 15, 7)  # each group contains +-6
    lut = torch.tensor(list(FP4_VALUES) + [-v for v in FP4_VALUES])
    ng = shape[-1] // 32
    exps = torch.randint(-30, 31, (*shape[:-1], ng), generator=g)
    sc = torch.ldexp(torch.ones(exps.shape), exps.float())
    w = lut[codes.long()] * sc.repeat_interleave(32, -1)
    w_copy = w.clone()
    p, s = quantize_fp4(w)
    assert torch.equal(w, w_copy)  # input left untouched
    assert p.shape == (*shape[:-1], shape[-1] // 2) and p.dtype == torch.int8
    assert s.shape == (*shape[:-1], ng) and s.dtype == E8M0
    assert torch.equal(e8m0_to_float(s), sc)
    assert torch.equal(p, pack_fp4_codes(codes))
    assert torch.equal(dequantize_fp4(p, s), w)
    # groups without +-6 still round-trip exactly in value (scale adapts)
    w2 = lut[torch.randint(0, 16, shape, generator=g).long()] * sc.repeat_interleave(32, -1)
    p2, s2 = quantize_fp4(w2)
    assert torch.equal(dequantize_fp4(p2, s2), w2)
    assert torch.equal(dequantize_fp4(p2, s2, dtype=torch.bfloat16), w2.to(torch.bfloat16))


def test_fp4_ties_to_even_code():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expect = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = mids + [-m for m in mids] + [6.0]
    row += [0.0] * (32 - len(row))
    p, s = quantize_fp4(torch.tensor([row]))
    assert e8m0_to_float(s).item() == 1.0
    got = dequantize_fp4(p, s)[0]
    assert got[:7].tolist() == expect
    assert got[7:14].tolist() == [-e for e in expect]
    # rounding to zero from a negative value writes +0 (nibble 0), never 0x8
    assert unpack_fp4_codes(p)[0, 7].item() == 0


def test_fp4_error_bounds():
    g = _gen(6)
    w = torch.randn(64, 256, generator=g) * torch.ldexp(
        torch.ones(64, 1), torch.randint(-10, 10, (64, 1), generator=g).float()
    )
    w[3, :32] = 0.0  # a zero group
    p, s = quantize_fp4(w)
    sf = e8m0_to_float(s)
    assert sf[3, 0] == 1.0
    amax = w.abs().view(64, 8, 32).amax(-1)
    nz = amax > 0
    assert ((sf[nz] >= amax[nz] / 6) & (sf[nz] < amax[nz] / 3)).all()
    deq = dequantize_fp4(p, s)
    sfull = sf.repeat_interleave(32, -1)
    x = (w / sfull).abs()
    grid = torch.tensor(FP4_VALUES)
    # half the local grid step around |x|, times the scale
    idx = torch.bucketize(x, grid).clamp(1, 7)
    half_step = (grid[idx] - grid[idx - 1]) / 2
    err = (deq - w).abs()
    assert (err <= half_step * sfull).all()
    assert (err <= sfull).all()  # largest half step is 1 (between 4 and 6)
    # and it is the nearest representable value
    dist_to_grid = (x.unsqueeze(-1) - grid).abs().amin(-1)
    assert torch.allclose(err / sfull, dist_to_grid, atol=0, rtol=1e-6)
    assert torch.equal(torch.sign(deq[deq != 0]), torch.sign(w[deq != 0]))


def test_fp4_packed_dtypes_and_scale_dtypes():
    g = _gen(7)
    w = torch.randn(4, 64, generator=g)
    p, s = quantize_fp4(w)
    ref = dequantize_fp4(p, s)
    assert torch.equal(dequantize_fp4(p.view(torch.uint8), s), ref)
    assert torch.equal(dequantize_fp4(p.view(torch.float4_e2m1fn_x2), s), ref)
    assert torch.equal(dequantize_fp4(p, s.view(torch.uint8)), ref)
    assert torch.equal(dequantize_fp4(p, e8m0_to_float(s)), ref)
    assert torch.equal(dequantize_fp4(p, e8m0_to_float(s).to(torch.bfloat16)), ref)


def test_fp4_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        quantize_fp4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple"):
        quantize_fp4(torch.randn(4, 33))
    with pytest.raises(ValueError):
        quantize_fp4(torch.randn(4, 64), group=3)
    p, s = quantize_fp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_fp4(p, s[:, :1])
    with pytest.raises(TypeError):
        dequantize_fp4(p.float(), s)
    with pytest.raises(ValueError):
        quantize_fp4(torch.tensor([[float("inf")] * 32]))
    # other group sizes work when consistent
    p16, s16 = quantize_fp4(torch.randn(4, 64), group=16)
    assert s16.shape == (4, 4) and dequantize_fp4(p16, s16, group=16).shape == (4, 64)


def test_fp4_chunking_matches(monkeypatch):
    g = _gen(8)
    w = torch.randn(37, 96, generator=g)
    p_ref, s_ref = quantize_fp4(w)
    d_ref = dequantize_fp4(p_ref, s_ref)
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 200)  # 2 rows per chunk, odd tail
    p, s = quantize_fp4(w)
    assert torch.equal(p, p_ref) and torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8))
    assert torch.equal(dequantize_fp4(p, s), d_ref)


# ----------------------------------------------------------------------------- loader helpers


def test_predicates_and_dispatch():
    w = torch.randn(130, 200)
    q, s = quantize_fp8_block(w, scale_fmt="ue8m0")
    p, ps = quantize_fp4(torch.randn(8, 64))
    assert is_fp8(q) and not is_fp8(w) and not is_fp8(p)
    assert is_fp4_packed(p) and is_fp4_packed(p, ps)
    assert is_fp4_packed(p.view(torch.float4_e2m1fn_x2))
    assert is_fp4_packed(p.view(torch.uint8), ps.view(torch.uint8))
    assert not is_fp4_packed(p, ps[:, :1])  # wrong scale shape
    assert not is_fp4_packed(p, e8m0_to_float(ps))  # not a ue8m0 scale
    assert not is_fp4_packed(q) and not is_fp4_packed(w)
    assert torch.equal(dequantize(q, s, dtype=torch.float32), dequantize_fp8_block(q, s))
    assert torch.equal(dequantize(p, ps, dtype=torch.float32), dequantize_fp4(p, ps))
    assert dequantize(w).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        dequantize(q)
    with pytest.raises(ValueError):
        dequantize(w, s)


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    g = _gen(9)
    q, s32 = quantize_fp8_block(torch.randn(130, 200, generator=g))
    q8, s8 = quantize_fp8_block(torch.randn(130, 200, generator=g), scale_fmt="ue8m0")
    p, ps = quantize_fp4(torch.randn(2, 16, 64, generator=g))
    tensors = {
        "attn.wq.weight": q,
        "attn.wq.scale": s32,
        "attn.wo.weight": q8,
        "attn.wo.scale": s8,
        "experts.w1.weight": p,
        "experts.w1.scale": ps,
        "experts.w2.weight": p.view(torch.float4_e2m1fn_x2).clone(),
        "experts.w2.scale_bytes": ps.view(torch.uint8).clone(),
    }
    path = str(tmp_path / "shard.safetensors")
    save_file(tensors, path)
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        assert f.get_slice("attn.wo.scale").get_dtype() == "F8_E8M0"
        assert f.get_slice("attn.wq.weight").get_dtype() == "F8_E4M3"
    for k, t in tensors.items():
        lt = loaded[k]
        assert lt.dtype == t.dtype, k
        assert lt.shape == t.shape, k
        assert torch.equal(lt.view(torch.uint8), t.view(torch.uint8)), k
    assert torch.equal(load_file(path)["attn.wo.scale"].view(torch.uint8), s8.view(torch.uint8))
    assert torch.equal(
        dequantize_fp8_block(loaded["attn.wo.weight"], loaded["attn.wo.scale"]),
        dequantize_fp8_block(q8, s8),
    )
    d = dequantize_fp4(p, ps)
    assert torch.equal(dequantize_fp4(loaded["experts.w1.weight"], loaded["experts.w1.scale"]), d)
    assert torch.equal(dequantize_fp4(loaded["experts.w2.weight"], loaded["experts.w2.scale_bytes"]), d)


# ----------------------------------------------------------------------------- memory


_MEM_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from model_shards.quant import dequantize_fp8_block, dequantize_fp4
    torch.set_num_threads(2)

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    def measure(fn):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
        base = rss_kib()
        out = fn()
        out.fill_(0)  # make sure every output page is resident
        return (hwm_kib() - base) * 1024, out.numel() * out.element_size()

    kind = sys.argv[1]
    if kind == "fp8":
        out_, in_ = 4096, 8192 + 64
        q = torch.randint(0, 120, (out_, in_), dtype=torch.uint8).view(torch.float8_e4m3fn)
        s = torch.rand((out_ + 127) // 128, (in_ + 127) // 128) + 0.5
        extra, out_bytes = measure(lambda: dequantize_fp8_block(q, s))
    else:
        q = torch.randint(-128, 128, (4096, 4096), dtype=torch.int8)
        s = torch.randint(120, 130, (4096, 256), dtype=torch.uint8).view(torch.float8_e8m0fnu)
        extra, out_bytes = measure(lambda: dequantize_fp4(q, s))
    print(extra, out_bytes)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux VmHWM reset")
@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_dequant_peak_memory(kind):
    """Peak extra RSS during dequantization is ~ one output tensor + O(chunk)."""
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, kind],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip("cannot reset VmHWM here")
    assert res.returncode == 0, res.stderr
    extra, out_bytes = map(int, res.stdout.split())
    # A naive q.float() * expanded_scale would need ~3x the output size.
    assert extra <= out_bytes + 160 * 2**20, (extra / 2**20, out_bytes / 2**20)
