"""The `dsv4` CLI: the README quickstart in a fresh virtualenv, and clear one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_command(kind: str) -> str:
    """The README quickstart's install / test command (the lines the user copies)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quickstart\n\n```bash\n(.*?)```", text, re.S).group(1)
    lines = [l.split("#")[0].strip() for l in block.splitlines() if l.strip()]
    if kind == "install":
        return next(l for l in lines if l.startswith("pip install"))
    if kind == "serve":
        return next(l for l in lines if l.startswith("dsv4 serve"))
    return next(l for l in lines if "pytest" in l)


def test_ci_runs_exactly_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert readme_command("test").replace("python ", "python3 ") in ci


def _ray_redis_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(l.split()[0]) for l in out.splitlines()[1:]
            if any(k in l for k in ("raylet", "gcs_server", "redis-server", "ray::"))}


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    r = run("serve", "--model", str(tmp_path), "--port", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "dsv4: error:" in r.stderr
    r = run("split-checkpoint", str(tmp_path), str(tmp_path / "out"), "--shards", "2")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_split_checkpoint_parts_load(tmp_path, tiny_ckpt):
    from model_shards.checkpoint import CheckpointReader
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "split-checkpoint", tiny_ckpt, str(tmp_path), "--shards", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    shards = json.load(open(tmp_path / "shards.json"))["experts_per_shard"]
    assert shards == [[0, 2], [2, 5], [5, 8]]
    names = CheckpointReader(str(tmp_path / "shard-1")).names()
    assert names and all(".ffn.experts." in n for n in names)
    assert {int(n.split(".ffn.experts.")[1].split(".")[0]) for n in names} == {2, 3, 4}
    assert not any(".ffn.experts." in n and not n.startswith("mtp.") for n in CheckpointReader(str(tmp_path / "dense")).names())


@pytest.mark.slow
def test_readme_quickstart_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VIRTUAL_ENV=str(venv),
               DSV4_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH="")
    install = readme_command("install")
    subprocess.run(install, shell=True, check=True, cwd=ROOT, env=env, timeout=1200,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before = _ray_redis_pids()
    port = 18000 + os.getpid() % 1000
    serve = readme_command("serve").split() + ["--port", str(port)]
    proc = subprocess.Popen(serve, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, lines = time.time() + 600, []
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "stop with Ctrl-C" in line:
                break
        output = "".join(lines)
        assert "is ready at" in output, output + proc.stderr.read() if proc.poll() is not None else output
        curl = next(l for l in lines if "curl" in l)
        assert "/v1/chat/completions" in curl
        body = json.dumps({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "Hello"}],
                           "max_tokens": 8}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
        started = _ray_redis_pids() - before
        assert started, "dsv4 serve started no Ray / Redis processes?"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    deadline = time.time() + 30
    while time.time() < deadline and (started & _ray_redis_pids()):
        time.sleep(0.5)
    assert not (started & _ray_redis_pids()), "processes left running after Ctrl-C"


def test_dsv4_chat_streams_and_toggles_thinking(main_app):
    """`dsv4 chat` against the session's app: a turn with thinking on (its reasoning shown dimmed, as
    the API returns it for the same seed), the /think off switch, a second turn, then EOF ends it
    with exit code 0. Seeded: the embedded model's random weights make any reply possible, even one
    with no visible reasoning (6 sampled tokens that are all partial UTF-8 bytes, say)."""
    script = "hello\n/think off\nagain\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "chat", "--url", main_app.url, "--api-key",
                        main_app.api_key, "--max-tokens", "12", "--seed", "3"], input=script, capture_output=True,
                       text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "thinking off" in r.stdout and "Traceback" not in r.stderr
    assert r.stdout.count("> ") >= 3                           # three prompts were shown
    want = main_app.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "hello"}], max_tokens=12, seed=3,
        extra_body={"thinking": {"type": "enabled"}}).choices[0].message
    assert want.reasoning_content, "seed 3 no longer gives visible reasoning: pick another"
    assert "\x1b[2m" + want.reasoning_content in r.stdout       # the first turn's reasoning, dimmed


def test_dsv4_chat_reports_server_errors_in_one_line(main_app):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "chat", "--url", main_app.url, "--api-key", "wrong"],
                       input="hello\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "dsv4: error:" in r.stderr and "Traceback" not in r.stderr


def test_startup_waits_for_health_and_draws_loading_progress(tmp_path, capfd):
    """`dsv4 serve`'s wait: replicas write {"done", "total"} bytes to a file per replica; the CLI
    draws them as one bar until /health answers 200 (here a loopback server that turns healthy)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cluster.local_mode import wait_healthy

    finished = [threading.Event(), threading.Event()]

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # healthy once both replicas have loaded, like the real app
            self.send_response(200 if all(e.is_set() for e in finished) else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = str(tmp_path / "engine")

    def replica(k: int) -> None:
        for i in range(1, 5):
            with open(f"{base}.{k}.tmp", "w") as f:
                json.dump({"done": i * 100, "total": 400}, f)
            os.replace(f"{base}.{k}.tmp", f"{base}.{k}")
            time.sleep(0.4)
        time.sleep(0.6)  # the CLI polls every 0.5 s: it sees the finished files before /health turns 200
        finished[k].set()

    for k in range(2):
        threading.Thread(target=replica, args=(k,), daemon=True).start()
    try:
        wait_healthy(f"http://127.0.0.1:{server.server_port}", 60, base, num_replicas=2)
    finally:
        server.shutdown()
    err = capfd.readouterr().err
    assert "loading weights" in err and "800/800" in err
