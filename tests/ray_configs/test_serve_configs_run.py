"""`serve run ray_configs/serve_local.yaml` and `serve deploy` (ray_configs/serve.yaml's shape)
against a `ray start --head` cluster that this test starts (its own ports and temp dir), each
serving the tiny model over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not healthy after {timeout_s} s")


def chat(port: int, model: str) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


@pytest.fixture
def head(tmp_path):
    """A separate single-node Ray cluster: started with `ray start --head --block` in its own
    process group and torn down by killing that group (`ray stop` would stop every Ray on the box)."""
    temp_dir = f"/tmp/rt{os.getpid()}"
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DSV4_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.path.abspath(ROOT))
    env.pop("RAY_ADDRESS", None)
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "serve": [os.path.join(os.path.dirname(ray_bin), "serve")]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:   # Ray's graceful stop can take 30 s here; the group dies with SIGKILL just the same
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_config(src: str, dst, port: int, args: dict | None = None) -> str:
    cfg = yaml.safe_load(open(os.path.join(ROOT, "ray_configs", src)))
    cfg["http_options"]["port"] = port
    cfg["http_options"]["host"] = "127.0.0.1"
    cfg["proxy_location"] = "HeadOnly"
    if args is not None:
        cfg["applications"][0]["args"] = args
    with open(dst, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(dst)


def test_serve_run_then_serve_deploy(head, tmp_path):
    port = free_port()
    # 1. serve run (blocking, like a user's terminal), stopped with SIGTERM
    local = write_config("serve_local.yaml", tmp_path / "local.yaml", port)
    run = subprocess.Popen([*head["serve"], "run", local, "--address", head["gcs"]], env=head["env"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300)
        assert chat(port, "deepseek-v4-pro")["usage"]["completion_tokens"] >= 1
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(60)
    subprocess.run([*head["serve"], "shutdown", "-a", head["dashboard"], "-y"], env=head["env"],
                   check=True, capture_output=True, timeout=120)
    # 2. serve deploy of the cluster config's shape (its args with the tiny model and local paths)
    cluster_args = yaml.safe_load(open(os.path.join(ROOT, "ray_configs", "serve.yaml")))["applications"][0]["args"]
    args = {**cluster_args, "model": None, "num_expert_shards": 1, "engine_num_gpus": 0.0,
            "kv_redis_url": None, "kv_dir": str(tmp_path / "kv"), "kv_device_bytes": 1 << 26}
    deploy_cfg = write_config("serve.yaml", tmp_path / "deploy.yaml", port, args)
    subprocess.run([*head["serve"], "deploy", deploy_cfg, "-a", head["dashboard"]], env=head["env"],
                   check=True, capture_output=True, timeout=120)
    deadline, status = time.time() + 300, ""
    while time.time() < deadline and "status: RUNNING" not in status:
        time.sleep(2)
        status = subprocess.run([*head["serve"], "status", "-a", head["dashboard"]], env=head["env"],
                                capture_output=True, text=True, timeout=60).stdout
    assert "status: RUNNING" in status, status
    wait_http(f"http://127.0.0.1:{port}/health", 120)
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30).read())
    assert [m["id"] for m in models["data"]] == ["deepseek-v4-flash"]   # serve.yaml's app, not serve_local's
    assert chat(port, "deepseek-v4-flash")["usage"]["completion_tokens"] >= 1
