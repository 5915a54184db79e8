"""An Engine replica whose experts live in expert-shard actors (actors.launch), behind Serve:
same answers as the single-process Engine, /health covers the shards."""

import httpx
from ray import serve

MODEL = "deepseek-v4-flash"


def test_engine_with_expert_shards(main_app, tiny_ckpt):
    from cluster.app import build_app

    args = dict(model=tiny_ckpt, num_replicas=1, num_expert_shards=2, kv_enabled=False)
    serve.run(build_app(args), name="ep", route_prefix="/ep")
    try:
        url = main_app.url + "/ep"
        assert httpx.get(url + "/health", timeout=60).status_code == 200
        body = {"model": MODEL, "messages": [{"role": "user", "content": "experts, assemble"}], "max_tokens": 8,
                "temperature": 0, "ignore_eos": True, "thinking": {"type": "disabled"}}
        ep = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        local = httpx.post(main_app.url + "/v1/chat/completions", json=body, headers=main_app.headers(),
                           timeout=120).json()
        assert ep["usage"]["completion_tokens"] == 8
        assert ep["choices"][0]["message"]["content"] == local["choices"][0]["message"]["content"]
    finally:
        serve.delete("ep")
