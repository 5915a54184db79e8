"""model_shards.cpu_kernels: the few-row C kernels against torch's own math."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from factories import rel_err
from model_shards import cpu_kernels
from model_shards.cpu_experts import DecodeExperts
from model_shards.cpu_kernels import linear
from model_shards.ops import swiglu


def close_to_linear(y, x, w):
    """Within fp32 summation rounding of F.linear(x, w): |Δ| <= 1e-5 * Σ_k |x_k w_k| (the bound for
    any summation order, scaled for K <= a few thousand)."""
    return bool(((y - F.linear(x, w)).abs() <= 1e-5 * F.linear(x.abs(), w.abs()) + 1e-30).all())


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.is_available(), "the C kernels did not build (is there a C compiler?)"


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 16])
@pytest.mark.parametrize("n", [1, 4, 5, 67, 1030])
def test_linear_rows_matches_f_linear(rows, n):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x, w = torch.randn(rows, 96, generator=gen), torch.randn(n, 96, generator=gen)
    y = torch.ops.dsv4.linear_rows(x, w)
    assert y.shape == (rows, n) and close_to_linear(y, x, w)


def test_linear_rows_takes_batched_and_strided_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 64, generator=gen)[:, 1]          # [2, 5, 64], rows 3*64 apart
    w = torch.randn(200, 128, generator=gen)[:, :64]            # rows 128 apart
    assert close_to_linear(torch.ops.dsv4.linear_rows(x, w), x, w)
    assert torch.ops.dsv4.linear_rows(x[:0], w).shape == (0, 5, 200)


def test_linear_rows_falls_back_to_torch_where_the_kernel_does_not_fit():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 20, generator=gen), torch.randn(9, 20, generator=gen)   # K = 20: not a multiple of 8
    assert torch.equal(torch.ops.dsv4.linear_rows(x, w), F.linear(x, w))
    xt, w = torch.randn(64, 3, generator=gen).T, torch.randn(5, 64, generator=gen)   # xt: columns 3 apart
    assert torch.equal(torch.ops.dsv4.linear_rows(xt, w), F.linear(xt, w))


def test_a_column_does_not_depend_on_the_other_columns_or_rows_or_threads():
    """Each output is one fixed-order dot product: fusing linears (FusedLinear), batching rows or
    the thread count change nothing, bitwise."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(9, 256, generator=gen), torch.randn(301, 256, generator=gen)
    whole = torch.ops.dsv4.linear_rows(x, w)
    assert torch.equal(torch.ops.dsv4.linear_rows(x[4:5], w[100:137]), whole[4:5, 100:137])
    with one_thread():
        assert torch.equal(torch.ops.dsv4.linear_rows(x, w), whole)


def test_linear_picks_the_kernel_only_for_few_fp32_cpu_rows():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=gen)
    many = torch.randn(cpu_kernels.MAX_ROWS + 1, 64, generator=gen)
    assert torch.equal(linear(many, w), F.linear(many, w))                      # MKL's own result
    few = many[:4]
    assert torch.equal(linear(few, w), torch.ops.dsv4.linear_rows(few, w))
    assert torch.equal(linear(few.double(), w.double()), F.linear(few.double(), w.double()))


def test_linear_rows_inside_a_compiled_function():
    def f(x, w1, w2):
        return linear(torch.relu(linear(x, w1)), w2)

    gen = torch.Generator().manual_seed(4)
    x, w1, w2 = torch.randn(5, 64, generator=gen), torch.randn(32, 64, generator=gen), torch.randn(16, 32, generator=gen)
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    assert rel_err(compiled(x, w1, w2), F.linear(torch.relu(F.linear(x, w1)), w2)) <= 1e-5
    assert rel_err(compiled(x[:3], w1, w2), F.linear(torch.relu(F.linear(x[:3], w1)), w2)) <= 1e-5


def experts_reference(x, ids, weights, w13, w2t, limit):
    I = w2t.shape[1]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = w13[e] @ x[t]
            y[t] += weights[t, j] * (swiglu(h[:I], h[I:], limit) @ w2t[e])
    return y


@pytest.mark.parametrize("num_tokens,limit,inter", [(1, 0.0, 48), (5, 0.5, 48), (8, 7.0, 48), (70, 0.5, 48),
                                                    (8, 7.0, 18), (3, 0.5, 44), (4, 0.0, 12)])
