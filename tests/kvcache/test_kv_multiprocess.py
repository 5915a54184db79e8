"""Another process sees what this one committed (through Redis and through disk), and this one,
still running, sees what the other committed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state

REPO_ROOT = Path(__file__).resolve().parents[2]
LAY = SyntheticLayout(dtype=torch.bfloat16)
FP = "multiprocess-fp"

CHILD = r"""
import json, sys, torch
from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, synthetic_state
cfg = json.loads(sys.argv[1])
lay = SyntheticLayout(dtype=torch.bfloat16)
stores = {"redis": dict(redis_url=cfg["redis_url"], redis_prefix=cfg["prefix"]), "disk": dict(disk_dir=cfg["disk_dir"])}
out = {}
for name, kwargs in stores.items():
    with KVCacheService(lay.entry_rates, cfg["fp"], device_bytes=0, **kwargs) as svc:
        result = svc.lookup(cfg["tokens"])
        out[name] = [result.num_cached_tokens, result.checkpoint_tier]
        torch.save(result.state_tensors, cfg["out"] + "." + name)
with KVCacheService(lay.entry_rates, cfg["fp"], **stores["redis"], **stores["disk"]) as svc:
    tokens = cfg["child_tokens"]
    svc.commit(tokens, {p: synthetic_state(lay, tokens, p) for p in (200, 640)})
    svc.flush()
print(json.dumps(out))
"""


def test_commits_are_visible_across_processes(tmp_path, redis_url, redis_prefix):
    rng = np.random.default_rng(11)
    tokens = [int(t) for t in rng.integers(0, 50000, 700)]
    child_tokens = [int(t) for t in rng.integers(0, 50000, 700)]
    disk_dir = tmp_path / "disk"
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=disk_dir)
    with KVCacheService(LAY.entry_rates, FP, **stores) as parent, \
            KVCacheService(LAY.entry_rates, FP, device_bytes=0, disk_dir=disk_dir) as disk_reader, \
            KVCacheService(LAY.entry_rates, FP, device_bytes=0, redis_url=redis_url, redis_prefix=redis_prefix) as redis_reader:
        parent.commit(tokens, {p: synthetic_state(LAY, tokens, p) for p in (300, 650)})
        parent.flush()
        cfg = dict(redis_url=redis_url, prefix=redis_prefix, disk_dir=str(disk_dir), fp=FP, tokens=tokens,
                   child_tokens=child_tokens, out=str(tmp_path / "state"))
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
        found = json.loads(child.stdout.strip().splitlines()[-1])
        assert found == {"redis": [650, "redis"], "disk": [650, "disk"]}
        expected = synthetic_state(LAY, tokens, 650)
        for name in ("redis", "disk"):
            assert bitwise_equal(torch.load(f"{tmp_path / 'state'}.{name}"), expected)
        # the readers were running before the child committed
        for reader, tier in ((redis_reader, "redis"), (disk_reader, "disk")):
            result = reader.lookup(child_tokens)
            assert result.num_cached_tokens == 640 and result.checkpoint_tier == tier
            assert bitwise_equal(result.state_tensors, synthetic_state(LAY, child_tokens, 640))
