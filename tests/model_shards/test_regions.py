"""DecodeRegions (a pooled decode step's layers as a few compiled functions) equal the eager
modules: the same logits, states and counters, plain (uncompiled) and compiled, in the model's own
decode steps and in DecodeGraphs' fixed-shape steps; a failing compile falls back, loudly, once."""

from __future__ import annotations

import warnings

import pytest
import torch

from factories import pooled_copies, random_ids, random_model, rel_err, tiny_config
from model_shards import SequenceState
from model_shards.cuda_graph import DecodeGraphs
from model_shards.fused import Compiled
from model_shards.regions import DecodeRegions
from model_shards.state_pool import StatePool


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("regions"), tiny_config(), seed=21)


def assert_same_states(got: list[SequenceState], want: list[SequenceState], tol: float) -> None:
    for f, e in zip(got, want):
        a, b = f.export(), e.export()
        assert a.keys() == b.keys()
        for name in b:
            assert a[name].shape == b[name].shape, name
            if b[name].numel():
                assert rel_err(a[name], b[name]) <= tol, name
        for lf, le in zip(f.layers, e.layers):
            assert lf.num_tokens == le.num_tokens
            for cf, ce in ((lf.comp, le.comp), (lf.index, le.index)):
                if ce is not None:
                    assert (cf.num_tail, cf.num_entries) == (ce.num_tail, ce.num_entries)


@pytest.mark.parametrize("is_compiled", [False, True])
def test_region_decode_equals_the_eager_modules(model, is_compiled):
    """Three sequences of different lengths, 18 decode steps (every CSA / HCA boundary, more entries
    than the indexer's top-k), a sequence leaving at step 10: logits and states match."""
    cfg = model.config
    model.dense.state_pool = StatePool(cfg, model.dense.dtype, model.dense.device, page_size=2)
    prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (6, 13, 29)]
    steps = [random_ids(18, cfg.vocab_size, seed=50 + k) for k in range(3)]
    eager = [model.new_state() for _ in prompts]
    model.step(eager, prompts)
    for t in range(18):
        live = slice(0, 3 if t < 10 else 2)
        model.step(eager[live], [s[t: t + 1] for s in steps[live]], all_logits=False)
    want_logits = []
    regional = [model.new_state() for _ in prompts]
    model.step(regional, prompts)
    model.dense.regions = DecodeRegions(is_compiled=is_compiled)
    try:
        for t in range(18):
            live = slice(0, 3 if t < 10 else 2)
            tokens = [s[t: t + 1] for s in steps[live]]
            got = model.step(regional[live], tokens, all_logits=False)
            want_logits.append(got)
    finally:
        model.dense.regions = DecodeRegions(is_enabled=False)
    # replay the eager run to compare logits step by step
    replay = [model.new_state() for _ in prompts]
    model.step(replay, prompts)
    for t in range(18):
        live = slice(0, 3 if t < 10 else 2)
        want = model.step(replay[live], [s[t: t + 1] for s in steps[live]], all_logits=False)
        for g, w in zip(want_logits[t], want):
            assert rel_err(g, w) <= 1e-5, t
    assert_same_states(regional, eager, 1e-5)
    if is_compiled:
        assert all(getattr(model.dense.regions, n).is_compiled is not False for n in ("attn_in",))


def test_regions_in_fixed_shape_steps_equal_the_eager_decode(model):
    """DecodeGraphs' fixed-shape steps (padding rows, masked window emission: every row pools)
    with compiled regions, against standalone states on the plain decode path."""
    cfg = model.config
    pool = StatePool(cfg, model.dense.dtype, model.dense.device, num_slots=2, page_size=2, num_pages=2)
    model.dense.state_pool = pool
    model.dense.regions = DecodeRegions()
    try:
        graphs = DecodeGraphs(model, max_batch=4, is_captured=False, batch_buckets=(2,))
        prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (5, 14, 30)]
        fixed = [model.new_state() for _ in prompts]
        eager = [SequenceState.new(cfg) for _ in prompts]
        model.step(fixed, prompts)
        model.step(eager, prompts)
        steps = [random_ids(16, cfg.vocab_size, seed=200 + k) for k in range(3)]
        for t in range(16):
            live = slice(0, 3 if t < 9 else 2)
            tokens = [s[t: t + 1] for s in steps[live]]
            got = graphs.step(fixed[live], tokens)
            want = model.step(eager[live], tokens, all_logits=False)
            for g, w in zip(got, want):
                assert rel_err(g, w) <= 1e-5, t
        assert_same_states(fixed, eager, 1e-5)
    finally:
        model.dense.regions = DecodeRegions(is_enabled=False)


