"""Shared test fixtures: tiny checkpoints, one Redis, one Ray cluster per test session.

- `tiny_ckpt` / `tiny_model`: the embedded `tiny` preset (seed 0), written once per session.
- `redis_url`: 127.0.0.1:6379 when it answers, else a private `redis-server` on a free port.
- `ray_cluster`: a `ray.cluster_utils.Cluster` with a head and 2 worker nodes (custom resources
  `node_a`, `node_b` so tests can place actors on distinct nodes); the test process is connected
  to it. Started on first use, shut down at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import factories`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers(host: str, port: int) -> bool:
    try:
        import redis
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url():
    if _redis_answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no Redis reachable and no redis-server binary")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if _redis_answers("127.0.0.1", port):
            break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from model_shards.random_checkpoint import generate
    path = str(tmp_path_factory.mktemp("tiny_ckpt"))
    generate(path, "tiny", "hf", "none", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from model_shards import DeepseekV4
    return DeepseekV4.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False, "resources": {"head": 10}})
    nodes = [cluster.add_node(num_cpus=4, resources={name: 10}) for name in ("node_a", "node_b")]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}})
    cluster.worker_nodes_list = nodes
    yield cluster
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
    cluster.shutdown()
