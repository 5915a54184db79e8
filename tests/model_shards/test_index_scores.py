"""The Lightning Indexer's scores (model_shards/compressor.index_scores) on every path: the float32
einsum (CPUs, the reference), and on GPUs with 16-bit operands a tensor-core bmm that accumulates
in float32: the same products, so the same scores up to float32 summation order."""

from __future__ import annotations

import pytest
import torch

from model_shards.compressor import _is_half_gemm_ok, index_scores


def _reference(q, w, keys):
    dots = torch.einsum("...shd,...nd->...shn", q.double(), keys.double())
    return (dots.relu() * q.shape[-1] ** -0.5 * w.double().unsqueeze(-1)).sum(dim=-2)


def _case(lead: tuple[int, ...], S: int, H: int, D: int, N: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, S, H, D, generator=gen).to(dtype).to(device)
    keys = torch.randn(*lead, N, D, generator=gen).to(dtype).to(device)
    w = torch.randn(*lead, S, H, generator=gen).to(device)
    return q, w, keys


def test_float32_path_matches_the_formula():
    q, w, keys = _case((), 5, 4, 16, 9, torch.float32, "cpu")
    got = index_scores(q, w, keys)
    assert got.dtype == torch.float32 and got.shape == (5, 9)
    torch.testing.assert_close(got.double(), _reference(q, w, keys), rtol=1e-5, atol=1e-5)
    assert not _is_half_gemm_ok(q.bfloat16(), keys.bfloat16())        # CPU: the einsum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lead", [(), (3,)])
def test_half_gemm_on_cuda_equals_the_upcast_scores(lead):
    """Prefill's [S, n_I, d] x [N, d] and decode's batched [B, 1, n_I, d] x [B, N, d]: the bmm path
    agrees with the float32 upcast to float32 rounding, and picks the same top-k."""
    q, w, keys = _case(lead, 64, 8, 64, 300, torch.bfloat16, "cuda")
    assert _is_half_gemm_ok(q, keys)
    got = index_scores(q, w, keys)
    dots = torch.einsum("...shd,...nd->...shn", q.float(), keys.float())
    want = (dots.relu() * q.shape[-1] ** -0.5 * w.unsqueeze(-1)).sum(dim=-2)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), _reference(q, w, keys), rtol=1e-5, atol=1e-4)
    k = 32
    same = (got.topk(k).indices.sort().values == want.topk(k).indices.sort().values).float().mean()
    assert same >= 0.99      # a near-tie may flip at the boundary; nothing else
