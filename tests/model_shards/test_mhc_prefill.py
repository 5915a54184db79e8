"""PrefillMHC (model_shards/mhc_prefill.py): mHC's weights and merge of prefill steps, compiled.
On GPUs it is on by default; here it is turned on for CPUs (Inductor's C++ backend) to check
that the compiled functions give the eager step's logits, that they run for steps with a prefill
segment only (decode-only steps stay eager: CUDA graphs capture those), and that the states the
steps leave behind carry on alike."""

from __future__ import annotations

import torch

from factories import RTOL, random_ids, random_model, rel_err
from model_shards.mhc_prefill import PrefillMHC


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
    for got_step, want_step in zip(runs["compiled"][:3], runs["eager"][:3]):
        for got, want in zip(got_step, want_step):
            assert rel_err(got, want) <= RTOL


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
