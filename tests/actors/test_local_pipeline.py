"""The router's pipeline and the routing split, with in-process banks (no Ray): fast and exact."""

from __future__ import annotations

import pytest
import torch

from actors.placement import check_assignment, owner_table, split_experts
from actors.router import Router
from actors.transport import shard_rows
from actors.transport.local import LocalTransport
from model_shards.checkpoint import CheckpointReader
from model_shards.loading import load_dense, load_experts

from ep_checks import check_decode, check_prefill


def make_router(ckpt, assignment, micro_batches, **transport_options):
    from model_shards import ModelConfig
    cfg = ModelConfig.from_json(ckpt)
    reader = CheckpointReader(ckpt)
    dense = load_dense(cfg, reader, torch.float32, "cpu")
    banks = [load_experts(cfg, reader, ids, torch.float32, "cpu") for ids in assignment]
    transport = LocalTransport(banks, owner_table(assignment, cfg.n_routed_experts), **transport_options)
    return Router(dense, transport, micro_batches)


@pytest.mark.parametrize("assignment", [[[0, 1, 2, 3, 4, 5, 6]], [[0, 1, 2, 3], [4, 5, 6]],
                                        [[0, 1, 2], [3, 4], [5, 6]], [[6, 0, 3], [1, 4], [2, 5]]])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_pipeline_matches_single_process(ep_ckpt, ep_ref, assignment, micro_batches):
    router = make_router(ep_ckpt, assignment, micro_batches)
    check_prefill(router, ep_ref, seed=1)
    check_decode(router, ep_ref, num_steps=3, seed=1)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_graph_segments_match_single_process(ep_ckpt, ep_ref, micro_batches):
    """Decode steps through SegmentGraphs (run uncaptured on CPU: the same fixed-shape segments a
    GPU replays, padded to 2- and 4-row buckets) around the dispatches equal the single process."""
    from model_shards.segment_graphs import SegmentGraphs
    router = make_router(ep_ckpt, [[0, 1, 2], [3, 4], [5, 6]], micro_batches)
    router.graphs = SegmentGraphs(router.dense, max_batch=4, is_captured=False, batch_buckets=(2,))
    check_decode(router, ep_ref, num_steps=6, seed=3)
    assert {key[0] for key in router.graphs._sets} == set(range(micro_batches))   # one set per micro-batch
    assert router.last_timing.num_micro_batches == micro_batches


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_every_token_expert_graphs_match_single_process(ep_ckpt, ep_ref, micro_batches):
    """Every bank gets every token as one packed message in its ExpertGraphs input and computes it
    there (uncaptured on CPU; the fixed-shape path an every-token shard replays on a GPU), with
    2- and 4-row buckets; prefill steps past the largest bucket take the banks directly."""
    router = make_router(ep_ckpt, [[0, 1, 2], [3, 4], [5, 6]], micro_batches, expert_graphs=True, is_captured=False,
                         max_graph_rows=4)
    for g in router.transport.graphs:
        g.buckets = (2, 4)
    check_prefill(router, ep_ref, seed=2)
    check_decode(router, ep_ref, num_steps=4, seed=2)
    assert all(slot < micro_batches for g in router.transport.graphs for _, slot in g._buffers)
    assert {bucket for g in router.transport.graphs for bucket, _ in g._buffers} <= {2, 4}
    assert router.transport.graphs[0]._buffers    # the decode steps went through them


