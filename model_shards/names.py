"""The checkpoint rename table: every supported tensor naming -> the canonical (official) name.

Canonical names are the official release's (`layers.N.attn.wq_a.weight`, per-expert
`layers.N.ffn.experts.E.w1.weight`, `hc_head_fn`, `mtp.J.*`); the model's modules are named so that
their state_dict keys are exactly these. Other spellings:
- transformers modules (`model.layers.N.self_attn.q_a_proj.weight`, `lm_head.weight`, packed
  `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]);
- what transformers 5.23's save_pretrained writes (official leaf names under a `model.` prefix,
  `model.embed_tokens.weight`, `model.hc_head.hc_fn`).
FP8 block scales: `<x>.scale` (canonical) or `<x>.weight_scale_inv` next to `<x>.weight`.
"""

from __future__ import annotations

import re

# (pattern, replacement), applied in order with re.sub; each rule is idempotent on canonical names.
RENAMES: list[tuple[str, str]] = [
    (r"^model\.", ""),
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.kv_norm\.", ".norm."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.position_bias$", ".ape"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.weight_scale_inv$", ".scale"),
]
_COMPILED = [(re.compile(p), r) for p, r in RENAMES]

# Packed expert tensors (transformers spelling): canonical prefix + which per-expert weights they hold.
PACKED_GATE_UP = re.compile(r"^(.*\.ffn\.experts)\.gate_up_proj$")   # [E, 2I, H] = cat(w1, w3)
PACKED_DOWN = re.compile(r"^(.*\.ffn\.experts)\.down_proj$")         # [E, H, I] = w2
EXPERT = re.compile(r"^(?:(mtp\.\d+)|layers\.(\d+))\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
# Tensors that may be present and are not weights of the model.
IGNORED = [re.compile(p) for p in (r"rotary_emb\.", r"inv_freq$")]


def canonical(name: str) -> str:
    for pattern, repl in _COMPILED:
        name = pattern.sub(repl, name)
    return name


# Writing the transformers spelling (random checkpoints in `--format hf`): the inverse of RENAMES
# for canonical names. A test checks canonical(to_hf(n)) == n for every tensor of a model.
_TO_HF: list[tuple[str, str]] = [
    (r"^embed\.", "model.embed_tokens."),
    (r"^head\.", "lm_head."),
    (r"^norm\.", "model.norm."),
    (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"^layers\.", "model.layers."),
    (r"\.attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.attn\.attn_sink$", ".self_attn.sinks"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.shared_experts\.w1\.", ".mlp.shared_experts.gate_proj."),
    (r"\.ffn\.shared_experts\.w2\.", ".mlp.shared_experts.down_proj."),
    (r"\.ffn\.shared_experts\.w3\.", ".mlp.shared_experts.up_proj."),
    (r"\.ffn\.gate\.bias$", ".mlp.gate.e_score_correction_bias"),
    (r"\.ffn\.", ".mlp."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)$", r".ffn_hc.\1"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"(self_attn|compressor|indexer)\.norm\.", r"\1.kv_norm."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.ape$", ".position_bias"),
]
_TO_HF_COMPILED = [(re.compile(p), r) for p, r in _TO_HF]


def to_hf(name: str) -> str:
    """Canonical name -> transformers module spelling (per-expert names are packed by the writer)."""
    if name.startswith("mtp."):
        return name  # transformers does not model MTP; its weights keep the official names
    for pattern, repl in _TO_HF_COMPILED:
        name = pattern.sub(repl, name)
    return name
