"""ModelConfig: the DeepSeek-V4 architecture hyper-parameters, read from a checkpoint's config.json.

Owns: parsing and validation of config dicts. Both spellings load:
- the one transformers writes (`layer_types`, `mlp_layer_types`, `compress_rates`, nested
  `rope_parameters` {main, compress}, `partial_rotary_factor`), and
- the official release's legacy / inference-script spellings (`compress_ratios` per layer,
  `num_hash_layers`, `qk_rope_head_dim`, `compress_rate_csa` / `_hca`, `rope_scaling`, and the
  short names of DeepSeek's `inference/model.py` such as `dim`, `n_layers`, `window_size`).
Every alias lives in `_ALIASES`; unknown keys are ignored (configs carry many unrelated fields).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")

# Legacy per-layer compression ratios (official `compress_ratios`) -> layer type.
_RATIO_TO_TYPE = {0: SLIDING, 1: SLIDING, 4: CSA, 128: HCA}

# alias -> canonical field name (the official inference script's short names and V3-style names).
_ALIASES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "moe_inter_dim": "moe_intermediate_size",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
    "n_hash_layers": "num_hash_layers",
    "rope_head_dim": "qk_rope_head_dim",
    "n_mtp_layers": "num_nextn_predict_layers",
    "index_n_heads": "index_n_heads",
}


class ConfigError(ValueError):
    """A config.json that cannot describe a DeepSeek-V4 model."""


@dataclass(frozen=True)
class RopeSpec:
    """One rotary embedding: `theta`, and YaRN parameters when `rope_type == "yarn"`."""

    theta: float
    rope_type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # V4 does not scale cos/sin by YaRN's mscale


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=lambda: {CSA: 4, HCA: 128})
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    mlp_layer_types: list[str] = field(default_factory=list)
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    main_rope: RopeSpec = field(default_factory=lambda: RopeSpec(theta=10000.0))
    compress_rope: RopeSpec = field(default_factory=lambda: RopeSpec(theta=160000.0))
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    # The checkpoint's quantization_config, if any (e.g. {"quant_method": "fp8", "fmt": "e4m3",
    # "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}). Informational: the loader reads
    # dtypes from the tensors themselves.
    quantization_config: dict[str, Any] | None = None

    # ---- derived ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def csa_rate(self) -> int:
        return self.compress_rates[CSA]

    @property
    def hca_rate(self) -> int:
        return self.compress_rates[HCA]

    def compress_rate(self, layer_id: int) -> int:
        """Tokens per compressed entry of layer `layer_id`; 0 for sliding-only layers."""
        layer_type = self.layer_types[layer_id]
        return 0 if layer_type == SLIDING else self.compress_rates[layer_type]

    @property
    def moe_layer_ids(self) -> list[int]:
        return list(range(self.num_hidden_layers))  # every V4 layer is an MoE layer

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        d = {_ALIASES.get(k, k): v for k, v in raw.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: d[k] for k in names if k in d and k not in ("main_rope", "compress_rope")}
        n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        kwargs["num_hidden_layers"] = n

        head_dim = int(d.get("head_dim", cls.head_dim))
        if "qk_rope_head_dim" in d:
            kwargs["qk_rope_head_dim"] = int(d["qk_rope_head_dim"])
        elif d.get("partial_rotary_factor") is not None:
            kwargs["qk_rope_head_dim"] = int(head_dim * float(d["partial_rotary_factor"]))

        rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
        if d.get("compress_rate_csa") is not None:
            rates[CSA] = int(d["compress_rate_csa"])
        if d.get("compress_rate_hca") is not None:
            rates[HCA] = int(d["compress_rate_hca"])
        kwargs["compress_rates"] = rates

        layer_types = d.get("layer_types")
        if layer_types is None and d.get("compress_ratios") is not None:
            ratios = list(d["compress_ratios"])[:n]  # official lists may carry an MTP entry
            bad = [r for r in ratios if r not in _RATIO_TO_TYPE and r not in (rates[CSA], rates[HCA])]
            if bad:
                raise ConfigError(f"compress_ratios: unsupported ratio(s) {bad}; expected 0, {rates[CSA]} or {rates[HCA]}")
            by_rate = {0: SLIDING, 1: SLIDING, rates[CSA]: CSA, rates[HCA]: HCA}
            layer_types = [by_rate[r] for r in ratios]
        if layer_types is None:  # V4-Pro default schedule: 2 HCA then CSA / HCA interleaved
            layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        kwargs["layer_types"] = list(layer_types)[:n] if len(layer_types) > n else list(layer_types)

        mlp_types = d.get("mlp_layer_types")
        if mlp_types is None:
            num_hash = int(d.get("num_hash_layers", 3))
            mlp_types = [HASH_MOE] * min(n, num_hash) + [MOE] * max(0, n - num_hash)
        kwargs["mlp_layer_types"] = list(mlp_types)[:n] if len(mlp_types) > n else list(mlp_types)

        kwargs["main_rope"], kwargs["compress_rope"] = _parse_ropes(d)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = int(kwargs["eos_token_id"][0])
        for key in ("bos_token_id", "eos_token_id"):
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = getattr(cls, key)
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(str(e)) from e
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The transformers spelling, loadable by both this class and transformers 5.23."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        main, comp = d.pop("main_rope"), d.pop("compress_rope")
        d.pop("qk_rope_head_dim")
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        d["rope_theta"] = main.theta
        d["compress_rope_theta"] = comp.theta
        compress = {"rope_type": comp.rope_type, "rope_theta": comp.theta,
                    "partial_rotary_factor": d["partial_rotary_factor"]}
        if comp.rope_type == "yarn":
            compress.update(factor=comp.factor, original_max_position_embeddings=comp.original_max_position_embeddings,
                            beta_fast=comp.beta_fast, beta_slow=comp.beta_slow, attention_factor=comp.attention_factor)
        d["rope_parameters"] = {
            "main": {"rope_type": "default", "rope_theta": main.theta, "partial_rotary_factor": d["partial_rotary_factor"]},
            "compress": compress,
        }
        d["model_type"] = "deepseek_v4"
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["num_key_value_heads"] = 1
        d["norm_topk_prob"] = True
        d["hidden_act"] = "silu"
        return d

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

        for name in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                     "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                     "n_routed_experts", "num_experts_per_tok", "hc_mult", "hc_sinkhorn_iters"):
            positive(name)
        n = self.num_hidden_layers
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if len(types) != n:
                raise ConfigError(f"num_hidden_layers is {n} but {name} has {len(types)} entries")
            bad = sorted({t for t in types if t not in allowed})
            if bad:
                raise ConfigError(f"unknown {name} value(s) {bad}; allowed: {list(allowed)}")
        for key in (CSA, HCA):
            rate = self.compress_rates.get(key)
            if not isinstance(rate, int) or rate <= 0:
                raise ConfigError(f"compress_rates[{key!r}] must be a positive integer, got {rate!r}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(self.head_dim, self.index_head_dim):
            raise ConfigError(
                f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even, positive and <= head_dim "
                f"({self.head_dim}) and index_head_dim ({self.index_head_dim})")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"num_attention_heads*head_dim ({self.num_attention_heads * self.head_dim}) "
                              f"is not divisible by o_groups ({self.o_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) > n_routed_experts ({self.n_routed_experts})")
        if self.n_shared_experts != 1:
            raise ConfigError(f"n_shared_experts must be 1 for DeepSeek-V4, got {self.n_shared_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func {self.scoring_func!r} not in {list(SCORING_FUNCS)}")
        for rope in (self.main_rope, self.compress_rope):
            if rope.rope_type not in ("default", "yarn"):
                raise ConfigError(f"unsupported rope type {rope.rope_type!r} (default or yarn)")
            if rope.rope_type == "yarn" and (rope.factor <= 0 or rope.original_max_position_embeddings <= 0):
                raise ConfigError("yarn rope needs factor > 0 and original_max_position_embeddings > 0")
        if not 0 <= self.bos_token_id < self.vocab_size or not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError("bos_token_id / eos_token_id must lie inside the vocabulary")


def _parse_ropes(d: dict[str, Any]) -> tuple[RopeSpec, RopeSpec]:
    main_theta = float(d.get("rope_theta", 10000.0))
    comp_theta = float(d.get("compress_rope_theta", 160000.0))
    rp = d.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main_theta = float(rp["main"].get("rope_theta", main_theta))
        return RopeSpec(theta=main_theta), _rope_from(rp["compress"], float(rp["compress"].get("rope_theta", comp_theta)))
    # Flat spelling: rope_parameters or rope_scaling hold the compress-layer YaRN parameters;
    # the official inference config spells them at top level (rope_factor, original_seq_len, ...).
    flat = dict(d.get("rope_scaling") or {})
    flat.update({k: v for k, v in rp.items() if k not in ("main", "compress")})
    if "rope_factor" in d and "factor" not in flat:
        flat.update(type="yarn", factor=d["rope_factor"],
                    original_max_position_embeddings=d.get("original_seq_len", 0),
                    beta_fast=d.get("beta_fast", 32), beta_slow=d.get("beta_slow", 1))
    return RopeSpec(theta=main_theta), _rope_from(flat, comp_theta)


def _rope_from(p: dict[str, Any], theta: float) -> RopeSpec:
    rope_type = p.get("rope_type", p.get("type", "default")) or "default"
    if rope_type != "yarn":
        return RopeSpec(theta=theta, rope_type=str(rope_type))
    return RopeSpec(
        theta=theta, rope_type="yarn", factor=float(p.get("factor", 1.0)),
        original_max_position_embeddings=int(p.get("original_max_position_embeddings", 0)),
        beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
        attention_factor=float(p["attention_factor"]) if p.get("attention_factor") is not None else 1.0,
    )