def test_routed_experts_matches_the_per_pair_math(num_tokens, limit, inter):
    """Pairs grouped by expert (70 tokens on 6 experts: chunks of 64 rows), clamps on and off,
    pairs of experts a bank does not hold (-1) skipped; intermediate sizes the threads split
    unevenly (18: not a multiple of 4, 44) or not at all (12: too few units for two threads)."""
    gen = torch.Generator().manual_seed(num_tokens)
    E, D, I, k = 6, 64, inter, 3
    x = torch.randn(num_tokens, D, generator=gen)
    w13, w2t = torch.randn(E, 2 * I, D, generator=gen) / 8, torch.randn(E, I, D, generator=gen) / 7
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(num_tokens)])
    ids[::2, 0] = -1
    weights = torch.rand(num_tokens, k, generator=gen)
    y = torch.ops.dsv4.routed_experts(x, ids, weights, w13, w2t, limit)
    assert rel_err(y, experts_reference(x, ids, weights, w13, w2t, limit)) <= 1e-5
    assert torch.equal(torch.ops.dsv4.routed_experts(x, ids, weights, w13, w2t, limit), y)   # deterministic


def test_routed_experts_with_no_held_pair_is_zero():
    x = torch.randn(2, 16)
    y = torch.ops.dsv4.routed_experts(x, torch.full((2, 2), -1), torch.ones(2, 2), torch.randn(3, 8, 16),
                                      torch.randn(3, 4, 16), 0.0)
    assert torch.equal(y, torch.zeros(2, 16))


def test_routed_experts_refuses_what_its_kernel_cannot_take():
    with pytest.raises(ValueError, match="hidden % 8"):
        torch.ops.dsv4.routed_experts(torch.zeros(2, 12), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                                      torch.zeros(1, 4, 12), torch.zeros(1, 2, 12), 0.0)


def test_decode_experts_takes_only_decode_sized_fp32_steps():
    w13 = torch.zeros(4, 8, 16)
    x = torch.zeros(3, 16)
    assert DecodeExperts().can_run(x, w13, 12, 4)
    assert not DecodeExperts().can_run(x, w13, 4 * DecodeExperts.MAX_PAIRS_PER_EXPERT + 1, 4)
    assert not DecodeExperts().can_run(x.double(), w13.double(), 12, 4)
    assert not DecodeExperts().can_run(torch.zeros(3, 12), torch.zeros(4, 8, 12), 12, 4)   # hidden % 8
    assert not DecodeExperts(is_enabled=False).can_run(x, w13, 12, 4)


def test_without_a_compiler_the_ops_warn_once_and_use_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")                           # a "compiler" that always fails
    cpu_kernels._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu_kernels.is_available()
            x, w = torch.randn(2, 16), torch.randn(5, 16)
            assert torch.equal(torch.ops.dsv4.linear_rows(x, w), F.linear(x, w))
        assert sum("CPU decode kernels unavailable" in str(c.message) for c in caught) == 1
        assert not DecodeExperts().can_run(x, torch.zeros(2, 4, 16), 2, 2)
        assert list(tmp_path.iterdir()) == []                   # no half-built library left behind
    finally:
        cpu_kernels._library.cache_clear()


def test_the_build_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV4_KERNEL_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels.is_available()
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith("dsv4_kernels_") and built[0].suffix == ".so"
        cpu_kernels._library.cache_clear()
        mtime = built[0].stat().st_mtime_ns
        assert cpu_kernels.is_available() and built[0].stat().st_mtime_ns == mtime   # reused, not rebuilt
    finally:
        cpu_kernels._library.cache_clear()


# ---- linear_groups (attention's grouped output projection) and Sinkhorn -----------------------

def grouped_reference(x, w):
    G, N, K = w.shape
    return torch.bmm(x.reshape(x.shape[0], G, K).transpose(0, 1), w.transpose(1, 2)).transpose(0, 1).reshape(-1, G * N)


@pytest.mark.parametrize("rows,groups,n", [(1, 4, 128), (3, 2, 5), (8, 4, 64), (16, 1, 300)])
def test_linear_groups_is_linear_rows_per_group(rows, groups, n):
    """Each group's columns are exactly linear_rows over the group's input columns (bitwise), and
    within rounding of torch's bmm."""
    gen = torch.Generator().manual_seed(rows + 10 * groups + n)
    x, w = torch.randn(rows, groups * 64, generator=gen), torch.randn(groups, n, 64, generator=gen)
    y = torch.ops.dsv4.linear_groups(x, w)
    per_group = torch.cat([torch.ops.dsv4.linear_rows(x[:, g * 64:(g + 1) * 64], w[g]) for g in range(groups)], 1)
    assert y.shape == (rows, groups * n) and torch.equal(y, per_group)
    assert rel_err(y, grouped_reference(x, w)) <= 1e-5