@pytest.mark.parametrize("is_segments", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_decode_regions_in_the_router_match_single_process(ep_ckpt, ep_ref, micro_batches, is_segments):
    """The router's decode steps through DecodeRegions (plain: the compiled form is checked in
    tests/model_shards/test_regions.py), eagerly and inside graph segments: the region MoE work
    (shared expert while the shards compute, moe_end with it) equals the single process."""
    from model_shards.regions import DecodeRegions
    from model_shards.segment_graphs import SegmentGraphs
    router = make_router(ep_ckpt, [[0, 1, 2], [3, 4], [5, 6]], micro_batches)
    router.dense.regions = DecodeRegions(is_compiled=False)
    if is_segments:
        router.graphs = SegmentGraphs(router.dense, max_batch=4, is_captured=False, batch_buckets=(2,))
    calls = []
    attention = router.dense.regions.attention
    router.dense.regions.attention = lambda *a: calls.append(1) or attention(*a)
    check_decode(router, ep_ref, num_steps=5, seed=4)
    assert len(calls) == 5 * micro_batches * ep_ref.config.num_layers     # every decode step, every layer


def test_segment_warm_up_makes_each_micro_batch_its_sets(ep_ckpt):
    from model_shards.segment_graphs import SegmentGraphs
    router = make_router(ep_ckpt, [[0, 1, 2], [3, 4], [5, 6]], 2)
    graphs = SegmentGraphs(router.dense, max_batch=4, is_captured=False, batch_buckets=(2,))
    graphs.warm_up(2, router.config.index_topk + 1)
    pages = router.dense.state_pool.page_size
    wide = tuple((r, -(-(router.config.index_topk + 1) // pages)) for r in router.dense.state_pool.rates)
    narrow = tuple((r, 0) for r in router.dense.state_pool.rates)
    assert sorted(graphs._sets) == sorted((m, 2, w) for m in (0, 1) for w in (narrow, wide))


def test_micro_batches_partition_the_sequences(ep_ckpt, ep_ref):
    router = make_router(ep_ckpt, split_experts(7, 2), micro_batches=2)
    states = [router.new_state() for _ in range(3)]
    router.step(states, [torch.arange(1, 6), torch.arange(1, 3), torch.arange(1, 4)])
    assert router.last_timing.num_micro_batches == 2 and router.last_timing.num_tokens == 10
    assert [s.num_tokens for s in states] == [5, 2, 3]


def test_split_and_assignment_rules():
    assert split_experts(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_experts(7, 1) == [list(range(7))]
    with pytest.raises(ValueError):
        split_experts(7, 8)
    assert check_assignment([[5, 1], [0, 2, 3, 4, 6]], 7) == [[1, 5], [0, 2, 3, 4, 6]]
    for bad in ([[0, 1], [1, 2, 3, 4, 5, 6]], [[0, 1], [2, 3]], [[], list(range(7))], [[0, 7], [1, 2, 3, 4, 5, 6]]):
        with pytest.raises(ValueError):
            check_assignment(bad, 7)
    assert owner_table([[2, 0], [1]], 3) == [0, 1, 0]


def test_shard_rows_sends_each_token_once_to_each_owner():
    owner = torch.tensor([0, 0, 1, 1, 2])
    expert_ids = torch.tensor([[0, 1], [2, 4], [3, 2], [4, 0]])        # [T=4, k=2]
    rows = shard_rows(expert_ids, owner, 3)
    assert [r.tolist() for r in rows] == [[0, 3], [1, 2], [1, 3]]


def _prefilled_twins(router) -> list[list]:
    """Two identical sets of 3 states (prompts of 5, 12, 17 tokens prefilled once, loaded from one
    export into each), for stepping the same inputs two ways and comparing bits."""
    base = [router.new_state() for _ in range(3)]
    router.step(base, [torch.arange(1, n + 1).cuda() for n in (5, 12, 17)])
    twins = []
    for _ in range(2):
        twins.append([router.new_state() for _ in base])
        for s, b in zip(twins[-1], base):
            s.load(b.export())
    return twins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_segments_equal_uncaptured_on_cuda(ep_ckpt):
    """On a GPU the segments are CUDA graphs: from identical states with deterministic kernels a
    replayed step gives the bits of the same segments run uncaptured, micro-batches interleaved."""
    from actors.router import Router
    from actors.transport.local import LocalTransport
    from model_shards import ModelConfig
    from model_shards.segment_graphs import SegmentGraphs
    cfg = ModelConfig.from_json(ep_ckpt)
    reader = CheckpointReader(ep_ckpt)
    dense = load_dense(cfg, reader, torch.bfloat16, "cuda")
    bank = load_experts(cfg, reader, list(range(7)), torch.bfloat16, "cuda")
    router = Router(dense, LocalTransport([bank], [0] * 7), micro_batches=2)
    captured, uncaptured = SegmentGraphs(dense), SegmentGraphs(dense, is_captured=False)
    captured.reserve(16, 64)
    twins = _prefilled_twins(router)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for t in range(8):
            tokens = [torch.tensor([(3 * t + k) % cfg.vocab_size]) for k in range(3)]
            router.graphs = captured
            got = torch.stack(router.step(twins[0], tokens))
            router.graphs = uncaptured
            assert torch.equal(got, torch.stack(router.step(twins[1], tokens))), t
    finally:
        torch.use_deterministic_algorithms(False)
    assert captured.num_captures >= 2          # a set per micro-batch (and per width bucket)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expert_graph_replays_equal_the_eager_banks_on_cuda(ep_ckpt):
    """The every-token stand-in on a GPU: each layer's experts replayed from an ExpertGraphs graph
    (two banks, one holding a subset: fixed-shape routing with padding rows) give the bits of the
    eager banks, decode steps through captured segments, micro-batches interleaved."""
    from model_shards import ModelConfig
    from model_shards.segment_graphs import SegmentGraphs
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("grouped GEMMs (sync-free experts) need sm90+")
    cfg = ModelConfig.from_json(ep_ckpt)
    reader = CheckpointReader(ep_ckpt)
    dense = load_dense(cfg, reader, torch.bfloat16, "cuda")
    assignment = [[0, 1, 2, 3], [4, 5, 6]]
    banks = [load_experts(cfg, reader, ids, torch.bfloat16, "cuda") for ids in assignment]
    owner = owner_table(assignment, cfg.n_routed_experts)
    eager, replayed = LocalTransport(banks, owner), LocalTransport(banks, owner, expert_graphs=True)
    router = Router(dense, eager, micro_batches=2)
    router.graphs = SegmentGraphs(dense)
    router.graphs.reserve(16, 64)
    twins = _prefilled_twins(router)
    for t in range(6):
        tokens = [torch.tensor([(5 * t + k) % cfg.vocab_size]) for k in range(3)]
        router.set_transport(replayed)
        got = torch.stack(router.step(twins[0], tokens))
        router.set_transport(eager)
        assert torch.equal(got, torch.stack(router.step(twins[1], tokens))), t
    assert replayed.graphs[0].num_captures == cfg.num_layers * 2   # micro-batches of 2 and 1 rows: 2 slots
