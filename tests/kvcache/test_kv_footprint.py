"""The analytic bytes per token (footprint.py) are exactly what a commit stores (tensor bytes,
as computed and FP8), and the synthetic state has the exact names, shapes and dtypes of the tiny
model's own export (the 1M-token benchmark relies on it)."""

import pytest
import torch

from kvcache import footprint
from kvcache.resume import prefill
from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, synthetic_state

NUM_TOKENS = 8192


@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_footprint_matches_the_stored_tensor_bytes(dtype, is_fp8):
    lay = SyntheticLayout(dtype=dtype)
    tokens = list(range(NUM_TOKENS))
    with KVCacheService(lay.entry_rates, "fp", is_fp8=is_fp8, rope_dim=16) as svc:
        svc.commit(tokens, {p: synthetic_state(lay, tokens, p) for p in (4096, NUM_TOKENS)})
        records = svc.stack.device.get_many(svc.stack.device.lru_keys())
    spans = [r for r in records if r.kind == "span"]
    checkpoints = [r for r in records if r.kind == "checkpoint"]
    assert len(spans) == 2 and len(checkpoints) == 2 and len(records) == 2 + 2 + 2
    expected = footprint.state_footprint(lay, value_bytes=dtype.itemsize, rope_dim=16, checkpoint_tokens=4096,
                                         is_fp8=is_fp8)
    assert sum(r.num_bytes for r in spans) == expected.entry_bytes_per_token * NUM_TOKENS
    num_tokens_bytes = 8  # the int64 position
    assert all(r.num_bytes == expected.checkpoint_bytes + num_tokens_bytes for r in checkpoints)


def test_baselines_follow_their_definitions():
    assert footprint.full_attention_values_per_token(num_layers=4, num_heads=4, head_dim=64) == 2048
    assert footprint.mla_values_per_token(num_layers=43) == 43 * 576


def test_synthetic_state_has_the_models_exact_layout(tiny_model):
    lay = SyntheticLayout.from_model_config(tiny_model.config)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (700,), generator=torch.Generator().manual_seed(0))
    positions = [1, 3, 4, 5, 127, 128, 129, 300, 512, 700]
    run = prefill(tiny_model, tiny_model.new_state(), tokens, export_positions=positions)
    for position in positions:
        real, fake = run.exports[position], synthetic_state(lay, tokens.tolist(), position)
        assert real.keys() == fake.keys()
        for name, tensor in real.items():
            assert (fake[name].shape, fake[name].dtype) == (tensor.shape, tensor.dtype), (position, name)
