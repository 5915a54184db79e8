"""The GPU grouped-expert path's pieces (model_shards/moe.py), checked on CPU: the counting
placement gives exactly the stable argsort's order, and route -> grouped GEMMs -> combine equals
the bank's eager path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_shards.moe import (ExpertBank, combine_pairs, expert_order, grouped_swiglu, route_pairs)
from model_shards.random_checkpoint import PRESETS


def _stable_rows(keys: torch.Tensor) -> torch.Tensor:
    """Each pair's row in torch.argsort(keys, stable=True): the inverse permutation."""
    order = torch.argsort(keys, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(keys.numel()))


@pytest.mark.parametrize("seed", range(6))
def test_expert_order_is_the_stable_argsort(seed):
    gen = torch.Generator().manual_seed(seed)
    num_experts = [1, 4, 8, 64, 256, 5][seed]
    for num_pairs in (0, 1, 7, 384, 1000):
        # few distinct experts (many ties, many empty experts) and the full range
        for hi in (1, min(3, num_experts), num_experts):
            keys = torch.randint(0, hi, (num_pairs,), generator=gen)
            dest, counts = expert_order(keys, num_experts)
            assert dest.dtype == counts.dtype == torch.int64
            assert torch.equal(dest, _stable_rows(keys))
            assert torch.equal(counts, torch.bincount(keys, minlength=num_experts))


def _bank(num_held: int | None = None):
    cfg = dataclasses.replace(PRESETS["tiny"], n_routed_experts=8, num_experts_per_tok=3)
    held = list(range(cfg.n_routed_experts)) if num_held is None else [1, 2, 5, 6][:num_held]
    bank = ExpertBank(cfg, held)
    gen = torch.Generator().manual_seed(1)
    for p in bank.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return cfg, bank


@pytest.mark.parametrize("num_held", [None, 4, 1])
@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_route_and_combine_equal_the_eager_bank(num_held, num_tokens):
    """The GPU path's composition (plain, uncompiled functions here) against the CPU grouped path:
    same rows in the same order, and the same output up to the combine's summation order."""
    cfg, bank = _bank(num_held)
    bank._route, bank._act, bank._combine = route_pairs, grouped_swiglu, combine_pairs   # no compiling on CPU
    gen = torch.Generator().manual_seed(num_tokens)
    k = cfg.num_experts_per_tok
    x = torch.randn(num_tokens, cfg.hidden_size, generator=gen)
    # experts drawn from a few ids so that some experts get several pairs and some none
    expert_ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, k, generator=gen)
    local = bank.local_index[expert_ids].flatten()
    held = None if num_held is None else (local >= 0).nonzero().squeeze(1)
    if held is not None and held.numel() == 0:
        pytest.skip("no pair held")
    want = bank._grouped(0, x, local, held, weights, k)                         # CPU: argsort + index_add_
    got = bank._grouped_cuda(x, local, held, weights, bank.w13[0], bank.w2t[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    xs, dest, offs = route_pairs(x, local, held, k, len(bank.expert_ids))
    pairs = torch.arange(local.numel()) if held is None else held
    order = pairs[torch.argsort(local[pairs], stable=True)]
    assert torch.equal(xs, x[order // k])
    assert torch.equal(offs, torch.bincount(local[pairs], minlength=len(bank.expert_ids)).cumsum(0).to(torch.int32))
    assert torch.equal(dest[order], torch.arange(order.numel()))               # each pair's row
    if held is not None:   # pairs not held point at the zero row past the end
        missing = torch.ones(local.numel(), dtype=torch.bool)
        missing[held] = False
        assert bool((dest[missing] == order.numel()).all())


def test_route_falls_back_to_the_sort_for_large_tables(monkeypatch):
    import model_shards.moe as moe

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, generator=gen)
    local = torch.randint(0, 8, (100,), generator=gen)
    small = route_pairs(x, local, None, 2, 8)
    monkeypatch.setattr(moe, "MAX_COUNTING_ENTRIES", 10)
    large = route_pairs(x, local, None, 2, 8)
    for a, b in zip(small, large):
        assert torch.equal(a, b)


@pytest.mark.parametrize("num_held", [None, 4, 1])
@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_partial_routing_keeps_fixed_shapes_and_the_held_order(num_held, num_tokens):
    """is_partial: every pair is gathered (T*k rows), the held ones first in exactly the order the
    nonzero-filtered routing gives, groups ending where theirs do; pairs not held point at the zero
    row. Through the grouped GEMMs (whose rows past the last group stay unwritten) the output equals
    the eager bank's."""
    cfg, bank = _bank(num_held)
    bank._route, bank._act, bank._combine = route_pairs, grouped_swiglu, combine_pairs
    gen = torch.Generator().manual_seed(10 + num_tokens)
    k = cfg.num_experts_per_tok
    x = torch.randn(num_tokens, cfg.hidden_size, generator=gen)
    expert_ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, k, generator=gen)
    local = bank.local_index[expert_ids].flatten()
    held = (local >= 0).nonzero().squeeze(1)
    xs, dest, offs = route_pairs(x, local, None, k, len(bank.expert_ids), is_partial=True)
    want_xs, want_dest, want_offs = route_pairs(x, local, held, k, len(bank.expert_ids))
    assert xs.shape == (num_tokens * k, cfg.hidden_size)
    assert torch.equal(offs, want_offs)
    assert torch.equal(xs[: held.numel()], want_xs)
    assert torch.equal(dest[held], want_dest[held])
    assert bool((dest[local < 0] == num_tokens * k).all())
    if held.numel():
        want = bank._grouped(0, x, local, held, weights, k)
        got = bank._grouped_cuda(x, local, None, weights, bank.w13[0], bank.w2t[0], is_partial=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_held", [None, 4])
def test_num_valid_rows_route_the_padding_nowhere(num_held):
    """forward(num_valid=n) on padded rows: the padding (arbitrary valid expert ids) is routed to
    no expert (zero rows here, on CPU's filtered path), and the first n rows are forward on those
    rows (up to the CPU kernel choice, which counts the padded pairs)."""
    cfg, bank = _bank(num_held)
    gen = torch.Generator().manual_seed(4)
    k = cfg.num_experts_per_tok
    x = torch.randn(8, cfg.hidden_size, generator=gen)
    expert_ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:k] for _ in range(8)])
    weights = torch.rand(8, k, generator=gen)
    for n in (1, 3, 8):
        got = bank(0, x, expert_ids, weights, torch.tensor(n))
        assert not got[n:].any()
        torch.testing.assert_close(got[:n], bank(0, x[:n], expert_ids[:n], weights[:n]), rtol=1e-5, atol=1e-5)