def test_only_decode_only_pooled_steps_take_the_regions(model):
    cfg = model.config
    regions = DecodeRegions(is_compiled=False)
    model.dense.state_pool = None
    pooled = [model.new_state() for _ in range(2)]
    model.step(pooled, [random_ids(5, cfg.vocab_size, seed=k) for k in range(2)])
    _, decode = model.dense.begin_step(pooled, [torch.tensor([1]), torch.tensor([2])])
    _, mixed = model.dense.begin_step(pooled, [torch.tensor([1]), torch.tensor([2, 3])])
    _, alone = model.dense.begin_step([SequenceState.new(cfg)], [torch.tensor([1])])
    assert regions.can_run(decode)
    assert not regions.can_run(mixed)            # a prefill in the step: the eager modules
    assert not regions.can_run(alone)            # a state outside the pool: no DecodeMeta
    assert not DecodeRegions(is_enabled=False).can_run(decode)


class CountingRegions(DecodeRegions):
    """Plain regions that count which region functions run."""

    NAMES = ("attn_in", "moe_in", "moe_out")

    def __init__(self):
        super().__init__(is_compiled=False)
        self.calls = dict.fromkeys(self.NAMES + ("attn_out_moe_in", "moe_out_attn_in"), 0)
        self.kinds: set[tuple] = set()
        for name in self.NAMES:
            setattr(self, name, self._counted(name, getattr(self, name)))

    def _counted(self, name, fn):
        def call(*args):
            self.calls[name] += 1
            return fn(*args)
        return call

    def merged(self, fn, kind):
        self.kinds.add((fn.__name__, *kind))
        return self._counted(fn.__name__, super().merged(fn, kind))


def test_a_decode_step_runs_three_regions_per_layer_and_hands_outputs_ahead(model):
    """moe_out(i) + attn_in(i+1) and attn_out(i) + moe_in(i) run merged: per step attn_in once (layer
    0), moe_out once (the last layer), no moe_in of its own, and nothing left over in the batch."""
    cfg = model.config
    model.dense.state_pool = StatePool(cfg, model.dense.dtype, model.dense.device, page_size=2)
    states = [model.new_state() for _ in range(2)]
    model.step(states, [random_ids(n, cfg.vocab_size, seed=n) for n in (5, 9)])
    regions = CountingRegions()
    model.dense.regions = regions
    try:
        h, batch = model.dense.begin_step(states, [torch.tensor([1]), torch.tensor([2])])
        h = model.layers_step(h, batch)
        model.dense.finish_step(h, batch)
    finally:
        model.dense.regions = DecodeRegions(is_enabled=False)
    L = cfg.num_layers
    assert regions.calls == {"attn_in": 1, "attn_out_moe_in": L, "moe_in": 0, "moe_out": 1, "moe_out_attn_in": L - 1}
    assert batch.ahead == {}
    # one compiled unit per layer kind: (attention type, hash gate) and the next layer's attention type
    assert regions.kinds == {("attn_out_moe_in", t, m == "hash_moe") for t, m in zip(cfg.layer_types, cfg.mlp_layer_types)} \
        | {("moe_out_attn_in", t) for t in cfg.layer_types[1:]}


def test_outputs_handed_ahead_are_used_only_for_their_own_layer_and_h(model):
    """A caller that changes h between the calls (or skips ahead) gets the regions computed for
    what it passed: the same math as the separate regions."""
    cfg = model.config
    model.dense.state_pool = StatePool(cfg, model.dense.dtype, model.dense.device, page_size=2)
    prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (5, 9)]
    results = []
    for is_copying in (False, True):
        states = [model.new_state() for _ in range(2)]
        model.step(states, prompts)
        regions = CountingRegions()
        model.dense.regions = regions
        try:
            dense = model.dense
            h, batch = dense.begin_step(states, [torch.tensor([1]), torch.tensor([2])])
            for i in range(cfg.num_layers):
                h = dense.attention_sublayer(i, h.clone() if is_copying else h, batch)
                work = dense.moe_begin(i, h.clone() if is_copying else h, batch)
                h = dense.moe_end(work, model.experts(i, work.x, work.expert_ids, work.weights))
            results.append(dense.finish_step(h, batch))
        finally:
            model.dense.regions = DecodeRegions(is_enabled=False)
    assert regions.calls["attn_in"] == cfg.num_layers and regions.calls["moe_in"] == cfg.num_layers
    assert torch.equal(results[0], results[1])


