"""Fixtures of the serving tests: one Serve instance on the session's Ray cluster and two apps.

- `main_app`: route "/", 2 Engine replicas, API key, test hooks, device KV cache, small limits
  (body 256 KiB, 64 messages) so limit errors are cheap to provoke.
- `aux_app`: route "/aux", 1 Engine replica with room for one running and one waiting sequence
  (429 on the third), KV cache with Redis and a disk directory (the restart test redeploys it).
Both are started once per session (Serve app start ≈ 5-10 s here) and shared by every test.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import pytest

API_KEY = "sk-test-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class App:
    name: str
    url: str          # base URL of the app (no trailing slash)
    api_key: str | None
    args: dict
    route_prefix: str

    def openai(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def async_openai(self, **kw):
        import openai
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def anthropic(self, **kw):
        import anthropic
        return anthropic.Anthropic(base_url=self.url, api_key=self.api_key or "none", max_retries=0, **kw)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def deploy(self) -> None:
        from ray import serve

        from cluster.app import build_app
        serve.run(build_app(self.args), name=self.name, route_prefix=self.route_prefix)

    def engine_stats(self, index: int = 0):
        from ray import serve
        return serve.get_deployment_handle(f"Engine{index}", app_name=self.name).stats.remote().result()


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    from ray import serve
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def main_app(serve_url, tiny_ckpt) -> App:
    args = dict(model=tiny_ckpt, num_replicas=2, api_key=API_KEY, is_test_hooks_enabled=True,
                max_num_seqs=32, max_num_batched_tokens=256, max_body_bytes=256 << 10, max_messages=64,
                engine_num_cpus=1.0)
    app = App("main", serve_url, API_KEY, args, "/")
    app.deploy()
    return app


@pytest.fixture(scope="session")
def aux_app(serve_url, tiny_ckpt, redis_url, tmp_path_factory) -> App:
    args = dict(model=tiny_ckpt, num_replicas=1, max_num_seqs=1, max_num_waiting=1, max_num_batched_tokens=64,
                kv_redis_url=redis_url, kv_dir=str(tmp_path_factory.mktemp("kv")), is_test_hooks_enabled=True)
    app = App("aux", serve_url + "/aux", None, args, "/aux")
    app.deploy()
    return app


@pytest.fixture
def unique() -> str:
    """A per-test random string (cache salts, prompts that must miss the KV cache)."""
    return uuid.uuid4().hex[:12]


