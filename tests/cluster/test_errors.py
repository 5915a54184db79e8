"""Every bad input gets the right status and the API's own error body; the server keeps serving."""

import os

import httpx
import openai
import pytest

MODEL = "deepseek-v4-flash"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OK_MSG = {"model": "deepseek-v4-pro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(app, path, body=None, *, content=None, headers=None):
    h = app.headers() if headers is None else headers
    return httpx.post(app.url + path, json=body, content=content, headers=h, timeout=60)


def openai_error(r, status, *, in_message=(), type_=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in in_message:
        assert word in err["message"], err["message"]
    if type_:
        assert err["type"] == type_
    if code:
        assert err["code"] == code
    assert "Traceback" not in r.text
    return err


def anthropic_error(r, status, type_, *in_message):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == type_
    for word in in_message:
        assert word in body["error"]["message"], body["error"]["message"]
    assert "Traceback" not in r.text


BAD_CHAT = [
    ({**OK_CHAT, "temperature": "hot"}, "temperature"),
    ({**OK_CHAT, "temperature": 5}, "temperature"),
    ({**OK_CHAT, "top_p": 0}, "top_p"),
    ({**OK_CHAT, "n": 0}, "'n'"),
    ({**OK_CHAT, "n": 17}, "'n'"),
    ({**OK_CHAT, "max_tokens": 0}, "max_tokens"),
    ({**OK_CHAT, "top_logprobs": 3}, "top_logprobs"),
    ({**OK_CHAT, "stop": [1, 2]}, "stop"),
    ({**OK_CHAT, "seed": "x"}, "seed"),
    ({**OK_CHAT, "stream": "yes"}, "stream"),
    ({**OK_CHAT, "thinking": {"type": "sometimes"}}, "thinking.type"),
    ({**OK_CHAT, "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({**OK_CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({**OK_CHAT, "tools": [{"type": "function"}]}, "function"),
    ({**OK_CHAT, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({**OK_CHAT, "messages": []}, "messages"),
    ({**OK_CHAT, "messages": "hi"}, "messages"),
    ({**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "image_url"),
    ({**OK_CHAT, "messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]}, "tool"),
    ({"messages": OK_CHAT["messages"]}, "model"),
]


@pytest.mark.parametrize("body,word", BAD_CHAT, ids=[w for _, w in BAD_CHAT])
def test_openai_400(main_app, body, word):
    openai_error(post(main_app, "/v1/chat/completions", body), 400, in_message=[word],
                 type_="invalid_request_error")


def test_openai_status_errors(main_app):
    openai_error(post(main_app, "/v1/chat/completions", content=b"{not json",
                      headers={**main_app.headers(), "content-type": "application/json"}), 400,
                 in_message=["JSON"])
    openai_error(post(main_app, "/v1/chat/completions", OK_CHAT, headers={}), 401, type_="authentication_error")
    openai_error(post(main_app, "/v1/chat/completions", OK_CHAT, headers={"Authorization": "Bearer nope"}), 401)
    assert post(main_app, "/v1/chat/completions", OK_CHAT, headers={"x-api-key": main_app.api_key}).status_code == 200
    openai_error(post(main_app, "/v1/chat/completions", {**OK_CHAT, "model": "gpt-4"}), 404,
                 in_message=["gpt-4", "deepseek-v4-pro", "deepseek-v4-flash"], code="model_not_found")
    err = openai_error(post(main_app, "/v1/chat/completions", {**OK_CHAT, "model": "deepseek-chat"}), 404,
                       in_message=["retired", "deepseek-v4-flash", "deepseek-v4-pro"])
    assert err["param"] == "model"
    openai_error(post(main_app, "/v1/chat/completions", {**OK_CHAT, "max_tokens": 1 << 21}), 400,
                 in_message=["maximum context length"], code="context_length_exceeded")
    openai_error(post(main_app, "/v1/chat/completions",
                      {**OK_CHAT, "messages": [{"role": "user", "content": "x" * (300 << 10)}]}), 413)
    openai_error(post(main_app, "/v1/chat/completions",
                      {**OK_CHAT, "messages": [{"role": "user", "content": "x"}] * 65}), 400,
                 in_message=["at most 64"])
    openai_error(httpx.get(main_app.url + "/v1/nothing-here", timeout=30), 404)
    openai_error(httpx.get(main_app.url + "/v1/chat/completions", timeout=30), 405)


def test_engine_failure_is_500_without_traceback(main_app):
    # an out-of-vocabulary forced token makes the next model step raise inside the engine
    r = post(main_app, "/v1/chat/completions", {**OK_CHAT, "max_tokens": 5, "dsv4_forced_token_ids": [10 ** 6]})
    err = openai_error(r, 500, type_="server_error")
    assert "IndexError" not in err["message"] and "generation failed" in err["message"]
    with httpx.stream("POST", main_app.url + "/v1/chat/completions", headers=main_app.headers(), timeout=60,
                      json={**OK_CHAT, "max_tokens": 5, "stream": True, "dsv4_forced_token_ids": [10 ** 6]}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert s.status_code == 200 and '"server_error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert "Traceback" not in "".join(lines)


def test_anthropic_errors(main_app):
    anthropic_error(post(main_app, "/v1/messages", OK_MSG, headers={}), 401, "authentication_error")
    anthropic_error(post(main_app, "/anthropic/v1/messages", {**OK_MSG, "model": "nope"}), 404, "not_found_error",
                    "deepseek-v4-pro")
    anthropic_error(post(main_app, "/v1/messages", {**OK_MSG, "temperature": 1.5}), 400, "invalid_request_error",
                    "temperature")
    anthropic_error(post(main_app, "/v1/messages", {**OK_MSG, "messages": [{"role": "system", "content": "x"}]}),
                    400, "invalid_request_error", "role")
    anthropic_error(post(main_app, "/v1/messages", {**OK_MSG, "thinking": {"type": "maybe"}}), 400,
                    "invalid_request_error", "thinking.type")
    anthropic_error(post(main_app, "/v1/messages", {**OK_MSG, "max_tokens": 1 << 21}), 400,
                    "invalid_request_error", "maximum context length")
    anthropic_error(post(main_app, "/v1/messages",
                         {**OK_MSG, "messages": [{"role": "user", "content": "y" * (300 << 10)}]}), 413,
                    "request_too_large")
    anthropic_error(httpx.get(main_app.url + "/anthropic/v1/nothing", timeout=30), 404, "not_found_error")
    anthropic_error(post(main_app, "/v1/messages/count_tokens", {"model": "deepseek-v4-pro", "messages": 3}), 400,
                    "invalid_request_error", "messages")


def test_server_keeps_serving_and_sdk_error_types(main_app):
    client = main_app.openai()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="deepseek-reasoner", messages=OK_CHAT["messages"], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=main_app.url + "/v1", api_key="bad", max_retries=0).models.list()
    r = client.chat.completions.create(model=MODEL, messages=OK_CHAT["messages"], max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert httpx.get(main_app.url + "/health", timeout=30).status_code == 200


def test_test_hooks_off_by_default(tiny_ckpt):
    from cluster.api_service import ApiService
    from cluster.config import ConfigError, ServeConfig
    from cluster.engine_client import LocalEnginePool
    from cluster.errors import APIError
    from cluster.params import Body
    from model_shards.tokenizer import ByteTokenizer

    config = ServeConfig.from_args({"model": tiny_ckpt})
    assert config.is_test_hooks_enabled is False
    service = ApiService(config, ByteTokenizer(), LocalEnginePool([None]), 1 << 20)
    with pytest.raises(APIError, match="test hook"):
        service.forced_token_ids(Body({"dsv4_forced_completion": "x"}))
    with pytest.raises(ConfigError, match="unknown option"):
        ServeConfig.from_args({"num_replica": 2})
    with pytest.raises(ConfigError, match="max_num_seqs must be an integer"):
        ServeConfig.from_args({"max_num_seqs": "8"})
    with pytest.raises(ConfigError, match="served_model_names"):
        ServeConfig.from_args({"served_model_names": ["deepseek-chat"]})
    assert ServeConfig.from_args({"served_model_names": "deepseek-v4-pro"}).served_model_names == ("deepseek-v4-pro",)
    with pytest.raises(ConfigError, match="kv_restore_threads must be >= 0"):
        ServeConfig.from_args({"kv_restore_threads": -1})


def test_kv_restore_threads_reach_the_kv_service(tmp_path):
    from actors.engine_prefix import KVServicePrefixCache
    from cluster.config import ServeConfig
    from model_shards.random_checkpoint import PRESETS

    for args, expected in (({}, None), ({"kv_restore_threads": 3}, 3)):
        options = ServeConfig.from_args(args).kv_options()
        assert options["restore_threads"] == expected
        cache = KVServicePrefixCache.build(PRESETS["tiny"], "fp", redis_url=None, disk_dir=str(tmp_path), options=options)
        try:
            assert cache.service.config.restore_threads == expected
            assert cache.service.config.num_restore_threads == (expected or min(4, len(os.sched_getaffinity(0))))
        finally:
            cache.close()


def test_device_and_dtype_options():
    import torch

    from cluster.config import ConfigError, ServeConfig

    with pytest.raises(ConfigError, match="device must be"):
        ServeConfig.from_args({"device": "tpu"})
    with pytest.raises(ConfigError, match="dtype must be"):
        ServeConfig.from_args({"dtype": "float16"})
    has_cuda = torch.cuda.is_available()
    assert ServeConfig.from_args({}).resolve_device() == (
        ("cuda", torch.bfloat16) if has_cuda else ("cpu", torch.float32))
    assert ServeConfig.from_args({"device": "cpu", "dtype": "bfloat16"}).resolve_device() == ("cpu", torch.bfloat16)
    if not has_cuda:
        with pytest.raises(ConfigError, match="sees no GPU"):
            ServeConfig.from_args({"device": "cuda"}).resolve_device()


def test_compiled_decode_option():
    from cluster.config import ConfigError, ServeConfig

    with pytest.raises(ConfigError, match="compiled_decode must be"):
        ServeConfig.from_args({"compiled_decode": "yes"})
    auto = ServeConfig.from_args({})
    assert auto.is_compiled_decode("cuda") and not auto.is_compiled_decode("cpu")
    assert not ServeConfig.from_args({"cuda_graphs": False}).is_compiled_decode("cuda")
    assert ServeConfig.from_args({"compiled_decode": "on"}).is_compiled_decode("cpu")
    assert not ServeConfig.from_args({"compiled_decode": "off"}).is_compiled_decode("cuda")


def test_embedded_tiny_checkpoint(tmp_path):
    from cluster.tiny_checkpoint import ensure_tiny_checkpoint
    path = ensure_tiny_checkpoint(str(tmp_path))
    assert ensure_tiny_checkpoint(str(tmp_path)) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-seed0-v1"]
