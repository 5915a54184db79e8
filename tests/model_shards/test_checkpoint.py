"""Checkpoint loading: both namings, sharding, FP8/FP4, subset-of-experts reads, bad checkpoints."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from factories import random_ids, tiny_config, write_random
from model_shards import DeepseekV4
from model_shards.checkpoint import CheckpointError, CheckpointReader
from model_shards.config import ConfigError
from model_shards.loading import load_experts
from model_shards.names import canonical, to_hf
from model_shards.random_checkpoint import random_tensors, write_checkpoint


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


def logits_of(path, ids):
    return DeepseekV4.from_pretrained(path)(ids.unsqueeze(0))[0]


def test_hf_and_official_namings_give_identical_logits(tmp_path, cfg):
    ids = random_ids(40, cfg.vocab_size)
    hf = logits_of(write_random(tmp_path / "hf", cfg, fmt="hf"), ids)
    official = logits_of(write_random(tmp_path / "off", cfg, fmt="official"), ids)
    sharded = logits_of(write_random(tmp_path / "sh", cfg, fmt="official", shard_bytes=100_000), ids)
    assert len([f for f in os.listdir(tmp_path / "sh") if f.endswith(".safetensors")]) > 3
    assert os.path.exists(tmp_path / "sh" / "model.safetensors.index.json")
    assert torch.equal(hf, official) and torch.equal(hf, sharded)


def test_fp8_fp4_checkpoint_equals_hf_checkpoint_of_dequantized_weights(tmp_path):
    cfg = tiny_config(hidden_size=64, moe_intermediate_size=64)
    quant_dir = write_random(tmp_path / "q", cfg, fmt="official", quant="fp8")
    reader = CheckpointReader(quant_dir)
    raw = {n: reader.read_raw(n) for n in reader.names()}
    assert raw["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert raw["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert raw["layers.1.ffn.experts.3.w2.weight"].dtype == torch.int8       # FP4, two per byte
    assert raw["layers.1.ffn.experts.3.w2.weight"].shape == (64, 32)
    dequantized = {n: reader.read(n, torch.float32) for n in reader.names() if not n.endswith(".scale")}
    write_checkpoint(str(tmp_path / "deq"), cfg, dequantized, "hf")
    ids = random_ids(50, cfg.vocab_size)
    a, b = logits_of(quant_dir, ids), logits_of(str(tmp_path / "deq"), ids)
    assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_rename_table_round_trips_every_tensor(cfg):
    names = random_tensors(cfg, 0).keys()
    for n in names:
        assert canonical(to_hf(n)) == n
        assert canonical(n) == n


def test_transformers_packed_expert_naming(tmp_path, cfg):
    path = write_random(tmp_path, cfg, fmt="hf")
    reader = CheckpointReader(path)
    assert "layers.2.ffn.experts.6.w3.weight" in reader.refs  # expanded from packed gate_up_proj
    assert reader.refs["layers.2.ffn.experts.6.w3.weight"].key == "model.layers.2.mlp.experts.gate_up_proj"
    assert reader.shape("layers.2.ffn.experts.6.w3.weight") == (cfg.moe_intermediate_size, cfg.hidden_size)


def _corrupt_tensor_bytes(path: str, file_key: str, row: int | None = None) -> None:
    """Overwrite a tensor's bytes (or one leading-dim row) inside a .safetensors file with NaNs."""
    with open(path, "r+b") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        start, end = header[file_key]["data_offsets"]
        if row is not None:
            row_bytes = (end - start) // header[file_key]["shape"][0]
            start, end = start + row * row_bytes, start + (row + 1) * row_bytes
        f.seek(8 + header_len + start)
        f.write(b"\xff" * (end - start))  # 0xffffffff is a float32 NaN


@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_loading_a_subset_of_experts_never_reads_the_others(tmp_path, cfg, fmt):
    path = write_random(tmp_path, cfg, fmt=fmt)
    file = os.path.join(path, "model.safetensors")
    for layer in range(cfg.num_layers):
        if fmt == "official":
            for part in ("w1", "w2", "w3"):
                _corrupt_tensor_bytes(file, f"layers.{layer}.ffn.experts.5.{part}.weight")
        else:
            for packed in ("gate_up_proj", "down_proj"):
                _corrupt_tensor_bytes(file, f"model.layers.{layer}.mlp.experts.{packed}", row=5)
    reader = CheckpointReader(path)
    clean = load_experts(cfg, reader, [0, 1, 2, 3, 4, 6], torch.float32, "cpu")
    assert all(torch.isfinite(p).all() for p in clean.parameters())
    dirty = load_experts(cfg, reader, [5], torch.float32, "cpu")
    assert all(torch.isnan(p).all() for p in dirty.parameters())


def test_unknown_layer_type_is_a_clear_error(tmp_path, cfg):
    path = write_random(tmp_path, cfg)
    conf = json.load(open(os.path.join(path, "config.json")))
    conf["layer_types"][1] = "linear_attention"
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match=r"config\.json.*unknown layer_types value\(s\) \['linear_attention'\]"):
        DeepseekV4.from_pretrained(path)


def test_missing_tensor_is_a_clear_error(tmp_path, cfg):
    tensors = random_tensors(cfg, 0)
    del tensors["layers.1.attn.indexer.wq_b.weight"]
    write_checkpoint(str(tmp_path), cfg, tensors, "official")
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.indexer\.wq_b\.weight.*missing"):
        DeepseekV4.from_pretrained(str(tmp_path))


def test_shape_mismatch_names_file_and_tensor(tmp_path, cfg):
    tensors = random_tensors(cfg, 0)
    tensors["layers.2.attn.wkv.weight"] = torch.zeros(cfg.head_dim + 1, cfg.hidden_size)
    write_checkpoint(str(tmp_path), cfg, tensors, "official", shard_bytes=200_000)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor 'layers\.2\.attn\.wkv\.weight' "
                                              r"has shape \(33, 64\), expected \(32, 64\)"):
        DeepseekV4.from_pretrained(str(tmp_path))


def test_missing_expert_and_unexpected_tensor(tmp_path, cfg):
    tensors = random_tensors(cfg, 0)
    del tensors["layers.3.ffn.experts.6.w2.weight"]
    write_checkpoint(str(tmp_path / "a"), cfg, tensors, "official")
    with pytest.raises(CheckpointError, match=r"layers\.3\.ffn\.experts\.6\.w2\.weight.*missing"):
        DeepseekV4.from_pretrained(str(tmp_path / "a"))
    tensors = random_tensors(cfg, 0)
    tensors["layers.0.attn.mystery.weight"] = torch.zeros(2, 2)
    write_checkpoint(str(tmp_path / "b"), cfg, tensors, "official")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'layers\.0\.attn\.mystery\.weight'"):
        DeepseekV4.from_pretrained(str(tmp_path / "b"))


def test_truncated_file_is_a_clear_error(tmp_path, cfg):
    path = write_random(tmp_path, cfg, fmt="official")
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        DeepseekV4.from_pretrained(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        DeepseekV4.from_pretrained(str(tmp_path))
