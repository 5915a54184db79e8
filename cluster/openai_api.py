"""OpenAI Chat Completions (`POST /v1/chat/completions`) in DeepSeek's dialect.

Owns no state: parses a body into a `ChatRequest`, runs it through the `ApiService`, renders
`chat.completion` / `chat.completion.chunk` objects. DeepSeek specifics: `thinking`
{type: enabled | disabled} (default enabled) and `reasoning_effort`; reasoning comes back as
`reasoning_content`; usage carries `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`
besides OpenAI's `prompt_tokens_details.cached_tokens` and
`completion_tokens_details.reasoning_tokens`. Accepted and ignored: frequency / presence
penalties, user, metadata, store, parallel_tool_calls, service_tier.
Extensions: top_k, ignore_eos, cache_salt (KV-cache tenant), and with test hooks enabled
`dsv4_forced_completion` (text the sampler is forced to produce) and `dsv4_debug` (the rendered
prompt in the response).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse

from cluster.api_service import ApiService
from cluster.errors import OPENAI, APIError, error_body, invalid
from cluster.generation import ChoiceDelta, Generation, TokenInfo, Usage
from cluster.params import Body

_EFFORTS = ("low", "medium", "high", "xhigh", "max")


@dataclass
class ChatRequest:
    model: str
    is_stream: bool
    is_usage_streamed: bool
    n: int
    prompt_text: str
    prompt_token_ids: list[int]
    is_thinking: bool
    is_logprobs: bool
    is_debug: bool
    sampling: dict           # keyword arguments of ApiService.sampling
    cache_salt: str
    affinity: str | None


def parse_chat(service: ApiService, data) -> ChatRequest:
    b = Body(data)
    model = service.check_model(b.str("model", required=True))
    messages = b.list("messages", required=True, non_empty=True, max_len=service.config.max_messages)
    is_stream = b.bool("stream")
    opts = b.obj("stream_options")
    is_usage_streamed = bool(opts and opts.bool("include_usage"))
    max_tokens = b.int("max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = b.int("max_tokens", lo=1)
    temperature = b.float("temperature", 1.0, lo=0.0, hi=2.0)
    top_p = b.float("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
    top_k = b.int("top_k", 0, lo=-1)
    n = b.int("n", 1, lo=1, hi=service.config.max_n)
    stop = b.stop_strings("stop")
    seed = b.int("seed")
    for name in ("frequency_penalty", "presence_penalty"):
        b.float(name, 0.0, lo=-2.0, hi=2.0)
    is_logprobs = b.bool("logprobs")
    num_top = b.int("top_logprobs", 0, lo=0, hi=20)
    if num_top and not is_logprobs:
        raise invalid("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    tools = _tools(b)
    tools = _apply_tool_choice(b, tools)
    response_format = None
    rf = b.obj("response_format")
    if rf is not None:
        rf.str("type", required=True, choices=("text", "json_object", "json_schema"))
        response_format = rf.data
    thinking = b.obj("thinking")
    is_thinking = True if thinking is None else thinking.str("type", "enabled", choices=("enabled", "disabled")) == "enabled"
    effort = b.str("reasoning_effort", None, choices=_EFFORTS)
    is_debug = b.bool("dsv4_debug")
    if is_debug and not service.config.is_test_hooks_enabled:
        raise invalid("'dsv4_debug' is a test hook and is disabled on this server", "dsv4_debug")
    forced = service.forced_token_ids(b)
    prompt_text, prompt_ids = service.encode_prompt(messages, is_thinking=is_thinking, reasoning_effort=effort,
                                                    tools=tools, response_format=response_format)
    new_tokens = service.new_tokens(len(prompt_ids), max_tokens,
                                    "max_completion_tokens" if b.has("max_completion_tokens") else "max_tokens")
    sampling = dict(max_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=seed,
                    stop=stop, is_eos_ignored=b.bool("ignore_eos"), is_logprobs=is_logprobs,
                    num_top_logprobs=num_top, forced_token_ids=forced)
    return ChatRequest(model, is_stream, is_usage_streamed, n, prompt_text, prompt_ids, is_thinking, is_logprobs,
                       is_debug, sampling, b.str("cache_salt", ""), b.str("prompt_cache_key"))


def _tools(b: Body) -> list | None:
    tools = b.list("tools", max_len=512)
    if not tools:
        return None
    for i, t in enumerate(tools):
        tb = Body(t, f"tools[{i}]")
        tb.str("type", "function", choices=("function",))
        fn = tb.obj("function", required=True)
        fn.str("name", required=True)
        fn.obj("parameters")
    return tools


def _apply_tool_choice(b: Body, tools: list | None) -> list | None:
    """"none" hides the tools from the model; a named function keeps only that tool; "auto" and
    "required" keep them all (DSML has no way to force a call)."""
    choice = b.raw("tool_choice")
    if choice is None or choice in ("auto", "required"):
        return tools
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = Body(Body(choice, "tool_choice").raw("function", {}), "tool_choice.function").str("name", required=True)
        chosen = [t for t in tools or [] if t["function"]["name"] == name]
        if not chosen:
            raise invalid(f"tool_choice names function {name!r}, which is not in 'tools'", "tool_choice")
        return chosen
    raise invalid("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", ...}",
                  "tool_choice")


# ---- rendering ------------------------------------------------------------------------------

def usage_json(u: Usage) -> dict:
    return {"prompt_tokens": u.num_prompt_tokens, "completion_tokens": u.num_completion_tokens,
            "total_tokens": u.num_prompt_tokens + u.num_completion_tokens,
            "prompt_cache_hit_tokens": u.num_cached_tokens, "prompt_cache_miss_tokens": u.num_uncached_tokens,
            "prompt_tokens_details": {"cached_tokens": u.num_cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.num_reasoning_tokens}}


def _logprob_json(t: TokenInfo) -> dict:
    return {"token": t.text, "logprob": t.logprob, "bytes": t.bytes,
            "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": a.bytes} for a in t.top]}


def _tool_call_json(call, index: int | None = None) -> dict:
    out = {"id": f"call_{secrets.token_hex(12)}", "type": "function",
           "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


class _Choice:
    def __init__(self, index: int):
        self.index = index
        self.reasoning, self.content, self.tool_calls, self.logprobs = [], [], [], []
        self.finish_reason = None


async def complete(service: ApiService, req: ChatRequest, gen: Generation) -> JSONResponse:
    choices = [_Choice(i) for i in range(req.n)]
    async for d in gen.deltas():
        c = choices[d.index]
        c.reasoning.append(d.reasoning)
        c.content.append(d.content)
        c.tool_calls += d.tool_calls
        c.logprobs += d.logprobs or []
        c.finish_reason = d.finish_reason or c.finish_reason
    out = []
    for c in choices:
        content = "".join(c.content)
        msg = {"role": "assistant", "content": content if content or not c.tool_calls else None,
               "reasoning_content": "".join(c.reasoning) if req.is_thinking else None}
        if c.tool_calls:
            msg["tool_calls"] = [_tool_call_json(t) for t in c.tool_calls]
        out.append({"index": c.index, "message": msg, "finish_reason": c.finish_reason,
                    "logprobs": {"content": [_logprob_json(t) for t in c.logprobs]} if req.is_logprobs else None})
    body = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": "dsv4-serve", "choices": out, "usage": usage_json(gen.usage)}
    if req.is_debug:
        body["dsv4_debug"] = debug_json(req, gen)
    return JSONResponse(body)


def debug_json(req, gen: Generation) -> dict:
    return {"prompt": req.prompt_text, "prompt_token_ids": req.prompt_token_ids, "replica": gen.replica}


def stream(service: ApiService, req: ChatRequest, gen: Generation) -> StreamingResponse:
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def chunk(choices: list, usage=None, extra: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": "dsv4-serve", "choices": choices}
        if req.is_usage_streamed:
            body["usage"] = usage
        if extra:
            body.update(extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta_json(d: ChoiceDelta, num_calls: list[int]) -> dict:
        delta: dict = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = [_tool_call_json(t, num_calls[d.index] + k) for k, t in enumerate(d.tool_calls)]
            num_calls[d.index] += len(d.tool_calls)
        return {"index": d.index, "delta": delta, "finish_reason": d.finish_reason,
                "logprobs": {"content": [_logprob_json(t) for t in d.logprobs or []]} if req.is_logprobs else None}

    async def body():
        num_calls = [0] * req.n
        try:
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)]
            yield chunk(first, extra={"dsv4_debug": debug_json(req, gen)} if req.is_debug else None)
            async for d in gen.deltas():
                yield chunk([delta_json(d, num_calls)])
            if req.is_usage_streamed:
                yield chunk([], usage_json(gen.usage))
        except APIError as e:
            yield f"data: {json.dumps(error_body(OPENAI, e))}\n\n"
        except Exception:
            yield f"data: {json.dumps(error_body(OPENAI, APIError(500, 'internal error while streaming')))}\n\n"
        finally:
            await gen.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
