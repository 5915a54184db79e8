"""Parity with transformers 5.23.0's DeepseekV4ForCausalLM (the numerical reference, a test extra).

The reference is built from a config, given non-trivial random weights (it zero-initialises biases,
sinks and position biases), saved with its own `save_pretrained` and loaded by our loader. Three
configs together cover the three layer types, hash_moe and moe, hc_mult 4, o_groups > 1, a real
m'=128 with sequences over 256 tokens, and lengths from 1 crossing every compression boundary.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

from model_shards import DeepseekV4  # noqa: E402

YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
BASE = dict(vocab_size=300, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
            q_lora_rank=48, num_experts_per_tok=2, n_routed_experts=6, o_lora_rank=16, index_n_heads=16,
            index_head_dim=16, partial_rotary_factor=0.25, rope_parameters=YARN, hc_mult=4,
            max_position_embeddings=4096)
CSA, HCA, SW = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"

CONFIGS = {
    # every layer type, small rates so that short sequences cross many boundaries
    "mixed": (dict(num_hidden_layers=3, layer_types=[SW, CSA, HCA], mlp_layer_types=["hash_moe", "moe", "moe"],
                   compress_rates={CSA: 4, HCA: 8}, sliding_window=8, o_groups=2, index_topk=3),
              [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 70]),
    # the real m'=128 and window 128, sequences over 256 tokens
    "hca128": (dict(num_hidden_layers=3, layer_types=[HCA, CSA, HCA], mlp_layer_types=["hash_moe", "hash_moe", "moe"],
                    compress_rates={CSA: 4, HCA: 128}, sliding_window=128, o_groups=4, index_topk=24),
               [1, 127, 128, 129, 255, 256, 257, 300]),
    # CSA-heavy, top-k much smaller than the entries, o_groups 4
    "csa": (dict(num_hidden_layers=2, layer_types=[CSA, CSA], mlp_layer_types=["moe", "moe"],
                 compress_rates={CSA: 4, HCA: 128}, sliding_window=4, o_groups=4, index_topk=2),
            [1, 3, 4, 5, 8, 11, 12, 13, 40]),
}


def make_reference(overrides: dict, seed: int) -> DeepseekV4ForCausalLM:
    cfg = DeepseekV4Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("sinks", "position_bias", "base", "e_score_correction_bias")):
                p.normal_(0, 0.5)
            elif name.endswith(("norm.weight", "layernorm.weight", "scale")):
                p.add_(0.1 * torch.randn_like(p))
            elif "experts" in name or name.endswith("fn"):
                p.normal_(0, 0.2)
        for layer in model.model.layers:
            if hasattr(layer.mlp.gate, "tid2eid"):
                table = torch.rand(cfg.vocab_size, cfg.n_routed_experts).argsort(-1)[:, : cfg.num_experts_per_tok]
                layer.mlp.gate.tid2eid.copy_(table)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    overrides, lengths = CONFIGS[name]
    ref = make_reference(overrides, seed=len(name))
    ref.save_pretrained(tmp_path)
    ours = DeepseekV4.from_pretrained(str(tmp_path), load_mtp=False)
    ids = torch.randint(0, 300, (1, max(lengths)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_full = ref(ids).logits[0]
        for n in lengths:
            ref_n = ref(ids[:, :n]).logits[0]
            # The reference breaks top-k ties arbitrarily, so its logits at a position may depend on
            # the sequence length. The config is only a valid oracle where they do not:
            assert torch.allclose(ref_n, ref_full[:n], atol=1e-5, rtol=0), f"reference inconsistent at length {n}"
            ours_n = ours(ids[:, :n])[0]
            err = (ours_n - ref_n).abs().max().item()
            assert err <= 1e-4 * ref_n.abs().max().item(), f"{name} length {n}: max |Δlogits| {err}"


def test_incremental_matches_transformers_decode(tmp_path):
    overrides, _ = CONFIGS["mixed"]
    ref = make_reference(overrides, seed=7)
    ref.save_pretrained(tmp_path)
    ours = DeepseekV4.from_pretrained(str(tmp_path), load_mtp=False)
    ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ref(ids[:, :20], use_cache=True)
        cache, ref_steps = out.past_key_values, [out.logits[0]]
        for t in range(20, 50):
            out = ref(ids[:, t: t + 1], past_key_values=cache, use_cache=True)
            ref_steps.append(out.logits[0])
    state = ours.new_state()
    mine = [ours(ids[:, :20], state=state)[0]] + [ours(ids[:, t: t + 1], state=state)[0] for t in range(20, 50)]
    ref_all, mine_all = torch.cat(ref_steps), torch.cat(mine)
    assert (ref_all - mine_all).abs().max() <= 1e-4 * ref_all.abs().max()
