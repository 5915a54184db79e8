"""Random DeepSeek-V4 checkpoints: deterministic by seed, in either naming, optionally FP8 / FP4.

    python -m model_shards.random_checkpoint OUT --preset tiny|small|medium --format hf|official \
        --quant none|fp8 --seed N [--shard-mb MB] [--dtype float32|bfloat16]

`--format official`: DeepSeek's names (`layers.N.attn.wq_a.weight`, per-expert `ffn.experts.E.w*`) and
the legacy config spelling (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`).
`--format hf`: transformers' module names with packed experts, and its config spelling.
`--quant fp8` (official format only, as released): FP8 e4m3 attention / shared-expert weights with
128x128 ue8m0 block scales and FP4 e2m1 routed experts with one ue8m0 scale per 32 inputs.
The random weights make a system to serve, not a language model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
from safetensors.torch import save_file

from . import quant
from .config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig, RopeSpec
from .dense import DenseModel
from .mtp import MTPLayer
from .names import to_hf

_YARN = RopeSpec(theta=160000.0, rope_type="yarn", factor=16.0, original_max_position_embeddings=65536)

PRESETS: dict[str, ModelConfig] = {
    # fast enough to serve on 2 CPU cores; every layer type, real m=4 / m'=128 and window 128
    "tiny": ModelConfig(
        vocab_size=320, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, head_dim=64, qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=32,
        sliding_window=128, layer_types=[SLIDING, CSA, HCA, CSA], index_n_heads=8, index_head_dim=32,
        index_topk=16, mlp_layer_types=[HASH_MOE, MOE, MOE, MOE], n_routed_experts=8, num_experts_per_tok=2,
        compress_rope=_YARN, max_position_embeddings=1 << 20),
    # benchmarks on CPU
    "small": ModelConfig(
        vocab_size=4096, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=8, head_dim=128, qk_rope_head_dim=32, q_lora_rank=256, o_groups=4, o_lora_rank=128,
        sliding_window=128, layer_types=[SLIDING, CSA, HCA, CSA, HCA, CSA, HCA, CSA], index_n_heads=16,
        index_head_dim=64, index_topk=64, mlp_layer_types=[HASH_MOE, HASH_MOE] + [MOE] * 6,
        n_routed_experts=32, num_experts_per_tok=4, compress_rope=_YARN),
    # GPU benchmarks (bf16): >= 8 layers, hidden >= 2048, >= 64 experts
    "medium": ModelConfig(
        vocab_size=32768, hidden_size=2048, moe_intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=16, head_dim=512, qk_rope_head_dim=64, q_lora_rank=512, o_groups=4, o_lora_rank=512,
        sliding_window=128, layer_types=[HCA, HCA, CSA, HCA, CSA, HCA, CSA, HCA], index_n_heads=32,
        index_head_dim=128, index_topk=512, mlp_layer_types=[HASH_MOE, HASH_MOE] + [MOE] * 6,
        n_routed_experts=64, num_experts_per_tok=6, compress_rope=_YARN),
}

# 2-D weights stored FP8 in `--quant fp8` (the compressors' and gates' projections stay high precision)
_FP8_SUFFIXES = (".wq_a.weight", ".wq_b.weight", ".wkv.weight", ".wo_a.weight", ".wo_b.weight",
                 ".shared_experts.w1.weight", ".shared_experts.w2.weight", ".shared_experts.w3.weight")


def random_tensors(cfg: ModelConfig, seed: int, with_mtp: bool = True) -> dict[str, torch.Tensor]:
    """Canonical name -> float32 tensor (tid2eid int64); identical for identical (cfg, seed)."""
    with torch.device("meta"):
        shapes = dict(DenseModel(cfg).state_dict())
        if with_mtp:
            shapes.update({f"mtp.0.{k.removeprefix('block.')}": v for k, v in MTPLayer(cfg).state_dict().items()
                           if not k.startswith("experts.")})
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    expert_prefixes = [f"layers.{i}" for i in range(cfg.num_layers)] + (["mtp.0"] if with_mtp else [])
    for p in expert_prefixes:
        for e in range(cfg.n_routed_experts):
            shapes[f"{p}.ffn.experts.{e}.w1.weight"] = torch.empty(I, D, device="meta")
            shapes[f"{p}.ffn.experts.{e}.w3.weight"] = torch.empty(I, D, device="meta")
            shapes[f"{p}.ffn.experts.{e}.w2.weight"] = torch.empty(D, I, device="meta")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name].shape)
        if name.endswith("tid2eid"):  # k distinct experts per token id
            noise = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen)
            out[name] = noise.argsort(dim=-1)[:, : cfg.num_experts_per_tok].contiguous()
        elif name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(("_scale",)):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(("_base", ".bias", ".ape", ".attn_sink")):
            out[name] = 0.5 * torch.randn(shape, generator=gen)
        elif name.endswith("_fn"):
            out[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        elif name == "embed.weight":
            out[name] = torch.randn(shape, generator=gen)
        else:  # linear weights: unit-variance outputs for unit-variance inputs
            out[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return out


def legacy_config_dict(cfg: ModelConfig) -> dict:
    """The official release's spelling of the config."""
    d = cfg.to_dict()
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor"):
        d.pop(key)
    ratio = {SLIDING: 0, CSA: cfg.csa_rate, HCA: cfg.hca_rate}
    d["compress_ratios"] = [ratio[t] for t in cfg.layer_types] + [0]  # the trailing entry is the MTP layer's
    d["num_hash_layers"] = sum(t == HASH_MOE for t in cfg.mlp_layer_types)
    d["qk_rope_head_dim"] = cfg.qk_rope_head_dim
    d["compress_rate_csa"], d["compress_rate_hca"] = cfg.csa_rate, cfg.hca_rate
    if cfg.compress_rope.rope_type == "yarn":
        r = cfg.compress_rope
        d["rope_scaling"] = {"type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                             "original_max_position_embeddings": r.original_max_position_embeddings}
    return d


def write_checkpoint(out_dir: str, cfg: ModelConfig, tensors: dict[str, torch.Tensor], fmt: str = "hf",
                     quant_mode: str = "none", dtype: torch.dtype = torch.float32, shard_bytes: int = 2 << 30,
                     scale_fmt: str = "ue8m0") -> None:
    """Write canonical `tensors` as a checkpoint directory (config.json + safetensors [+ index])."""
    if fmt not in ("hf", "official"):
        raise ValueError(f"format must be hf or official, got {fmt!r}")
    if quant_mode not in ("none", "fp8"):
        raise ValueError(f"quant must be none or fp8, got {quant_mode!r}")
    if quant_mode == "fp8" and fmt != "official":
        raise ValueError("--quant fp8 writes the official format (use --format official)")
    os.makedirs(out_dir, exist_ok=True)
    stored: dict[str, torch.Tensor] = {}
    if fmt == "official":
        for name, t in tensors.items():
            is_expert = ".ffn.experts." in name
            if quant_mode == "fp8" and is_expert:
                stored[name], stored[name[:-7] + ".scale"] = quant.quantize_fp4(t.float())
            elif quant_mode == "fp8" and name.endswith(_FP8_SUFFIXES):
                stored[name], stored[name[:-7] + ".scale"] = quant.quantize_fp8_block(t.float(), scale_fmt=scale_fmt)
            else:
                stored[name] = t.to(dtype) if t.is_floating_point() else t
        config = legacy_config_dict(cfg)
        if quant_mode == "fp8":
            config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": scale_fmt,
                                              "weight_block_size": [128, 128], "expert_dtype": "fp4"}
    else:
        packed: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, t in tensors.items():
            if ".ffn.experts." in name and not name.startswith("mtp."):
                prefix, rest = name.split(".ffn.experts.")
                e, part = rest.split(".")[:2]
                packed.setdefault(prefix, {}).setdefault(int(e), {})[part] = t
                continue
            stored[to_hf(name)] = t.to(dtype) if t.is_floating_point() else t
        for prefix, experts in packed.items():
            ids = sorted(experts)
            hf_prefix = to_hf(prefix + ".ffn.experts.0.w1.weight").split(".experts.")[0] + ".experts"
            stored[hf_prefix + ".gate_up_proj"] = torch.stack(
                [torch.cat([experts[e]["w1"], experts[e]["w3"]]) for e in ids]).to(dtype)
            stored[hf_prefix + ".down_proj"] = torch.stack([experts[e]["w2"] for e in ids]).to(dtype)
        config = cfg.to_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _save_sharded(out_dir, stored, shard_bytes)


def _save_sharded(out_dir: str, stored: dict[str, torch.Tensor], shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(stored):
        t = stored[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in stored.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def generate(out_dir: str, preset: str = "tiny", fmt: str = "hf", quant_mode: str = "none", seed: int = 0,
             dtype: torch.dtype = torch.float32, shard_bytes: int = 2 << 30, with_mtp: bool = True,
             **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    cfg.validate()
    write_checkpoint(out_dir, cfg, random_tensors(cfg, seed, with_mtp), fmt, quant_mode, dtype, shard_bytes)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_shards.random_checkpoint",
                                description="Write a random-weight DeepSeek-V4 checkpoint.")
    p.add_argument("out")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--format", default="hf", choices=["hf", "official"])
    p.add_argument("--quant", default="none", choices=["none", "fp8"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shard-mb", type=float, default=2048.0, help="max size of one safetensors file")
    args = p.parse_args(argv)
    try:
        generate(args.out, args.preset, args.format, args.quant, args.seed, getattr(torch, args.dtype),
                 int(args.shard_mb * (1 << 20)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.preset} checkpoint ({args.format}, quant={args.quant}, seed={args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
