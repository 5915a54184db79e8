"""The shard's step loop (actors/shard_step.run_plan) on a real gloo group, in the layout an
every-token NCCL shard gets: one exact-size message per micro-batch, header included, received
straight into an ExpertGraphs input when the micro-batch fits a bucket (graphs uncaptured on
CPU: the same fixed-shape computation). gloo takes exact-size messages too, so only NCCL's own
semantics are left out; those run on GPUs (benchmarks/ep_gpu.py)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from actors.messages import StepPlan
from actors.shard_step import run_plan
from actors.transport.wire import Wire
from model_shards.expert_graphs import ExpertGraphs
from model_shards.moe import ExpertBank
from model_shards.random_checkpoint import PRESETS


def _bank():
    cfg = dataclasses.replace(PRESETS["tiny"], n_routed_experts=8, num_experts_per_tok=3)
    bank = ExpertBank(cfg, [1, 2, 5, 6])
    gen = torch.Generator().manual_seed(2)
    for p in bank.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return cfg, bank


def _tokens(cfg, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:cfg.num_experts_per_tok] for _ in range(n)])
    return x, ids, torch.rand(n, cfg.num_experts_per_tok, generator=gen)


def _start(plan, bank, shard_wire, graphs):
    result: dict = {}

    def run():
        try:
            result["report"] = run_plan(plan, 0, bank, shard_wire, None, graphs, lambda: None)
        except BaseException as e:  # noqa: BLE001 - surfaced by the test
            result["error"] = e
    th = threading.Thread(target=run)
    th.start()
    return th, result


@pytest.mark.parametrize("with_graphs", [False, True])
def test_every_token_plan_in_the_nccl_layout(groups, with_graphs):
    cfg, bank = _bank()
    args = (torch.device("cpu"), torch.float32, cfg.hidden_size, cfg.num_experts_per_tok)
    router = Wire(groups[0].pg, "nccl", *args)
    shard = Wire(groups[1].pg, "nccl", *args, is_every_token=True)
    graphs = ExpertGraphs(bank, shard.message_numel, shard.unpack_message, torch.float32, "cpu", max_rows=4,
                          is_captured=False) if with_graphs else None
    plan = StepPlan(7, 1, (0, 1), (3, 6))              # 6 rows: past the largest bucket, eager
    th, result = _start(plan, bank, shard, graphs)
    for layer in plan.layer_ids:
        for m, n in enumerate(plan.micro_batch_tokens):
            x, ids, w = _tokens(cfg, n, seed=10 * layer + m)
            sends = router.send_dispatch(1, router.pack(x, ids, w), None)     # one message: rows None
            assert len(sends) == 1
            work, out = router.post_combine(1, n)
            work.wait()
            for send, _ in sends:
                send.wait()
            torch.testing.assert_close(out, bank(layer, x, ids, w), rtol=1e-5, atol=1e-5)
    th.join(10)
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert (report.step_id, report.num_rows, report.is_aborted) == (7, 18, False)
    assert report.num_graph_replays == (2 if with_graphs else 0)       # the 3-row micro-batch, both layers
    if with_graphs:
        assert sorted(graphs._buffers) == [(4, 0)]                     # (bucket, slot) of micro-batch 0


def test_abort_to_an_every_token_shard_is_a_full_size_message(groups):
    cfg, bank = _bank()
    args = (torch.device("cpu"), torch.float32, cfg.hidden_size, cfg.num_experts_per_tok)
    router = Wire(groups[0].pg, "nccl", *args)
    shard = Wire(groups[1].pg, "nccl", *args, is_every_token=True)
    graphs = ExpertGraphs(bank, shard.message_numel, shard.unpack_message, torch.float32, "cpu", max_rows=4,
                          is_captured=False)
    plan = StepPlan(8, 1, (0, 1, 2), (3,))
    th, result = _start(plan, bank, shard, graphs)
    x, ids, w = _tokens(cfg, 3, seed=1)
    sends = router.send_dispatch(1, router.pack(x, ids, w), None)
    work, _ = router.post_combine(1, 3)
    work.wait()
    sends += router.send_abort(1, every_token_rows=3)              # instead of layer 1's message
    for send, _ in sends:
        send.wait()
    th.join(10)
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert report.is_aborted and report.num_rows == 3 and report.num_graph_replays == 1
