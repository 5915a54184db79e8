"""ModelConfig: both spellings of config.json, and clear validation errors."""

from __future__ import annotations

import pytest

from factories import tiny_config
from model_shards import ConfigError, ModelConfig
from model_shards.config import CSA, HASH_MOE, HCA, MOE, SLIDING
from model_shards.random_checkpoint import legacy_config_dict


def test_transformers_spelling_round_trips():
    cfg = tiny_config()
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_official_legacy_spelling():
    cfg = tiny_config()
    legacy = legacy_config_dict(cfg)
    assert "layer_types" not in legacy and legacy["compress_ratios"] == [0, 4, 8, 4, 0]
    assert ModelConfig.from_dict(legacy) == cfg


def test_inference_script_short_names():
    cfg = ModelConfig.from_dict({
        "dim": 128, "n_layers": 3, "n_heads": 2, "head_dim": 64, "rope_head_dim": 16, "moe_inter_dim": 32,
        "n_routed_experts": 4, "n_activated_experts": 2, "compress_ratios": [128, 4, 0, 0], "n_hash_layers": 1,
        "window_size": 64, "score_func": "sqrtsoftplus", "route_scale": 2.5, "o_groups": 2, "o_lora_rank": 8,
        "q_lora_rank": 16, "vocab_size": 500, "index_head_dim": 32,
        "rope_factor": 16, "original_seq_len": 65536, "beta_fast": 32, "beta_slow": 1})
    assert cfg.hidden_size == 128 and cfg.num_hidden_layers == 3 and cfg.qk_rope_head_dim == 16
    assert cfg.layer_types == [HCA, CSA, SLIDING] and cfg.mlp_layer_types == [HASH_MOE, MOE, MOE]
    assert cfg.sliding_window == 64 and cfg.routed_scaling_factor == 2.5
    assert cfg.compress_rope.rope_type == "yarn" and cfg.compress_rope.original_max_position_embeddings == 65536


def test_defaults_are_v4_flash_shaped():
    cfg = ModelConfig.from_dict({"num_hidden_layers": 5})
    assert cfg.layer_types == [HCA, HCA, HCA, CSA, HCA]
    assert cfg.mlp_layer_types == [HASH_MOE] * 3 + [MOE] * 2
    assert cfg.compress_rates == {CSA: 4, HCA: 128}


@pytest.mark.parametrize("patch, message", [
    ({"layer_types": ["sliding_attention", "mamba", "sliding_attention", "sliding_attention"]},
     r"unknown layer_types value\(s\) \['mamba'\]"),
    ({"layer_types": ["sliding_attention"]}, "num_hidden_layers is 4 but layer_types has 1 entries"),
    ({"mlp_layer_types": ["moe", "dense", "moe", "moe"]}, r"unknown mlp_layer_types value\(s\) \['dense'\]"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) > n_routed_experts \(7\)"),
    ({"o_groups": 3}, "not divisible by o_groups"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"compress_rates": {CSA: 0, HCA: 8}}, "compress_rates"),
])
def test_validation_errors(patch, message):
    d = tiny_config().to_dict()
    d.update(patch)
    if "qk_rope_head_dim" in patch:
        d.pop("partial_rotary_factor")
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_from_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: invalid JSON"):
        ModelConfig.from_json(str(tmp_path))
