"""DecodeGraphs' fixed-shape decode step (padded rows, padded page tables, masked window emission,
counters advanced on the host) equals the model's own decode step. On CPU the step runs eagerly
(`is_captured=False`): the same indices and shapes a CUDA graph replays; on a GPU, captured."""

from __future__ import annotations

import pytest
import torch

from factories import pooled_copies, random_ids, random_model, tiny_config
from model_shards import SequenceState
from model_shards.cuda_graph import DecodeGraphs, _page_bucket
from model_shards.state_pool import StatePool


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("graphs"), tiny_config(), seed=11)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_page_buckets():
    assert [_page_bucket(n) for n in (0, 1, 2, 3, 4, 5, 9)] == [0, 1, 2, 4, 4, 8, 16]


def test_fixed_shape_steps_equal_the_eager_decode(model):
    """3 then 2 sequences (padded to 4 and 2 rows) over 20 steps: every CSA (4) and HCA (8) window
    boundary, several 2-entry pages per sequence, more entries than the indexer's top-k (3)."""
    cfg = model.config
    pool = StatePool(cfg, model.dense.dtype, model.dense.device, num_slots=2, page_size=2, num_pages=2)
    model.dense.state_pool = pool
    graphs = DecodeGraphs(model, max_batch=4, is_captured=False, batch_buckets=(2,))
    prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (5, 14, 30)]
    fixed = [model.new_state() for _ in prompts]
    eager = [SequenceState.new(cfg) for _ in prompts]      # standalone: the plain decode path
    model.step(fixed, prompts)
    model.step(eager, prompts)
    steps = [random_ids(20, cfg.vocab_size, seed=100 + k) for k in range(3)]
    for t in range(20):
        live = slice(0, 3 if t < 12 else 2)                  # the third sequence finishes at step 12
        tokens = [s[t: t + 1] for s in steps[live]]
        got = graphs.step(fixed[live], tokens)
        want = model.step(eager[live], tokens, all_logits=False)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-5, t
    assert [s.num_tokens for s in fixed] == [25, 34, 42]
    for f, e in zip(fixed, eager):                          # same counters and tensors afterwards
        got, want = f.export(), e.export()
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].shape == want[name].shape, name
            if want[name].numel():
                assert rel_err(got[name], want[name]) <= 1e-5, name
        for lf, le in zip(f.layers, e.layers):
            assert lf.num_tokens == le.num_tokens
            for cf, ce in ((lf.comp, le.comp), (lf.index, le.index)):
                if ce is not None:
                    assert (cf.num_tail, cf.num_entries) == (ce.num_tail, ce.num_entries)
    # the pool grew on the way (2-entry pages), so only graphs made since its last growth remain;
    # the last step's key: 2 rows, CSA (rate 4) 34 // 4 = 8 entries = 4 pages, HCA (8) 4 -> 2 pages
    assert graphs._generation == pool.generation
    assert (2, ((4, 4), (8, 2))) in graphs._graphs
    for key, store in pool.pages.items():                   # the zero page stays zero
        assert not store[0].any(), key


def test_the_pad_slot_and_scratch_pages_belong_to_no_sequence(model):
    cfg = model.config
    pool = StatePool(cfg, model.dense.dtype, model.dense.device, num_slots=2, page_size=2, num_pages=2)
    model.dense.state_pool = pool
    graphs = DecodeGraphs(model, max_batch=4, is_captured=False)
    states = [model.new_state() for _ in range(3)]
    model.step(states, [random_ids(9, cfg.vocab_size, seed=k) for k in range(3)])
    graphs.step(states, [torch.tensor([k]) for k in range(3)])
    for _ in range(4):                                       # new states never take reserved storage
        states.append(model.new_state())
        model.step([states[-1]], [random_ids(9, cfg.vocab_size, seed=len(states))])
    assert pool.pad_slot_id not in {s.slot_id for s in states}
    for r in pool.rates:
        assert all(pool.scratch_page_id(r) not in s.page_ids[r] for s in states)


