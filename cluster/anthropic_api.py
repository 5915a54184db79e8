"""Anthropic Messages (`POST /v1/messages`, also under `/anthropic`) and `count_tokens`.

Owns no state: converts an Anthropic body into the OpenAI-style messages the V4 chat format
takes (thinking blocks -> reasoning_content, tool_use -> tool_calls, tool_result -> tool
messages), runs it through the `ApiService`, and renders a `message` or the SSE event sequence:
    message_start, then per block content_block_start / content_block_delta... / content_block_stop
    (a ping after the first block start), message_delta (stop_reason, usage), message_stop.
Blocks come in model order: thinking, text, tool_use. Usage follows Anthropic: `input_tokens`
are the prompt tokens not read from the cache, `cache_read_input_tokens` the cached ones.
Thinking is on unless `thinking: {type: disabled}` (the V4 default, as in the OpenAI route;
`adaptive` counts as enabled). Accepted and ignored: top_k, metadata, service_tier, tool `cache_control`,
`disable_parallel_tool_use`, thinking `budget_tokens`. Image and document blocks are rejected.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse

from cluster.api_service import ApiService
from cluster.errors import ANTHROPIC, APIError, error_body, invalid
from cluster.generation import Generation, Usage
from cluster.params import Body

_EFFORTS = ("low", "medium", "high", "xhigh", "max")
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


@dataclass
class MessagesRequest:
    model: str
    is_stream: bool
    prompt_text: str
    prompt_token_ids: list[int]
    is_thinking: bool
    is_debug: bool
    sampling: dict
    cache_salt: str


def _text_of(blocks, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise invalid(f"{where} must be a string or an array of content blocks", where)
    parts = []
    for i, blk in enumerate(blocks):
        bb = Body(blk, f"{where}[{i}]")
        kind = bb.str("type", required=True)
        if kind != "text":
            raise invalid(f"{where}[{i}]: content block type {kind!r} is not supported here", where)
        parts.append(bb.str("text", ""))
    return "".join(parts)


def convert_messages(b: Body) -> tuple[list[dict], list | None]:
    """Anthropic system + messages + tools -> (OpenAI-style messages, tools)."""
    out: list[dict] = []
    system = b.raw("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of(system, "system")})
    messages = b.list("messages", required=True, non_empty=True)
    for i, m in enumerate(messages):
        mb = Body(m, f"messages[{i}]")
        role = mb.str("role", required=True, choices=("user", "assistant"))
        content = mb.raw("content")
        if content is None:
            raise invalid(f"'messages[{i}].content' is required", f"messages[{i}].content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise invalid(f"'messages[{i}].content' must be a string or an array", f"messages[{i}].content")
        text, reasoning, calls, results = [], [], [], []
        for j, blk in enumerate(blocks):
            bb = Body(blk, f"messages[{i}].content[{j}]")
            kind = bb.str("type", required=True)
            if kind == "text":
                text.append(bb.str("text", ""))
            elif kind == "thinking" and role == "assistant":
                reasoning.append(bb.str("thinking", ""))
            elif kind == "redacted_thinking" and role == "assistant":
                pass
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": bb.str("id", required=True), "type": "function",
                              "function": {"name": bb.str("name", required=True),
                                           "arguments": bb.obj("input").data if bb.has("input") else {}}})
            elif kind == "tool_result" and role == "user":
                result = _text_of(bb.raw("content", ""), f"messages[{i}].content[{j}].content")
                if bb.bool("is_error"):
                    result = "Error: " + result
                results.append({"role": "tool", "tool_call_id": bb.str("tool_use_id", required=True),
                                "content": result})
            elif kind in ("image", "document"):
                raise invalid(f"messages[{i}].content[{j}]: {kind} blocks are not supported by this model "
                              "(text only)", f"messages[{i}].content")
            else:
                raise invalid(f"messages[{i}].content[{j}]: block type {kind!r} is not allowed in a {role} "
                              "message", f"messages[{i}].content")
        if role == "assistant":
            msg = {"role": "assistant", "content": "".join(text)}
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        else:
            out.extend(results)
            if text or not results:
                out.append({"role": "user", "content": "".join(text)})
    tools = b.list("tools", max_len=512)
    if tools:
        for k, t in enumerate(tools):
            tb = Body(t, f"tools[{k}]")
            tb.str("name", required=True)
            tb.obj("input_schema", required=True)
    choice = b.obj("tool_choice")
    if choice is not None and tools:
        kind = choice.str("type", required=True, choices=("auto", "any", "tool", "none"))
        if kind == "none":
            tools = None
        elif kind == "tool":
            name = choice.str("name", required=True)
            tools = [t for t in tools if t.get("name") == name]
            if not tools:
                raise invalid(f"tool_choice names tool {name!r}, which is not in 'tools'", "tool_choice")
    return out, (tools or None)


def parse_messages(service: ApiService, data, *, is_counting: bool = False) -> MessagesRequest:
    b = Body(data)
    model = service.check_model(b.str("model", required=True))
    max_tokens = None if is_counting else b.int("max_tokens", required=True, lo=1)
    messages, tools = convert_messages(b)
    if len(b.raw("messages")) > service.config.max_messages:
        raise invalid(f"'messages' has {len(b.raw('messages'))} items; at most "
                      f"{service.config.max_messages} are allowed", "messages")
    thinking = b.obj("thinking")
    is_thinking = True
    if thinking is not None:
        is_thinking = thinking.str("type", required=True, choices=("enabled", "disabled", "adaptive")) != "disabled"
        thinking.int("budget_tokens", lo=0)
    effort = None
    oc = b.obj("output_config")
    if oc is not None:
        effort = oc.str("effort", None, choices=_EFFORTS)
    temperature = b.float("temperature", 1.0, lo=0.0, hi=1.0)
    top_p = b.float("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
    b.int("top_k", lo=0)  # accepted, ignored
    stop = b.stop_strings("stop_sequences")
    is_debug = b.bool("dsv4_debug")
    if is_debug and not service.config.is_test_hooks_enabled:
        raise invalid("'dsv4_debug' is a test hook and is disabled on this server")
    forced = None if is_counting else service.forced_token_ids(b)
    prompt_text, prompt_ids = service.encode_prompt(messages, is_thinking=is_thinking, reasoning_effort=effort,
                                                    tools=tools, response_format=None)
    if is_counting:
        return MessagesRequest(model, False, prompt_text, prompt_ids, is_thinking, False, {}, "")
    new_tokens = service.new_tokens(len(prompt_ids), max_tokens, "max_tokens")
    sampling = dict(max_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=0, seed=b.int("seed"),
                    stop=stop, is_eos_ignored=b.bool("ignore_eos"), forced_token_ids=forced)
    return MessagesRequest(model, b.bool("stream"), prompt_text, prompt_ids, is_thinking, is_debug, sampling,
                           b.str("cache_salt", ""))


# ---- rendering ------------------------------------------------------------------------------

def usage_json(u: Usage, *, is_final: bool = True) -> dict:
    return {"input_tokens": u.num_uncached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": u.num_cached_tokens,
            "output_tokens": u.num_completion_tokens if is_final else 0}


def _signature(thinking: str) -> str:
    """Opaque, deterministic signature for a thinking block (clients send it back unchanged)."""
    return hashlib.blake2b(thinking.encode("utf-8"), digest_size=24).hexdigest()


def _tool_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


def _stop(d_finish: str | None, stop_sequence: str | None) -> tuple[str, str | None]:
    if d_finish == "stop" and stop_sequence is not None:
        return "stop_sequence", stop_sequence
    return _STOP.get(d_finish or "stop", "end_turn"), None


async def complete(service: ApiService, req: MessagesRequest, gen: Generation) -> JSONResponse:
    thinking, text, calls, finish, stop_seq = [], [], [], None, None
    async for d in gen.deltas():
        thinking.append(d.reasoning)
        text.append(d.content)
        calls += d.tool_calls
        if d.finish_reason:
            finish, stop_seq = d.finish_reason, d.stop_sequence
    content = []
    t = "".join(thinking)
    if t:  # as in the stream: a block only when there is thinking text
        content.append({"type": "thinking", "thinking": t, "signature": _signature(t)})
    if "".join(text) or not calls:
        content.append({"type": "text", "text": "".join(text)})
    for c in calls:
        content.append({"type": "tool_use", "id": _tool_id(), "name": c.name, "input": json.loads(c.arguments)})
    stop_reason, stop_sequence = _stop(finish, stop_seq)
    body = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "model": req.model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": usage_json(gen.usage)}
    if req.is_debug:
        body["dsv4_debug"] = {"prompt": req.prompt_text, "prompt_token_ids": req.prompt_token_ids,
                              "replica": gen.replica}
    return JSONResponse(body)


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


def stream(service: ApiService, req: MessagesRequest, gen: Generation) -> StreamingResponse:
    async def body():
        index, open_kind, has_pinged = -1, None, False
        thinking_text: list[str] = []

        def close_block():
            out = []
            if open_kind == "thinking":
                out.append(_event("content_block_delta", {"index": index, "delta": {
                    "type": "signature_delta", "signature": _signature("".join(thinking_text))}}))
            out.append(_event("content_block_stop", {"index": index}))
            return out

        try:
            start = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
                     "model": req.model, "content": [], "stop_reason": None, "stop_sequence": None,
                     "usage": usage_json(gen.usage, is_final=False)}
            yield _event("message_start", {"message": start})
            finish, stop_seq = None, None
            async for d in gen.deltas():
                pieces = [("thinking", d.reasoning), ("text", d.content)] + [("tool_use", c) for c in d.tool_calls]
                for kind, value in pieces:
                    if not value:
                        continue
                    if kind != open_kind or kind == "tool_use":
                        if open_kind is not None:
                            for e in close_block():
                                yield e
                        index, open_kind = index + 1, kind
                        block = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                                 "text": {"type": "text", "text": ""}}.get(kind) or {
                            "type": "tool_use", "id": _tool_id(), "name": value.name, "input": {}}
                        yield _event("content_block_start", {"index": index, "content_block": block})
                        if not has_pinged:
                            has_pinged = True
                            yield _event("ping", {})
                    if kind == "thinking":
                        thinking_text.append(value)
                        delta = {"type": "thinking_delta", "thinking": value}
                    elif kind == "text":
                        delta = {"type": "text_delta", "text": value}
                    else:
                        delta = {"type": "input_json_delta", "partial_json": value.arguments}
                    yield _event("content_block_delta", {"index": index, "delta": delta})
                if d.finish_reason:
                    finish, stop_seq = d.finish_reason, d.stop_sequence
            if open_kind is not None:
                for e in close_block():
                    yield e
            elif not has_pinged:
                yield _event("ping", {})
            stop_reason, stop_sequence = _stop(finish, stop_seq)
            yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": usage_json(gen.usage)})
            yield _event("message_stop", {})
        except APIError as e:
            yield f"event: error\ndata: {json.dumps(error_body(ANTHROPIC, e))}\n\n"
        except Exception:
            yield f"event: error\ndata: {json.dumps(error_body(ANTHROPIC, APIError(500, 'internal error')))}\n\n"
        finally:
            await gen.close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
