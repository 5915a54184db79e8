"""OpenAI Chat Completions through the official `openai` SDK against the real Serve app."""

import json

import pytest

from model_shards.chat_format import REASONING_EFFORT_MAX_PROMPT

MODEL = "deepseek-v4-flash"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
DSML_CALL = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
             "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
             "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")


def msgs(text="Hello there"):
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def check_usage(u):
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 <= u.completion_tokens_details.reasoning_tokens <= u.completion_tokens


def test_non_stream_chat_mode(main_app):
    client = main_app.openai()
    r = client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=12, temperature=0,
                                       extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True,
                                                   "dsv4_debug": True})
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and c.message.role == "assistant"
    assert c.finish_reason == "length" and isinstance(c.message.content, str)
    assert c.message.reasoning_content is None
    assert r.usage.completion_tokens == 12 and r.usage.completion_tokens_details.reasoning_tokens == 0
    assert r.usage.prompt_tokens == len(r.dsv4_debug["prompt_token_ids"])
    check_usage(r.usage)
    assert r.dsv4_debug["prompt"].endswith("<｜Assistant｜></think>")


def test_thinking_mode_prompt_and_reasoning(main_app):
    client = main_app.openai()
    forced = "I should greet back.</think>Hi!"
    r = client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=64,
                                       extra_body={"dsv4_debug": True, "dsv4_forced_completion": forced})
    c = r.choices[0]
    assert r.dsv4_debug["prompt"].endswith("<｜Assistant｜><think>")  # thinking is the default
    assert c.message.reasoning_content == "I should greet back." and c.message.content == "Hi!"
    assert c.finish_reason == "stop"
    # reasoning tokens: the forced reasoning bytes; the </think> token and "Hi!" + EOS are not
    assert r.usage.completion_tokens_details.reasoning_tokens == len("I should greet back.")
    assert r.usage.completion_tokens == len("I should greet back.") + 1 + len("Hi!") + 1
    check_usage(r.usage)
    r = client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=4, reasoning_effort="xhigh",
                                       extra_body={"dsv4_debug": True})
    assert REASONING_EFFORT_MAX_PROMPT in r.dsv4_debug["prompt"]


def test_stream_equals_non_stream_same_seed(main_app):
    client = main_app.openai()
    kw = dict(model=MODEL, messages=msgs("tell me a story"), max_tokens=24, seed=1234, temperature=0.8)
    for thinking in ("enabled", "disabled"):
        full = client.chat.completions.create(**kw, extra_body={"thinking": {"type": thinking}})
        reasoning, content, usage, finish, roles = [], [], None, None, []
        for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                                    extra_body={"thinking": {"type": thinking}}):
            if chunk.usage is not None:
                usage = chunk.usage
                assert chunk.choices == []
                continue
            d = chunk.choices[0].delta
            roles.append(d.role)
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            content.append(d.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert roles[0] == "assistant"
        assert "".join(content) == full.choices[0].message.content
        assert "".join(reasoning) == (full.choices[0].message.reasoning_content or "")
        assert finish == full.choices[0].finish_reason
        assert usage.completion_tokens == full.usage.completion_tokens
        assert usage.prompt_tokens == full.usage.prompt_tokens
        check_usage(usage)


def test_n_choices_and_seed(main_app):
    client = main_app.openai()
    kw = dict(model=MODEL, messages=msgs("pick"), max_tokens=10, seed=7,
              extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True})
    many = client.chat.completions.create(n=3, **kw)
    one = client.chat.completions.create(**kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in many.choices}) > 1  # each choice has its own stream
    assert many.usage.completion_tokens == 30 and many.usage.prompt_tokens == one.usage.prompt_tokens


def test_logprobs(main_app):
    client = main_app.openai()
    r = client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"thinking": {"type": "disabled"},
                                                                   "ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 6
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy picks the top token
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=6, temperature=0,
                                                 logprobs=True, stream=True,
                                                 extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True}))
    streamed = [e.logprob for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_stop_strings(main_app):
    client = main_app.openai()
    r = client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=64, stop=["STOP", "never"],
                                       extra_body={"thinking": {"type": "disabled"},
                                                   "dsv4_forced_completion": "hello STOP world"})
    assert r.choices[0].message.content == "hello " and r.choices[0].finish_reason == "stop"
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL, messages=msgs(), max_tokens=64, stop="STOP", stream=True,
        extra_body={"thinking": {"type": "disabled"}, "dsv4_forced_completion": "hello STOP world"}) if ch.choices)
    assert text == "hello "


def test_tool_call_non_stream_and_stream(main_app):
    client = main_app.openai()
    forced = "Need the weather.</think>Let me check." + DSML_CALL
    r = client.chat.completions.create(model=MODEL, messages=msgs("Weather in Paris?"), tools=TOOLS, max_tokens=400,
                                       extra_body={"dsv4_forced_completion": forced, "dsv4_debug": True})
    c = r.choices[0]
    assert "## Tools" in r.dsv4_debug["prompt"] and '"name": "get_weather"' in r.dsv4_debug["prompt"]
    assert c.finish_reason == "tool_calls"
    assert c.message.reasoning_content == "Need the weather." and c.message.content == "Let me check."
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

    calls, content, finish = [], [], None
    for ch in client.chat.completions.create(model=MODEL, messages=msgs("Weather in Paris?"), tools=TOOLS,
                                             max_tokens=400, stream=True,
                                             extra_body={"dsv4_forced_completion": forced}):
        d = ch.choices[0].delta
        calls += d.tool_calls or []
        content.append(d.content or "")
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "".join(content) == "Let me check."
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == \
        [(0, "get_weather", {"city": "Paris", "days": 3})]

    # the next turn: the call and its result go back; the result is folded into the user turn
    history = msgs("Weather in Paris?") + [
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "Need the weather.",
         "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather",
                                                                          "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=2,
                                        extra_body={"dsv4_debug": True})
    assert "<tool_result>sunny, 21C</tool_result>" in r2.dsv4_debug["prompt"]
    # tool_choice "none" hides the tools
    r3 = client.chat.completions.create(model=MODEL, messages=msgs(), tools=TOOLS, tool_choice="none", max_tokens=1,
                                        extra_body={"dsv4_debug": True})
    assert "## Tools" not in r3.dsv4_debug["prompt"]


def test_response_format_json_object(main_app):
    client = main_app.openai()
    r = client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=32,
                                       response_format={"type": "json_object"},
                                       extra_body={"dsv4_debug": True, "thinking": {"type": "disabled"},
                                                   "dsv4_forced_completion": '{"ok": true}'})
    assert "## Response Format" in r.dsv4_debug["prompt"]
    assert json.loads(r.choices[0].message.content) == {"ok": True}


def test_models_health_metrics(main_app):
    import httpx
    client = main_app.openai()
    assert sorted(m.id for m in client.models.list()) == ["deepseek-v4-flash", "deepseek-v4-pro"]
    assert client.models.retrieve("deepseek-v4-pro").id == "deepseek-v4-pro"
    h = httpx.get(main_app.url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok" and len(h.json()["replicas"]) == 2
    m = httpx.get(main_app.url + "/metrics", timeout=30)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for series in ("dsv4_requests_total", "dsv4_generation_tokens_total", "dsv4_time_to_first_token_seconds_bucket",
                   "dsv4_inter_token_latency_seconds_bucket", 'dsv4_engine_queue_depth{replica="1"}',
                   'dsv4_kv_hits{replica="0",tier="device"}'):
        assert series in m.text, series
