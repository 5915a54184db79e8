"""MTP proposals (shapes, determinism) and the random checkpoint generator (determinism, CLI)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from factories import random_ids, tiny_config, write_random
from model_shards import DeepseekV4
from model_shards.random_checkpoint import PRESETS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return DeepseekV4.from_pretrained(write_random(tmp_path_factory.mktemp("mtp"), tiny_config(), seed=4))


def test_mtp_proposes_next_next_token(model):
    ids = random_ids(20, model.config.vocab_size, seed=9)
    state = model.new_state()
    (logits,), (hidden,) = model.step([state], [ids[:19]], return_hidden=True)
    assert hidden.shape == (19, model.config.hidden_size)
    mtp_state = model.mtp[0].new_state()
    # hidden at positions 0..18 with the tokens at 1..19 -> predictions for positions 2..20
    proposal = model.propose_next_next(hidden, ids[1:20], mtp_state)
    assert proposal.shape == (19, model.config.vocab_size) and torch.isfinite(proposal).all()
    again = model.propose_next_next(hidden, ids[1:20], model.mtp[0].new_state())
    assert torch.equal(proposal, again)
    # incremental MTP (one token at a time) equals the whole-sequence call
    inc_state = model.mtp[0].new_state()
    steps = [model.propose_next_next(hidden[t: t + 1], ids[t + 1: t + 2], inc_state) for t in range(19)]
    assert torch.allclose(torch.cat(steps), proposal, rtol=0, atol=1e-5 * proposal.abs().max().item())
    assert mtp_state.num_tokens == 19


def test_checkpoint_without_mtp(tmp_path):
    m = DeepseekV4.from_pretrained(write_random(tmp_path, tiny_config(), with_mtp=False))
    with pytest.raises(RuntimeError, match="no mtp"):
        m.propose_next_next(torch.zeros(1, m.config.hidden_size), torch.zeros(1, dtype=torch.long), None)


def digest(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        h.update(name.encode())
        h.update(open(os.path.join(path, name), "rb").read())
    return h.hexdigest()


def test_generator_cli_is_deterministic_by_seed(tmp_path):
    def run(out, *args):
        subprocess.run([sys.executable, "-m", "model_shards.random_checkpoint", str(out), "--preset", "tiny", *args],
                       check=True, capture_output=True)
        return digest(str(out))

    a = run(tmp_path / "a", "--seed", "3", "--format", "official", "--quant", "fp8")
    b = run(tmp_path / "b", "--seed", "3", "--format", "official", "--quant", "fp8")
    c = run(tmp_path / "c", "--seed", "4", "--format", "official", "--quant", "fp8")
    assert a == b != c
    bad = subprocess.run([sys.executable, "-m", "model_shards.random_checkpoint", str(tmp_path / "d"),
                          "--format", "hf", "--quant", "fp8"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_presets_are_valid_and_tiny_serves_the_byte_tokenizer():
    from model_shards.tokenizer import MIN_BYTE_VOCAB
    for cfg in PRESETS.values():
        cfg.validate()
        assert cfg.vocab_size >= MIN_BYTE_VOCAB
    tiny = PRESETS["tiny"]
    assert tiny.layer_types.count("sliding_attention") and tiny.hca_rate == 128 and tiny.csa_rate == 4
