"""ExpertGraphs (model_shards/expert_graphs.py): per-layer expert compute from a static message.
On CPU the fixed-shape path runs eagerly; on a GPU the replays are checked against the eager bank."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_shards.expert_graphs import ExpertGraphs
from model_shards.moe import ExpertBank
from model_shards.random_checkpoint import PRESETS

# the test's own message layout: [n as one float | rows of x (hidden), ids (k), weights (k)]


def _layout(hidden: int, k: int):
    width = hidden + 2 * k

    def numel(rows: int) -> int:
        return 1 + rows * width

    def unpack(message: torch.Tensor, rows: int):
        body = message[1: numel(rows)].view(rows, width)
        return body[:, :hidden], body[:, hidden: hidden + k].long(), body[:, hidden + k:], message[0].long()

    def write(message: torch.Tensor, x, ids, w) -> None:
        n = x.shape[0]
        message[0] = n
        message[1: numel(n)].view(n, width).copy_(torch.cat([x, ids.to(x.dtype), w.to(x.dtype)], dim=1))

    return numel, unpack, write


def _bank(held: list[int] | None, device="cpu", dtype=torch.float32):
    cfg = dataclasses.replace(PRESETS["tiny"], n_routed_experts=8, num_experts_per_tok=3)
    bank = ExpertBank(cfg, list(range(8)) if held is None else held, dtype, device)
    gen = torch.Generator().manual_seed(1)
    for p in bank.parameters():
        p.data.copy_((torch.randn(p.shape, generator=gen) * 0.3).to(dtype))
    return cfg, bank


def _tokens(cfg, n: int, seed: int, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    k = cfg.num_experts_per_tok
    x = torch.randn(n, cfg.hidden_size, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=gen)
    return x.to(device), ids.to(device), w.to(device)


@pytest.mark.parametrize("held", [None, [1, 2, 5, 6]])
def test_bucketed_messages_equal_the_bank(held):
    """Messages of 5, then 2, then 3 rows share the 4- / 8-row buckets: the padding rows hold what a
    larger message left, and each output's first n rows equal the bank on those n rows (up to
    the CPU kernel choice, which counts the padded pairs; exact on GPUs, below)."""
    cfg, bank = _bank(held)
    numel, unpack, write = _layout(cfg.hidden_size, cfg.num_experts_per_tok)
    graphs = ExpertGraphs(bank, numel, unpack, torch.float32, "cpu", max_rows=8, is_captured=False, buckets=(4,))
    assert graphs.buckets == (4, 8)
    for step, n in enumerate((5, 2, 3, 8, 1)):
        x, ids, w = _tokens(cfg, n, seed=step)
        for layer in range(cfg.num_layers):
            write(graphs.message(n, slot=0), x, ids, w)
            got = graphs.run(layer, n, slot=0)
            assert got.shape == (n, cfg.hidden_size)
            torch.testing.assert_close(got, bank(layer, x, ids, w), rtol=1e-5, atol=1e-5)
            out = graphs._buffers[(graphs.bucket(n), 0)][1]
            assert not out[n:].any()               # the padding went to no expert (CPU: zero rows)
    assert graphs.message(3, 0) is graphs.message(4, 0)          # one buffer per (bucket, slot)
    assert graphs.message(3, 1) is not graphs.message(3, 0)
    assert not graphs.can_run(9) and not graphs.can_run(0) and graphs.can_run(8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("held", [None, [1, 2, 5, 6]])
def test_replays_equal_the_eager_bank_on_cuda(held):
    """Captured per (layer, bucket, slot); a replay gives the eager bank's output on the valid rows."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("grouped GEMMs (sync-free experts) need sm90+")
    cfg, bank = _bank(held, "cuda", torch.bfloat16)
    numel, unpack, write = _layout(cfg.hidden_size, cfg.num_experts_per_tok)
    graphs = ExpertGraphs(bank, numel, unpack, torch.bfloat16, "cuda", max_rows=16)
    assert graphs.is_captured
    for step, n in enumerate((5, 7, 3, 16, 5)):
        x, ids, w = _tokens(cfg, n, seed=step, device="cuda", dtype=torch.bfloat16)
        w = w.to(torch.bfloat16).float()          # what the test layout carries
        for layer in range(cfg.num_layers):
            for slot in (0, 1):
                write(graphs.message(n, slot), x, ids, w)
                got = graphs.run(layer, n, slot)
                assert torch.equal(got, bank(layer, x, ids, w)), (step, layer, slot)
    assert graphs.num_captures == cfg.num_layers * 2 * 3   # buckets 4, 8 and 16, two slots


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warm_up_captures_layer_zero_before_any_step():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("grouped GEMMs (sync-free experts) need sm90+")
    cfg, bank = _bank([1, 2, 5, 6], "cuda", torch.bfloat16)
    numel, unpack, write = _layout(cfg.hidden_size, cfg.num_experts_per_tok)
    graphs = ExpertGraphs(bank, numel, unpack, torch.bfloat16, "cuda", max_rows=16)
    graphs.warm_up((1, 8))
    assert sorted(graphs._graphs) == [(0, 1, 0), (0, 8, 0)]
    x, ids, w = _tokens(cfg, 6, seed=9, device="cuda", dtype=torch.bfloat16)
    w = w.to(torch.bfloat16).float()
    write(graphs.message(6, 0), x, ids, w)
    assert torch.equal(graphs.run(0, 6, 0), bank(0, x, ids, w))
    assert graphs.num_captures == 2            # the warmed-up graph was replayed, not captured again
