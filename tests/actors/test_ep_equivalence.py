"""Router + N expert-shard actors == the single-process model (fp32, <= 1e-5 relative), for
prefill and batched decode, micro_batches 1 and 2, both transports; shards across nodes."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from actors.launch import launch
from actors.messages import ShardError

from ep_checks import check_decode, check_prefill


@pytest.mark.parametrize("num_shards, placement", [
    (1, dict()),
    (2, dict(shard_resources=[{"node_a": 1}, {"node_b": 1}])),   # one shard per worker node
    (3, dict(placement_strategy="SPREAD")),
])
def test_router_and_shards_match_single_process(ray_cluster, ep_ckpt, ep_ref, num_shards, placement):
    runner = launch(ep_ckpt, num_expert_shards=num_shards, transport="collective", **placement)
    try:
        infos = runner.infos
        assert sorted(e for i in infos for e in i.expert_ids) == list(range(7))
        assert [len(i.expert_ids) for i in infos] == {1: [7], 2: [4, 3], 3: [3, 2, 2]}[num_shards]
        if num_shards == 2:
            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            assert "node_a" in nodes[infos[0].node_id] and "node_b" in nodes[infos[1].node_id]
        for transport in ("collective", "ray"):
            runner.use_transport(transport)
            for micro_batches in (1, 2):
                runner.micro_batches = micro_batches
                check_prefill(runner, ep_ref, seed=1)
                check_decode(runner, ep_ref, num_steps=3, seed=1)
        assert runner.is_healthy()
    finally:
        runner.shutdown()
    assert not runner.is_healthy()
    with pytest.raises(RuntimeError, match="shut down"):
        runner.forward(torch.zeros(1, 2, dtype=torch.int64))


def test_custom_assignment_and_errors(ray_cluster, ep_ckpt, ep_ref):
    with pytest.raises(ValueError, match="expert 3"):
        launch(ep_ckpt, num_expert_shards=2, expert_assignment=[[0, 1, 2, 3], [3, 4, 5, 6]])
    with pytest.raises(ValueError, match="transport"):
        launch(ep_ckpt, num_expert_shards=2, transport="carrier-pigeon")
    runner = launch(ep_ckpt, num_expert_shards=2, micro_batches=2, expert_assignment=[[6, 1, 3], [0, 2, 4, 5]])
    try:
        assert [i.expert_ids for i in runner.infos] == [(1, 3, 6), (0, 2, 4, 5)]
        check_prefill(runner, ep_ref, seed=1)
        with pytest.raises(ValueError, match="token id"):   # refused before any shard is involved
            runner.step([runner.new_state()], [torch.tensor([1, 10_000])])
        check_decode(runner, ep_ref, num_steps=3, seed=1)    # the group is still in step
        dense = runner.router.dense                          # the router raises mid-step (layer 2): the
        calls = []                                           # shards are told to stop, the group is rebuilt

        def failing_shared_expert(work):
            calls.append(work.layer_id)
            if work.layer_id == 2:
                raise KeyboardInterrupt("router interrupted")
            return type(dense).shared_expert(dense, work)

        dense.shared_expert = failing_shared_expert
        with pytest.raises(KeyboardInterrupt):
            runner.forward(torch.arange(1, 9).unsqueeze(0))
        del dense.shared_expert
        assert 2 in calls
        check_decode(runner, ep_ref, num_steps=3, seed=1)
        for transport in ("collective", "ray"):              # a shard's compute raises: fast, clear error
            runner.use_transport(transport)
            ray.get(runner.shards[1].debug_fail_computes.remote(1))
            t0 = time.monotonic()
            with pytest.raises(ShardError, match="injected fault") as info:
                runner.forward(torch.arange(1, 9).unsqueeze(0))
            assert time.monotonic() - t0 < 5 and info.value.shard_ids == (1,)
            check_prefill(runner, ep_ref, seed=1)             # and the next request is fine
    finally:
        runner.shutdown()