def test_layer_args_are_read_once_and_follow_a_replaced_weight(model):
    """The regions read each layer's weights from its modules once and reuse them while every one
    is still the module's own; a new Parameter assigned to a module is used from the next step on
    (the decode then equals the eager modules with that weight), and the original comes back; so
    is a replaced submodule."""
    cfg = model.config
    model.dense.state_pool = StatePool(cfg, model.dense.dtype, model.dense.device, page_size=2)
    prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (5, 9)]
    tokens = [torch.tensor([3]), torch.tensor([4])]
    wo_b = model.dense.layers[1].attn.wo_b
    original = wo_b.weight
    regions = DecodeRegions(is_compiled=False)

    def decode(is_regions: bool) -> torch.Tensor:
        states = [model.new_state() for _ in prompts]
        model.step(states, prompts)
        model.dense.regions = regions if is_regions else DecodeRegions(is_enabled=False)
        try:
            return torch.stack(model.step(states, tokens, all_logits=False))
        finally:
            model.dense.regions = DecodeRegions(is_enabled=False)

    decode(True)
    cached = dict(regions._layer_args)
    assert sorted(cached) == list(range(cfg.num_layers))
    decode(True)
    assert all(regions._layer_args[i] is cached[i] for i in cached)       # reused, not rebuilt
    try:
        wo_b.weight = torch.nn.Parameter(original.detach() * 2, requires_grad=False)
        got, want = decode(True), decode(False)
        assert rel_err(got, want) <= 1e-5
        assert regions._layer_args[1] is not cached[1] and regions._layer_args[1].attn_out[2] is wo_b.weight
        assert all(regions._layer_args[i] is cached[i] for i in cached if i != 1)
    finally:
        wo_b.weight = original
    assert rel_err(decode(True), decode(False)) <= 1e-5
    assert regions._layer_args[1].attn_out[2] is original
    attn = model.dense.layers[2].attn                  # a whole submodule replaced
    before, module = regions._layer_args[2], attn.wo_b
    try:
        attn.wo_b = torch.nn.Linear(module.in_features, module.out_features, bias=False)
        attn.wo_b.weight.data.copy_(module.weight.detach() * 3)
        got, want = decode(True), decode(False)
        assert rel_err(got, want) <= 1e-5
        assert regions._layer_args[2] is not before and regions._layer_args[2].attn_out[2] is attn.wo_b.weight
    finally:
        attn.wo_b = module


def _needs_the_host(x: torch.Tensor) -> torch.Tensor:
    if x.sum().item() > 0:                       # data-dependent branch: fullgraph compile fails
        return x + 1
    return x - 1