def test_bad_steps_are_refused(model):
    graphs = DecodeGraphs(model, max_batch=2, is_captured=False)
    states = [model.new_state() for _ in range(3)]
    with pytest.raises(ValueError, match="one new token"):
        graphs.step(states, [torch.tensor([1])] * 3)                  # more rows than max_batch
    with pytest.raises(ValueError, match="one new token"):
        graphs.step(states[:1], [torch.tensor([1, 2])])               # a prefill
    with pytest.raises(ValueError, match="out of range"):
        graphs.step(states[:1], [torch.tensor([model.config.vocab_size])])
    assert states[0].num_tokens == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_steps_equal_the_eager_decode_on_cuda(tmp_path):
    from model_shards import DeepseekV4
    from factories import write_random
    cfg = tiny_config()
    model = DeepseekV4.from_pretrained(write_random(tmp_path, cfg, seed=3), dtype=torch.bfloat16, device="cuda")
    graphs = DecodeGraphs(model, max_batch=4)
    fixed = [model.new_state() for _ in range(3)]
    eager = [model.new_state() for _ in range(3)]
    prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (5, 14, 30)]
    model.step(fixed, prompts)
    model.step(eager, prompts)
    for t in range(12):
        tokens = [torch.tensor([(7 * t + k) % cfg.vocab_size]) for k in range(3)]
        got = [g.float() for g in graphs.step(fixed, tokens)]
        want = [w.float() for w in model.step(eager, tokens, all_logits=False)]
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 2e-2, t                 # bf16: different reduction orders
    assert graphs.num_captures >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_replay_is_bitwise_the_uncaptured_fixed_step_on_cuda(tmp_path):
    """From identical states (loaded from one export), with deterministic kernels, replaying the
    graph and running the same fixed-shape step eagerly give the same bits, step after step."""
    from model_shards import DeepseekV4
    from factories import write_random
    cfg = tiny_config()
    model = DeepseekV4.from_pretrained(write_random(tmp_path, cfg, seed=4), dtype=torch.bfloat16, device="cuda")
    base = [model.new_state() for _ in range(3)]
    model.step(base, [random_ids(n, cfg.vocab_size, seed=n).cuda() for n in (5, 14, 30)])

    captured, uncaptured = DecodeGraphs(model, max_batch=4), DecodeGraphs(model, max_batch=4, is_captured=False)
    captured.reserve(8, 64)
    a, b = pooled_copies(model, base), pooled_copies(model, base)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for t in range(10):
            tokens = [torch.tensor([(5 * t + k) % cfg.vocab_size]) for k in range(3)]
            got = torch.stack(captured.step(a, tokens))
            want = torch.stack(uncaptured.step(b, tokens))
            assert torch.equal(got, want), t
    finally:
        torch.use_deterministic_algorithms(False)
    assert captured.num_captures >= 1


def test_warm_up_makes_the_common_keys_first(model):
    """1 and 2 rows (their buckets), with no entries and with room for more than the indexer's
    top-k; the steps that follow reuse them (no capture on the way)."""
    cfg = model.config
    model.dense.state_pool = StatePool(cfg, model.dense.dtype, model.dense.device, page_size=2)
    graphs = DecodeGraphs(model, max_batch=8, is_captured=False, batch_buckets=(1, 2, 4))
    graphs.warm_up(cfg.index_topk + 1)                     # 4 entries: 2 pages of 2 per rate
    assert sorted(graphs._graphs) == [(1, ((4, 0), (8, 0))), (1, ((4, 2), (8, 2))),
                                      (2, ((4, 0), (8, 0))), (2, ((4, 2), (8, 2)))]
    states = [model.new_state() for _ in range(2)]
    model.step(states, [random_ids(5, cfg.vocab_size, seed=k) for k in range(2)])
    graphs.step(states, [torch.tensor([1]), torch.tensor([2])])     # 6 tokens: 1 CSA entry -> 1 page (bucket 1)
    assert len(graphs._graphs) == 5 and (2, ((4, 1), (8, 0))) in graphs._graphs
