"""model_shards/prefill_compiled.py: mHC's weights and merge of prefill steps (PrefillMHC) and the
attention of large prefill query blocks (PrefillAttention), compiled. On GPUs they are on by
default; here they are turned on for CPUs (Inductor's C++ backend) to check that the compiled
functions give the eager step's logits, that they run for steps with a prefill segment only
(decode-only steps stay eager: CUDA graphs capture those), that the states the steps leave
behind carry on alike, and that warming up compiles what later prefills use."""

from __future__ import annotations

import torch

from factories import RTOL, random_ids, random_model, rel_err
from model_shards.attention import Attention
from model_shards.prefill_compiled import PrefillMHC


def _prefill_then_decode(models: dict, seed: int) -> dict:
    """Per model: (logits of a 150- and a 20-token prompt prefilled in one step, all rows; the
    logits of one decode step after it). Same prompts and tokens for every model."""
    vocab = next(iter(models.values())).config.vocab_size
    prompts = [random_ids(150, vocab, seed=seed), random_ids(20, vocab, seed=seed + 1)]
    runs = {}
    with torch.no_grad():
        for name, model in models.items():
            states = [model.new_state() for _ in prompts]
            prefill = model.step(states, prompts, all_logits=True)
            decode = model.step(states, [random_ids(1, vocab, seed=seed + 2), random_ids(1, vocab, seed=seed + 3)])
            runs[name] = (prefill, decode)
    return runs


def _assert_same_logits(got_steps, want_steps) -> None:
    for got_step, want_step in zip(got_steps, want_steps):
        for got, want in zip(got_step, want_step):
            assert rel_err(got, want) <= RTOL


def test_compiled_prefill_mhc_gives_the_eager_steps_logits(tmp_path):
    eager = random_model(tmp_path / "a")
    compiled = random_model(tmp_path / "b")
    compiled.dense.prefill_mhc = mhc = PrefillMHC(device_types=("cpu",), min_tokens=32)
    vocab = eager.config.vocab_size
    prompts = [random_ids(70, vocab, seed=1), random_ids(9, vocab, seed=2)]
    with torch.no_grad():
        runs = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            states = [model.new_state() for _ in prompts]
            prefill = model.step(states, prompts, all_logits=True)
            calls_after_prefill = mhc.num_calls
            decode = model.step(states, [random_ids(1, vocab, seed=3 + i) for i in range(len(states))])
            more = model.step(states, [random_ids(40, vocab, seed=5), random_ids(1, vocab, seed=6)])  # mixed
            runs[name] = (prefill, decode, more, calls_after_prefill, mhc.num_calls)
    num_layers = eager.config.num_layers
    *_, after_prefill, after_all = runs["compiled"]
    assert after_prefill == 4 * num_layers   # weights + merge, attention and MoE, every layer
    assert after_all == 2 * 4 * num_layers   # the decode-only step stayed eager, the mixed one did not
    assert mhc._weights.is_compiled and mhc._merge.is_compiled   # (no eager fallback)
    _assert_same_logits(runs["compiled"][:3], runs["eager"][:3])


def test_warm_up_compiles_once_for_every_size_and_layer(tmp_path):
    """`warm_up` (the engines call it on GPUs) compiles both functions; prefills of other sizes
    and every layer's calls then reuse them (no new graphs)."""
    from torch._dynamo.utils import counters
    model = random_model(tmp_path)
    model.dense.prefill_mhc = mhc = PrefillMHC(device_types=("cpu",), min_tokens=32)
    graphs_before = counters["stats"]["unique_graphs"]
    mhc.warm_up(model.dense)
    assert mhc.num_calls == 2 and counters["stats"]["unique_graphs"] == graphs_before + 2
    with torch.no_grad():
        model.step([model.new_state()], [random_ids(100, model.config.vocab_size, seed=1)])
        model.step([model.new_state(), model.new_state()], [random_ids(333, model.config.vocab_size, seed=2),
                                                            random_ids(5, model.config.vocab_size, seed=3)])
    assert mhc.num_calls == 2 + 2 * 4 * model.config.num_layers
    assert counters["stats"]["unique_graphs"] == graphs_before + 2
    cuda_only = PrefillMHC(min_tokens=32)
    cuda_only.warm_up(model.dense)
    assert cuda_only.num_calls == 0   # (CUDA only by default: nothing to compile for this CPU model)


def test_small_steps_and_other_devices_stay_eager(tmp_path):
    model = random_model(tmp_path)
    batch = type("Batch", (), {"prefill_segments": [0]})()
    h = torch.zeros(31, model.config.hc_mult, model.config.hidden_size)
    assert not PrefillMHC(device_types=("cpu",), min_tokens=32).can_run(h, batch)
    assert PrefillMHC(device_types=("cpu",), min_tokens=31).can_run(h, batch)
    assert not PrefillMHC(min_tokens=1).can_run(h, batch)   # CUDA only by default
    assert not PrefillMHC(device_types=("cpu",), min_tokens=1, is_enabled=False).can_run(h, batch)
    batch.prefill_segments = []
    assert not PrefillMHC(device_types=("cpu",), min_tokens=1).can_run(h, batch)


def test_compiled_prefill_attention_gives_the_eager_steps_logits(tmp_path, monkeypatch):
    """Query blocks of >= min_tokens queries go through the compiled `attend` (windows alone,
    and windows with compressed entries, chosen by the indexer or not); smaller blocks, and the
    eager model, through `attend` itself."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(Attention, "QUERY_BLOCK", 32)
    eager = random_model(tmp_path / "a")
    compiled = random_model(tmp_path / "b")
    attention = compiled.dense.prefill_attention
    attention.device_types, attention.min_tokens = ("cpu",), 32
    attention.warm_up(compiled.dense)
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert attention.num_calls == 2
    runs = _prefill_then_decode({"eager": eager, "compiled": compiled}, seed=7)
    # 150 tokens: 4 full blocks of 32 (and one of 22) in each of the 4 layers; the 20-token prompt: none
    assert attention.num_calls == 2 + 4 * eager.config.num_layers
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up   # the warmed-up graphs served them
    assert eager.dense.prefill_attention.num_calls == 0
    _assert_same_logits(runs["compiled"], runs["eager"])


def test_compiled_indexer_mask_gives_the_eager_steps_logits(tmp_path, monkeypatch):
    """Query blocks of >= min_tokens queries in CSA layers choose their compressed entries through
    the compiled `index_mask` (warmed up first: no new graphs after); smaller blocks and the eager
    model through `index_mask` itself. Same logits, prefill and the decode after it."""
    from torch._dynamo.utils import counters
    from model_shards.config import CSA
    monkeypatch.setattr(Attention, "QUERY_BLOCK", 32)
    eager = random_model(tmp_path / "a")
    compiled = random_model(tmp_path / "b")
    indexer = compiled.dense.prefill_indexer
    indexer.device_types, indexer.min_tokens = ("cpu",), 32
    indexer.warm_up(compiled.dense)
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert indexer.num_calls == 1
    runs = _prefill_then_decode({"eager": eager, "compiled": compiled}, seed=11)
    # 150 tokens: 4 full blocks of 32 in each CSA layer (37 entries > index_topk 3); 20 tokens: none
    num_csa = eager.config.layer_types.count(CSA)
    assert indexer.num_calls == 1 + 4 * num_csa
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up
    assert indexer._mask.is_compiled and eager.dense.prefill_indexer.num_calls == 0
    _assert_same_logits(runs["compiled"], runs["eager"])