def test_a_region_that_cannot_compile_runs_eagerly_and_says_so_once():
    fn = Compiled(_needs_the_host)
    x = torch.ones(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(fn(x), x + 1)
        assert torch.equal(fn(-x), -x - 1)
    assert not fn.is_compiled
    assert len([w for w in caught if "running it eagerly" in str(w.message)]) == 1


def test_bad_arguments_raise_and_keep_the_region_compiled():
    fn = Compiled(lambda a, b: a @ b)
    assert torch.equal(fn(torch.eye(2), torch.ones(2, 2)), torch.ones(2, 2))
    with pytest.raises(RuntimeError):
        fn(torch.ones(2, 3), torch.ones(2, 3))   # a shape error is the caller's, not the compiler's
    assert fn.is_compiled


def _scaled(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    return x * k


def test_each_compiled_function_has_its_own_dynamo_cache():
    from torch._dynamo.utils import counters
    first, second = Compiled(_scaled), Compiled(_scaled)
    x = torch.arange(4.0)
    before = counters["stats"]["unique_graphs"]
    assert torch.equal(first(x), x * 2)
    assert torch.equal(second(x), x * 2)   # same function, same shapes: compiled again, into its own cache
    assert counters["stats"]["unique_graphs"] - before == 2
    assert torch.equal(first(x), x * 2) and counters["stats"]["unique_graphs"] - before == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_region_steps_on_cuda(tmp_path):
    """Graphs captured with compiled regions (Triton kernels inside the graph): a replay is
    bitwise the same fixed-shape step run uncaptured, and against an fp32 reference it is no
    less accurate than the eager bf16 modules (Inductor keeps fp32 inside its fused kernels)."""
    from model_shards import DeepseekV4
    from factories import write_random
    cfg = tiny_config()
    path = write_random(tmp_path, cfg, seed=5)
    model = DeepseekV4.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    ref_model = DeepseekV4.from_pretrained(path, dtype=torch.float32, device="cuda")
    prompts = [random_ids(n, cfg.vocab_size, seed=n).cuda() for n in (5, 14, 30)]
    reference = [ref_model.new_state() for _ in prompts]
    ref_model.step(reference, prompts)
    base = [model.new_state() for _ in prompts]
    model.step(base, prompts)

    eager, captured_states, uncaptured_states = (pooled_copies(model, base) for _ in range(3))
    model.dense.regions = DecodeRegions()
    try:
        captured = DecodeGraphs(model, max_batch=4)
        captured.reserve(8, 64)
        uncaptured = DecodeGraphs(model, max_batch=4, is_captured=False)
        torch.use_deterministic_algorithms(True, warn_only=True)
        worst_regions = worst_eager = 0.0
        for t in range(12):
            tokens = [torch.tensor([(5 * t + k) % cfg.vocab_size]) for k in range(3)]
            got = torch.stack(captured.step(captured_states, tokens)).float()
            same = torch.stack(uncaptured.step(uncaptured_states, tokens)).float()
            assert torch.equal(got, same), t
            model.dense.regions.is_enabled = False
            plain = torch.stack(model.step(eager, [x.cuda() for x in tokens], all_logits=False)).float()
            model.dense.regions.is_enabled = True
            want = torch.stack(ref_model.step(reference, [x.cuda() for x in tokens], all_logits=False))
            worst_regions, worst_eager = max(worst_regions, rel_err(got, want)), max(worst_eager, rel_err(plain, want))
        assert worst_regions <= 1.5 * worst_eager + 1e-3, (worst_regions, worst_eager)
        assert captured.num_captures >= 1
        assert model.dense.regions.attn_in.is_compiled        # compiled, not fallen back
    finally:
        torch.use_deterministic_algorithms(False)
        model.dense.regions = DecodeRegions(is_enabled=False)


def test_the_one_row_sinkhorn_equals_the_plain_loop():
    """ops.sinkhorn_rows (what GPUs compile) against ops.sinkhorn_torch: only summation order differs."""
    from model_shards.ops import sinkhorn_rows, sinkhorn_torch
    comb = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 1e-3
    got, want = sinkhorn_rows(comb, 20, 1e-6), sinkhorn_torch(comb, 20, 1e-6)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-6
    assert torch.allclose(got.sum(-2), torch.ones(5, 3, 4), atol=1e-5)   # columns normalised last


def test_mhc_collapse_and_merge_agree_in_both_forms():
    """CPU decode-sized inputs (and compiled regions) take the unrolled multiply-add form of mHC's
    collapse and merge, larger ones the batched matmul: the same values to fp32 rounding."""
    from model_shards.mhc import hc_merge, hc_weights
    gen = torch.Generator().manual_seed(7)
    T, hc, D = 80, 4, 64                                  # 80 rows: bmm; any 64 of them: elementwise
    h, out = torch.randn(T, hc, D, generator=gen), torch.randn(T, D, generator=gen)
    fn, base, scale = torch.randn(24, hc * D, generator=gen) / 16, torch.randn(24, generator=gen), torch.ones(3)
    whole = hc_weights(h, fn, base, scale, hc, 20, 1e-6, 1e-6)
    part = hc_weights(h[:64], fn, base, scale, hc, 20, 1e-6, 1e-6)
    for a, b in zip(part, whole):
        assert rel_err(a, b[:64]) <= 1e-6
    post, comb = whole[1], whole[2]
    assert rel_err(hc_merge(out[:64], h[:64], post[:64], comb[:64]), hc_merge(out, h, post, comb)[:64]) <= 1e-6
