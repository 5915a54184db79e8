"""Build DenseModel / ExpertBank / MTP modules from a checkpoint, all-or-nothing.

Owns: matching checkpoint tensors to module parameters. Modules are built on the meta device and
receive each tensor once (dequantized straight to the target dtype), so peak memory stays near
the size of the loaded weights. Any missing, unknown or mis-shaped tensor raises CheckpointError
before a module is returned: there is never a partly loaded model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .checkpoint import CheckpointError, CheckpointReader
from .config import ModelConfig
from .dense import DenseModel
from .moe import ExpertBank
from .mtp import MTPLayer
from .names import EXPERT
from .ops import rope_inv_freq

_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


def _assign(module: nn.Module, reader: CheckpointReader, names: dict[str, str], dtype: torch.dtype,
            device: torch.device | str) -> None:
    """names: module state_dict key -> canonical checkpoint name. Reads, checks shapes, assigns."""
    expected = module.state_dict(keep_vars=True)
    loaded: dict[str, torch.Tensor] = {}
    for key, param in expected.items():
        ckpt_name = names[key]
        t = reader.read(ckpt_name, dtype if param.dtype.is_floating_point else param.dtype)
        if tuple(t.shape) != tuple(param.shape):
            ref = reader.refs[ckpt_name]
            raise CheckpointError(f"{ref.file}: tensor {ref.key!r} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(param.shape)}")
        loaded[key] = t.to(device=device, dtype=param.dtype if not param.dtype.is_floating_point else dtype)
        if len(loaded) % 16 == 0:
            reader.release()
    reader.release()
    module.load_state_dict(loaded, strict=True, assign=True)


def load_dense(cfg: ModelConfig, reader: CheckpointReader, dtype: torch.dtype, device) -> DenseModel:
    with torch.device("meta"):
        dense = DenseModel(cfg)
    _assign(dense, reader, {k: k for k in dense.state_dict()}, dtype, device)
    dense.main_inv_freq = rope_inv_freq(cfg.main_rope, cfg.qk_rope_head_dim).to(device)
    dense.compress_inv_freq = rope_inv_freq(cfg.compress_rope, cfg.qk_rope_head_dim).to(device)
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense


def load_experts(cfg: ModelConfig, reader: CheckpointReader, expert_ids: list[int], dtype: torch.dtype,
                 device, prefix: str = "layers.{layer}") -> ExpertBank:
    """Routed experts `expert_ids` of every layer; reads only those experts' tensors."""
    bank = ExpertBank(cfg, expert_ids, dtype=dtype, device=device, allocate=False)
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    shapes = {"w1": (I, D), "w3": (I, D), "w2": (D, I)}
    for layer in range(cfg.num_layers):
        w13 = torch.empty(len(bank.expert_ids), 2 * I, D, dtype=dtype, device=device)
        w2t = torch.empty(len(bank.expert_ids), I, D, dtype=dtype, device=device)
        for j, e in enumerate(bank.expert_ids):
            for part in ("w1", "w3", "w2"):
                name = f"{prefix.format(layer=layer)}.ffn.experts.{e}.{part}.weight"
                t = reader.read(name, dtype)
                if tuple(t.shape) != shapes[part]:
                    ref = reader.refs[name]
                    raise CheckpointError(f"{ref.file}: tensor {ref.key!r} has shape {tuple(t.shape)}, "
                                          f"expected {shapes[part]}")
                if part == "w2":
                    w2t[j] = t.T
                else:
                    w13[j, (0 if part == "w1" else I):(I if part == "w1" else 2 * I)] = t
                del t
        bank.w13[layer] = nn.Parameter(w13, requires_grad=False)
        bank.w2t[layer] = nn.Parameter(w2t, requires_grad=False)
        reader.release()
    return bank


def load_mtp(cfg: ModelConfig, reader: CheckpointReader, dtype, device) -> list[MTPLayer]:
    layers = []
    ids = sorted({int(m.group(1)) for n in reader.names() if (m := _MTP.match(n))})
    for j in ids:
        with torch.device("meta"):
            mtp = MTPLayer(cfg)
        names = {}
        for key in mtp.state_dict():
            if key.startswith("experts."):
                continue
            sub = key[len("block."):] if key.startswith("block.") else key
            names[key] = f"mtp.{j}.{sub}"
        experts = mtp.experts
        mtp.experts = nn.Module()  # placeholder so _assign sees only the dense weights
        _assign(mtp, reader, names, dtype, device)
        mtp.experts = load_experts(mtp.cfg, reader, experts.expert_ids, dtype, device, prefix=f"mtp.{j}")
        mtp.main_inv_freq = rope_inv_freq(cfg.main_rope, cfg.qk_rope_head_dim).to(device)
        layers.append(mtp)
    return layers


def check_known(cfg: ModelConfig, reader: CheckpointReader, dense_names: set[str], with_mtp: bool) -> None:
    """Every tensor of the checkpoint must be one the model knows (else the checkpoint is not V4)."""
    for name in reader.names():
        if name in dense_names or name.endswith(".scale") and name[:-6] + ".weight" in reader.refs:
            continue
        m = EXPERT.match(name)
        if m and (m.group(1) or int(m.group(2)) < cfg.num_layers) and int(m.group(3)) < cfg.n_routed_experts:
            continue
        if _MTP.match(name):
            continue
        ref = reader.refs[name]
        raise CheckpointError(f"{ref.file}: unexpected tensor {ref.key!r} (not part of this model's config)")
