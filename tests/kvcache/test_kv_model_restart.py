"""Restarts: a new process with the same Redis / disk directory finds what an earlier one
committed, and the state it restores (from Redis alone, and from disk alone) decodes bitwise like
the committing process's in-memory state. The new process then commits the end of its response,
and a fresh service in this process resumes the next turn from it, bitwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kv_model_helpers import random_tokens, service_for
from kvcache.resume import decode, prefill, prompt_checkpoints, resume

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_PROMPT_TOKENS, NUM_DECODE_STEPS, NUM_TURN_TOKENS = 431, 12, 9

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from model_shards import DeepseekV4
from kv_model_helpers import service_for
from kvcache.resume import decode, import_state
torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])
model = DeepseekV4.from_pretrained(cfg["ckpt"])
prompt, steps = cfg["prompt"], torch.tensor(cfg["steps"])
stores = {"redis": dict(redis_url=cfg["redis_url"], redis_prefix=cfg["prefix"]), "disk": dict(disk_dir=cfg["disk_dir"])}
out = {}
for name, store in stores.items():
    with service_for(model, device_bytes=0, **store) as svc:
        hit = svc.lookup(prompt)
        state = import_state(model, hit.state_tensors)
        torch.save(decode(model, state, steps), cfg["out"] + "." + name)
        out[name] = [hit.num_cached_tokens, hit.checkpoint_tier]
with service_for(model, **stores["redis"], **stores["disk"]) as svc:  # the end of the response
    svc.commit(prompt + cfg["steps"], {len(prompt) + len(steps): state.export()})
    svc.flush()
print(json.dumps(out))
"""


def test_a_new_process_restores_what_an_earlier_one_committed(tiny_ckpt, tiny_model, tmp_path, redis_url,
                                                              redis_prefix):
    vocab = tiny_model.config.vocab_size
    prompt = random_tokens(NUM_PROMPT_TOKENS, vocab, seed=5)
    steps = random_tokens(NUM_DECODE_STEPS, vocab, seed=6)
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=tmp_path / "disk")
    state = tiny_model.new_state()
    with service_for(tiny_model, **stores) as svc:
        run = prefill(tiny_model, state, prompt, export_positions=prompt_checkpoints(svc, NUM_PROMPT_TOKENS))
        svc.commit(prompt.tolist(), run.exports)
        svc.flush()
    expected = decode(tiny_model, state, steps)
    cfg = dict(ckpt=tiny_ckpt, prompt=prompt.tolist(), steps=steps.tolist(), redis_url=redis_url,
               prefix=redis_prefix, disk_dir=str(tmp_path / "disk"), out=str(tmp_path / "logits"))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(Path(__file__).parent)],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found == {"redis": [NUM_PROMPT_TOKENS, "redis"], "disk": [NUM_PROMPT_TOKENS, "disk"]}
    for tier in ("redis", "disk"):
        assert torch.equal(torch.load(f"{tmp_path / 'logits'}.{tier}"), expected), tier
    # the next turn, in a fresh service here, resumes where the other process's response ended
    turn = torch.cat([prompt, steps, random_tokens(NUM_TURN_TOKENS, vocab, seed=7)])
    expected_turn = prefill(tiny_model, state, turn[NUM_PROMPT_TOKENS + NUM_DECODE_STEPS:]).logits
    for store in (dict(redis_url=redis_url, redis_prefix=redis_prefix), dict(disk_dir=tmp_path / "disk")):
        with service_for(tiny_model, device_bytes=0, **store) as svc:
            resumed = resume(tiny_model, svc, turn)
        assert resumed.num_cached_tokens == NUM_PROMPT_TOKENS + NUM_DECODE_STEPS
        assert torch.equal(resumed.logits, expected_turn)
