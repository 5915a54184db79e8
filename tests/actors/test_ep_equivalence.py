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
from factories import RTOL, random_ids, rel_err


@pytest.mark.parametrize("num_shards, placement", [
    (1, dict()),
    (2, dict(shard_resources=[{"node_a": 1}, {"node_b": 1}])),   # one shard per worker node
    (3, dict(placement_strategy="SPREAD")),
    (2, dict(same_node_links=False)),                            # the group carries every message
])
def test_router_and_shards_match_single_process(ray_cluster, ep_ckpt, ep_ref, num_shards, placement):
    runner = launch(ep_ckpt, num_expert_shards=num_shards, transport="collective", **placement)
    try:
        infos = runner.infos
        assert sorted(e for i in infos for e in i.expert_ids) == list(range(7))
        assert [len(i.expert_ids) for i in infos] == {1: [7], 2: [4, 3], 3: [3, 2, 2]}[num_shards]
        # the test's "nodes" share one machine: every shard gets a same-node link unless turned off
        linked = num_shards if placement.get("same_node_links", True) else 0
        assert runner.transports["collective"].num_links == linked
        if "shard_resources" in placement:
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


def test_link_and_group_micro_batches_in_one_step(ray_cluster, ep_ckpt, ep_ref):
    """A link budget that fits one decode micro-batch but not both: in each layer micro-batch 0
    goes over the link, micro-batch 1 over gloo (both sides pick the same way); prefill all gloo."""
    runner = launch(ep_ckpt, num_expert_shards=2, micro_batches=2, transport="collective")
    try:
        t = runner.transports["collective"]
        t.link_budget = t.wire.message_bytes(10)   # 7 + 6 decode rows do not fit together
        t.is_broken = True                         # rebuild with it
        vocab = ep_ref.config.vocab_size
        prompts = [random_ids(2 + i % 3, vocab, 50 + i) for i in range(13)]
        tokens = [torch.tensor([int(random_ids(1, vocab, 90 + i)[0])]) for i in range(13)]
        theirs = [ep_ref.new_state() for _ in prompts]
        want = ep_ref.step(theirs, prompts, all_logits=False), ep_ref.step(theirs, tokens, all_logits=False)
        mine = [runner.new_state() for _ in prompts]
        got = runner.step(mine, prompts)
        assert [r.num_link_messages for r in t.step_reports()] == [0, 0]   # ~19-token prefill micro-batches: too big
        got = got, runner.step(mine, tokens)
        assert t.num_links == 2
        assert [r.num_link_messages for r in t.step_reports()] == [ep_ref.config.num_layers] * 2
        for g_step, w_step in zip(got, want):
            for g, w in zip(g_step, w_step):
                assert rel_err(g, w) <= RTOL
    finally:
        runner.shutdown()