def test_linear_groups_does_not_depend_on_threads_and_falls_back_where_it_does_not_fit():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(8, 4 * 256, generator=gen), torch.randn(4, 128, 256, generator=gen)   # 2 threads at 128K floats
    whole = torch.ops.dsv4.linear_groups(x, w)
    with one_thread():
        assert torch.equal(torch.ops.dsv4.linear_groups(x, w), whole)
    odd_x, odd_w = torch.randn(3, 2 * 20, generator=gen), torch.randn(2, 7, 20, generator=gen)   # K = 20
    assert torch.equal(torch.ops.dsv4.linear_groups(odd_x, odd_w), grouped_reference(odd_x, odd_w))
    assert torch.equal(cpu_kernels.grouped_linear(x.double(), w.double()), grouped_reference(x.double(), w.double()))
    many = torch.randn(cpu_kernels.MAX_ROWS + 1, 4 * 256, generator=gen)
    assert torch.equal(cpu_kernels.grouped_linear(many, w), grouped_reference(many, w))


def sinkhorn_numpy(comb, num_iters, eps):
    import numpy as np
    a, e = comb.numpy().copy(), np.float32(eps)
    a /= a.sum(axis=-2, keepdims=True) + e
    for _ in range(num_iters - 1):
        a /= a.sum(axis=-1, keepdims=True) + e
        a /= a.sum(axis=-2, keepdims=True) + e
    return torch.from_numpy(a)


@pytest.mark.parametrize("shape", [(8, 4, 4), (2, 3, 4, 4), (5, 3, 3), (0, 4, 4)])
def test_sinkhorn_kernel_is_bitwise_the_numpy_passes(shape):
    from model_shards.ops import sinkhorn, sinkhorn_torch
    gen = torch.Generator().manual_seed(len(shape))
    comb = torch.softmax(torch.randn(*shape, generator=gen), -1) + 1e-6
    before = comb.clone()
    got = cpu_kernels.sinkhorn(comb, 20, 1e-6)
    assert torch.equal(got, sinkhorn_numpy(comb, 20, 1e-6)) and torch.equal(sinkhorn(comb, 20, 1e-6), got)
    assert torch.equal(torch.ops.dsv4.sinkhorn(comb, 20, 1e-6), got)
    assert (got - sinkhorn_torch(comb, 20, 1e-6)).abs().max() <= 1e-6 if got.numel() else True
    assert torch.equal(comb, before)                                          # the input is left as it was


def test_sinkhorn_kernel_takes_only_what_it_can_and_compiles_as_one_op():
    assert cpu_kernels.sinkhorn(torch.rand(2, 65, 65), 3, 1e-6) is None               # n > 64
    assert cpu_kernels.sinkhorn(torch.rand(2, 4, 4).double(), 3, 1e-6) is None
    with pytest.raises(ValueError, match="sinkhorn"):
        torch.ops.dsv4.sinkhorn(torch.rand(2, 4, 4).double(), 3, 1e-6)
    comb = torch.rand(6, 4, 4) + 0.1
    compiled = torch.compile(lambda c: cpu_kernels.sinkhorn_compiled_cpu(c * 2, 20, 1e-6), fullgraph=True, dynamic=True)
    assert torch.equal(compiled(comb), cpu_kernels.sinkhorn(comb * 2, 20, 1e-6))


def test_without_a_compiler_sinkhorn_and_groups_use_numpy_and_torch(monkeypatch, tmp_path):
    from model_shards.ops import sinkhorn
    monkeypatch.setenv("DSV4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu_kernels._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comb = torch.rand(3, 4, 4) + 0.1
            assert cpu_kernels.sinkhorn(comb, 20, 1e-6) is None
            assert torch.equal(sinkhorn(comb, 20, 1e-6), sinkhorn_numpy(comb, 20, 1e-6))
            x, w = torch.randn(2, 2 * 16), torch.randn(2, 5, 16)
            assert torch.equal(torch.ops.dsv4.linear_groups(x, w), grouped_reference(x, w))
    finally:
        cpu_kernels._library.cache_clear()
