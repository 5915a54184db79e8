"""Redis going away never fails a request: one warning, device + disk carry on, and Redis is used
again once it is back."""

import logging
import socket
import time

import numpy as np
import redis

from kvcache.service import KVCacheService
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state

LAY = SyntheticLayout()
FP = "outage-fp"
RETRY_S = 0.2


def sequence(seed: int, n: int = 500) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50000, n)]


def commit(svc, tokens, positions=(300, 500)):
    svc.commit(tokens, {p: synthetic_state(LAY, tokens, p) for p in positions})


def warnings_from_redis_tier(caplog):
    return [r for r in caplog.records if r.name == "kvcache.redis_tier" and r.levelno >= logging.WARNING]


def test_redis_stopped_mid_run_then_restarted(private_redis, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kvcache")
    first, second, third = sequence(1), sequence(2), sequence(3)
    svc = KVCacheService(LAY.entry_rates, FP, redis_url=private_redis.url, disk_dir=tmp_path,
                         device_bytes=0, redis_retry_s=RETRY_S, redis_timeout_s=1.0)
    commit(svc, first)
    svc.flush()
    assert svc.lookup(first).checkpoint_tier == "redis"

    private_redis.stop()
    for _ in range(3):
        commit(svc, second)
        svc.flush()
        result = svc.lookup(first)
        assert result.num_cached_tokens == 500 and result.checkpoint_tier == "disk"
        assert bitwise_equal(result.state_tensors, synthetic_state(LAY, first, 500))
        assert svc.lookup(second).checkpoint_tier == "disk"
    time.sleep(2 * RETRY_S)  # a failed probe after the retry interval stays silent
    assert svc.lookup(second).num_cached_tokens == 500
    assert len(warnings_from_redis_tier(caplog)) == 1
    assert not svc.stats().tiers["redis"].is_available

    private_redis.start()  # same port, empty
    deadline = time.monotonic() + 10
    while not svc.stats().tiers["redis"].is_available and time.monotonic() < deadline:
        time.sleep(RETRY_S / 4)
    commit(svc, third)
    svc.flush()
    client = redis.Redis.from_url(private_redis.url)
    assert len(client.keys("dsv4kv:*")) >= 5 + 2  # the third sequence's blocks and checkpoints
    assert svc.lookup(third).checkpoint_tier == "redis"
    assert svc.lookup(first).checkpoint_tier == "disk"  # then promoted back into Redis
    svc.flush()
    assert svc.lookup(first).checkpoint_tier == "redis"
    assert svc.stats().tiers["redis"].is_available
    assert len(warnings_from_redis_tier(caplog)) == 1
    assert any("reachable again" in r.message for r in caplog.records)
    svc.close()
    client.close()


def test_unreachable_redis_from_the_start(tmp_path, caplog):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="kvcache")
    tokens = sequence(4)
    with KVCacheService(LAY.entry_rates, FP, redis_url=f"redis://127.0.0.1:{port}/0",
                        disk_dir=tmp_path, device_bytes=0, redis_retry_s=60) as svc:
        for _ in range(3):
            commit(svc, tokens)
            svc.flush()
            assert svc.lookup(tokens).checkpoint_tier == "disk"
    assert len(warnings_from_redis_tier(caplog)) == 1
