"""Anthropic Messages through the official `anthropic` SDK (and raw SSE) against the Serve app."""

import json

import anthropic
import httpx
import pytest

MODEL = "deepseek-v4-pro"
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
DSML_CALL = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
             "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
FORCED = "Check the weather.</think>One moment." + DSML_CALL
USER = [{"role": "user", "content": "Weather in Paris?"}]


def test_non_stream_and_usage(main_app):
    client = main_app.anthropic()
    msg = client.messages.create(model=MODEL, max_tokens=10, system="Be brief.", messages=USER,
                                 thinking={"type": "disabled"}, extra_body={"ignore_eos": True, "dsv4_debug": True})
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.stop_reason == "max_tokens" and [b.type for b in msg.content] == ["text"]
    n_prompt = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=USER,
                                            thinking={"type": "disabled"}).input_tokens
    assert n_prompt == len(msg.dsv4_debug["prompt_token_ids"])
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == n_prompt
    assert msg.usage.output_tokens == 10
    assert msg.dsv4_debug["prompt"].endswith("</think>")
    thinking = client.messages.create(model=MODEL, max_tokens=4, messages=USER,
                                      thinking={"type": "enabled", "budget_tokens": 1024},
                                      extra_body={"dsv4_debug": True})
    assert thinking.dsv4_debug["prompt"].endswith("<think>")


def test_stream_equals_non_stream(main_app):
    client = main_app.anthropic()
    kw = dict(model=MODEL, max_tokens=20, messages=USER, extra_body={"seed": 99, "temperature": 0.7})
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    def texts(m):
        return [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content
                if b.type != "text" or b.text]
    assert texts(final) == texts(full)
    assert final.usage.output_tokens == full.usage.output_tokens > 0
    assert final.stop_reason == full.stop_reason


def test_tool_use_and_exact_event_sequence(main_app):
    client = main_app.anthropic()
    msg = client.messages.create(model=MODEL, max_tokens=400, messages=USER, tools=TOOLS,
                                 extra_body={"dsv4_forced_completion": FORCED})
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[0].thinking == "Check the weather." and msg.content[1].text == "One moment."
    tool = msg.content[2]
    assert tool.name == "get_weather" and tool.input == {"city": "Paris"} and tool.id.startswith("toolu_")
    assert msg.stop_reason == "tool_use"

    body = {"model": MODEL, "max_tokens": 400, "messages": USER, "tools": TOOLS, "stream": True,
            "dsv4_forced_completion": FORCED}
    events = []
    with httpx.stream("POST", main_app.url + "/anthropic/v1/messages", json=body, headers=main_app.headers(),
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                events.append(data)
    seq = []
    for e in events:  # collapse runs of the same delta kind
        key = e["type"] + (":" + e["delta"]["type"] if e["type"] == "content_block_delta" else "")
        if not seq or seq[-1] != key or not key.startswith("content_block_delta"):
            seq.append(key)
    assert seq == ["message_start", "content_block_start", "ping", "content_block_delta:thinking_delta",
                   "content_block_delta:signature_delta", "content_block_stop",
                   "content_block_start", "content_block_delta:text_delta", "content_block_stop",
                   "content_block_start", "content_block_delta:input_json_delta", "content_block_stop",
                   "message_delta", "message_stop"]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [s["type"] for s in starts] == ["thinking", "text", "tool_use"] and starts[2]["name"] == "get_weather"
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] > 0
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris"}

    # SDK stream accumulation gives the same message; then the tool result goes back
    with client.messages.stream(model=MODEL, max_tokens=400, messages=USER, tools=TOOLS,
                                extra_body={"dsv4_forced_completion": FORCED}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris"}
    history = USER + [{"role": "assistant", "content": [c.model_dump(exclude_none=True) for c in final.content]},
                      {"role": "user", "content": [
                          {"type": "tool_result", "tool_use_id": final.content[2].id, "content": "sunny"},
                          {"type": "text", "text": "Thanks"}]}]
    nxt = client.messages.create(model=MODEL, max_tokens=2, messages=history, tools=TOOLS,
                                 extra_body={"dsv4_debug": True})
    prompt = nxt.dsv4_debug["prompt"]
    assert "<tool_result>sunny</tool_result>\n\nThanks" in prompt
    assert "Check the weather.</think>One moment." in prompt  # tools defined: reasoning is kept


def test_stop_sequence(main_app):
    client = main_app.anthropic()
    msg = client.messages.create(model=MODEL, max_tokens=50, messages=USER, stop_sequences=["END"],
                                 thinking={"type": "disabled"}, extra_body={"dsv4_forced_completion": "abc END xyz"})
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "END" and msg.content[0].text == "abc "


def test_rejected_blocks_and_errors(main_app):
    client = main_app.anthropic()
    img = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": "AAAA"}}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=5, messages=img)
    assert e.value.status_code == 400 and "image" in e.value.body["error"]["message"]
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="deepseek-reasoner", max_tokens=5, messages=USER)
    assert "deepseek-v4-pro" in e.value.body["error"]["message"]
    r = httpx.post(main_app.url + "/v1/messages", json={"model": MODEL, "messages": USER},
                   headers=main_app.headers(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=main_app.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=USER)
