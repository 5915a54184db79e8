"""Factories for tiny model configs and checkpoints used across the test folders."""

from __future__ import annotations

import dataclasses

import torch

from model_shards import DeepseekV4, ModelConfig
from model_shards.config import CSA, HASH_MOE, HCA, MOE, SLIDING, RopeSpec
from model_shards.random_checkpoint import random_tensors, write_checkpoint

YARN = RopeSpec(theta=160000.0, rope_type="yarn", factor=16.0, original_max_position_embeddings=64)


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer V4 config with every layer type; small enough for exact-state tests."""
    cfg = ModelConfig(
        vocab_size=300, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=48, o_groups=2, o_lora_rank=16,
        sliding_window=8, layer_types=[SLIDING, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 8},
        index_n_heads=16, index_head_dim=16, index_topk=3, mlp_layer_types=[HASH_MOE, MOE, MOE, MOE],
        n_routed_experts=7, num_experts_per_tok=2, compress_rope=YARN)
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


def write_random(path: str, cfg: ModelConfig, seed: int = 0, fmt: str = "hf", quant: str = "none",
                 shard_bytes: int = 2 << 30, with_mtp: bool = True) -> str:
    write_checkpoint(str(path), cfg, random_tensors(cfg, seed, with_mtp), fmt, quant, shard_bytes=shard_bytes)
    return str(path)


def random_model(tmp_path, cfg: ModelConfig | None = None, seed: int = 0) -> DeepseekV4:
    path = write_random(tmp_path, cfg or tiny_config(), seed)
    return DeepseekV4.from_pretrained(path)


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def pooled_copies(model: DeepseekV4, states: list) -> list:
    """New pooled states of `model` holding exactly what `states` hold (loaded from their export)."""
    out = []
    for s in states:
        t = model.new_state()
        t.load(s.export())
        out.append(t)
    return out


RTOL = 1e-5  # max |a - b| / max |b|, fp32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
