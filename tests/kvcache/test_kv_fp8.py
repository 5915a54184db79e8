"""FP8 storage is off by default; when on, its effect on the tiny model's logits after a restore
and 32 decode steps stays within a sane bound (benchmarks/kvcache.py reports the numbers for the
tiny and small presets), and only the non-rope dims of window latents and compressed entries
change."""

import torch

from kv_model_helpers import random_tokens, relative_error, service_for
from kvcache import fp8
from kvcache.resume import decode, import_state, prefill
from kvcache.service import KVCacheConfig

NUM_PROMPT_TOKENS, NUM_DECODE_STEPS = 603, 32
MAX_RELATIVE_ERROR = 0.15  # measured ~0.05 (max over steps of max|dlogits| / max|logits|)


def test_fp8_is_off_by_default(tiny_model):
    assert KVCacheConfig().is_fp8 is False
    prompt = random_tokens(300, tiny_model.config.vocab_size, seed=11)
    state = tiny_model.new_state()
    run = prefill(tiny_model, state, prompt, export_positions=[300])
    with service_for(tiny_model) as svc:
        assert not svc.config.is_fp8 and svc.storage_fingerprint == tiny_model.fingerprint
        svc.commit(prompt.tolist(), run.exports)
        records = svc.stack.device.get_many(svc.stack.device.lru_keys())
        assert not any(fp8.is_quantized(r.tensors) for r in records)
        assert all(t.dtype in (torch.float32, torch.int64, torch.int32) for r in records for t in r.tensors.values())


def test_fp8_effect_on_logits_is_bounded(tiny_model):
    cfg = tiny_model.config
    prompt = random_tokens(NUM_PROMPT_TOKENS, cfg.vocab_size, seed=1)
    steps = random_tokens(NUM_DECODE_STEPS, cfg.vocab_size, seed=2)
    state = tiny_model.new_state()
    run = prefill(tiny_model, state, prompt, export_positions=[NUM_PROMPT_TOKENS])
    expected = decode(tiny_model, state, steps)
    with service_for(tiny_model, is_fp8=True) as svc:
        assert svc.config.rope_dim == cfg.qk_rope_head_dim == 16
        svc.commit(prompt.tolist(), run.exports)
        restored = svc.lookup(prompt.tolist()).state_tensors
    exact = run.exports[NUM_PROMPT_TOKENS]
    for name, tensor in exact.items():
        if name.endswith((".window", ".comp.entries")) and tensor.numel():
            assert torch.equal(restored[name][..., -16:], tensor[..., -16:]), name  # rope dims as computed
            assert not torch.equal(restored[name], tensor), name
        else:
            assert torch.equal(restored[name], tensor), name  # indexer keys, tails, overlaps as computed
    logits = decode(tiny_model, import_state(tiny_model, restored), steps)
    errors = [relative_error(logits[i], expected[i]) for i in range(NUM_DECODE_STEPS)]
    assert 1e-4 < max(errors) <= MAX_RELATIVE_ERROR
