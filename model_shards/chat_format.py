"""The DeepSeek-V4 chat format: OpenAI-style messages -> prompt text, and model output text ->
reasoning / content / tool calls (one-shot `parse_completion` and streaming `StreamParser`).

Pure functions over strings; token ids are the tokenizer's business (`model_shards.tokenizer`),
the DSML tool-call markup is in `model_shards.dsml`. Written from the facts in
`shared/reference/dsv4-chat-format.md`.

Prompt layout:
    BOS, then each message in order:
      system     its text; + "\\n\\n## Tools ..." / "\\n\\n## Response Format ..." sections
      user       <｜User｜> + text            (developer is rendered the same way)
      tool       folded into the next user turn as <tool_result>...</tool_result> blocks
      assistant  <｜Assistant｜> + MARK + [reasoning + </think>] + content
                 + ["\\n\\n" + DSML tool_calls block] + EOS
    generation prompt: <｜Assistant｜><think> (thinking) or <｜Assistant｜></think> (chat).

Decisions on historical assistant turns (MARK above):
  * thinking mode, reasoning kept (turn after the last user/developer message, or tools defined
    anywhere): MARK = <think>, then reasoning (possibly "") + </think>. This reproduces exactly the
    text the model generated after a `<｜Assistant｜><think>` generation prompt, so the prompt of
    the next request shares the previous one as a prefix (prefix caching).
  * thinking mode, reasoning dropped, and every turn in chat mode: MARK = </think>, then content
    only (reasoning is never rendered in chat mode: the model produced none there).
  * Reasoning effort "max" puts a fixed paragraph (REASONING_EFFORT_MAX_PROMPT) first in the
    leading system text, in thinking mode only (the effort means nothing in chat mode).
    That paragraph and request-level tools / response_format go to the first message when it is
    a system message, else to a system part created right after BOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from model_shards.dsml import (
    TOOL_CALLS_END, TOOL_CALLS_START, ChatFormatError, ToolCall, parse_tool_calls_block,
    render_tool_calls,
)
from model_shards.tokenizer import (
    ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, THINK_END, THINK_START, USER_TOKEN,
)

__all__ = [
    "ChatFormatError", "ToolCall", "ParsedCompletion", "Delta", "StreamParser",
    "encode_messages", "parse_completion", "render_tool_calls", "normalize_reasoning_effort",
    "REASONING_EFFORT_MAX_PROMPT",
]

REASONING_EFFORT_MAX_PROMPT = (
    "Reasoning effort: maximum. Think as long and as carefully as the problem needs: explore "
    "alternative approaches, check each step, and verify the final answer before replying."
)

TOOLS_SECTION_HEADER = f"""## Tools

You can call the tools listed below. To call tools, end your reply with one block of this form:

{TOOL_CALLS_START}
<｜DSML｜invoke name="TOOL_NAME">
<｜DSML｜parameter name="ARGUMENT_NAME" string="true">a string value, written as is</｜DSML｜parameter>
<｜DSML｜parameter name="ARGUMENT_NAME" string="false">any other value as JSON: number, boolean, null, array or object</｜DSML｜parameter>
</｜DSML｜invoke>
{TOOL_CALLS_END}

Several invoke elements in one block call several tools. Use string="true" only for string values. \
The results come back in the next user turn as <tool_result>...</tool_result> blocks, in the order of the calls.

Available tools, one JSON schema per line:"""

_EFFORTS = {"high": "high", "max": "max", "low": "high", "medium": "high", "xhigh": "max"}
_ROLES = ("system", "developer", "user", "assistant", "tool")


def normalize_reasoning_effort(effort: str | None) -> str:
    """Map an API effort to "high" or "max": low/medium -> high, xhigh -> max (as the DeepSeek
    API does); None means the default, high."""
    if effort is None:
        return "high"
    if isinstance(effort, str) and effort in _EFFORTS:
        return _EFFORTS[effort]
    raise ChatFormatError(
        f"unsupported reasoning_effort {effort!r}: expected one of {', '.join(_EFFORTS)}")


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, None, or a list of {"type": "text"} parts
    (concatenated as they are, the OpenAI meaning of several text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(
                    f"{where}: content part of type {kind!r} is not supported (only 'text')")
            if not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{where}: text content part needs a string 'text'")
            out.append(part["text"])
        return "".join(out)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts")


def _tool_schema_line(tool: Any) -> str:
    if not isinstance(tool, dict):
        raise ChatFormatError(f"tool definition must be an object, got {tool!r}")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError(f"tool definition needs a function name: {tool!r}")
    if "input_schema" in fn and "parameters" not in fn:  # Anthropic shape
        fn = {k: v for k, v in fn.items() if k not in ("input_schema", "cache_control")}
        fn["parameters"] = tool["input_schema"]
    return json.dumps(fn, ensure_ascii=False)


def _response_format_section(rf: Any) -> str | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ChatFormatError(f"response_format must be an object, got {rf!r}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "## Response Format\n\nReply with one valid JSON object and nothing else."
    if kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ChatFormatError("response_format json_schema needs a 'schema' object")
    else:
        schema = rf  # a bare JSON schema
    return ("## Response Format\n\nReply with one JSON value that follows this schema, and "
            "nothing else:\n" + json.dumps(schema, ensure_ascii=False))


def _system_text(text: str, tools: list, response_format: Any, prefix: str | None) -> str:
    parts = [prefix] if prefix else []
    if text:
        parts.append(text)
    if tools:
        parts.append(TOOLS_SECTION_HEADER + "\n" + "\n".join(_tool_schema_line(t) for t in tools))
    rf = _response_format_section(response_format)
    if rf:
        parts.append(rf)
    return "\n\n".join(parts)


def _tool_results(group: list[tuple[int, dict]], calls: list) -> str:
    """Tool messages -> <tool_result> blocks in the order of the assistant's calls."""
    ids = [c.get("id") if isinstance(c, dict) else None for c in calls]
    keyed = []
    for pos, (idx, msg) in enumerate(group):
        ref = msg.get("tool_call_id")
        if ref is None:
            order = pos  # no id: assume the results come in call order
        elif ref in ids:
            order = ids.index(ref)
        else:
            raise ChatFormatError(
                f"messages[{idx}]: tool_call_id {ref!r} matches no call of the preceding "
                "assistant message")
        content = _text(msg.get("content"), f"messages[{idx}]")
        keyed.append((order, f"<tool_result>{content}</tool_result>"))
    keyed.sort(key=lambda kv: kv[0])  # stable: duplicates keep their arrival order
    return "\n\n".join(block for _, block in keyed)


def encode_messages(
    messages: list[dict], *, thinking: bool = True, reasoning_effort: str | None = "high",
    tools: list | None = None, response_format: Any = None, add_generation_prompt: bool = True,
) -> str:
    """The V4 prompt text (with special-token strings, starting with BOS) for `messages`."""
    effort = normalize_reasoning_effort(reasoning_effort)
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}] must be an object")
        if m.get("role") not in _ROLES:
            raise ChatFormatError(
                f"messages[{i}]: unknown role {m.get('role')!r} (expected one of {', '.join(_ROLES)})")

    tools = list(tools or [])
    keep_all_reasoning = bool(tools) or any(m.get("tools") for m in messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")),
                    default=-1)
    max_prefix = REASONING_EFFORT_MAX_PROMPT if thinking and effort == "max" else None

    out = [BOS_TOKEN]
    if messages[0]["role"] != "system" and (tools or response_format is not None or max_prefix):
        out.append(_system_text("", tools, response_format, max_prefix))
        tools, response_format, max_prefix = [], None, None

    pending_results: str | None = None  # tool results waiting for the next user turn
    prev_calls: list = []  # tool_calls of the last assistant message, for ordering results
    i = 0
    while i < len(messages):
        msg, role = messages[i], messages[i]["role"]
        if role == "tool":
            group = []
            while i < len(messages) and messages[i]["role"] == "tool":
                group.append((i, messages[i]))
                i += 1
            if not prev_calls:
                raise ChatFormatError(
                    f"messages[{group[0][0]}]: tool message without a preceding assistant "
                    "message that has tool_calls")
            pending_results = _tool_results(group, prev_calls)
            prev_calls = []
            if i < len(messages) and messages[i]["role"] in ("user", "developer"):
                continue  # folded into that user turn below
            out.append(USER_TOKEN + pending_results)
            pending_results = None
            continue

        prev_calls = []
        where = f"messages[{i}]"
        if role == "system":
            sys_tools = list(msg.get("tools") or [])
            rf = msg.get("response_format")
            if i == 0:  # the leading system message also carries the request-level settings
                sys_tools += tools
                rf = response_format if response_format is not None else rf
            out.append(_system_text(_text(msg.get("content"), where), sys_tools, rf,
                                    max_prefix if i == 0 else None))
        elif role in ("user", "developer"):
            text = _text(msg.get("content"), where)
            if pending_results is not None:
                text = pending_results + ("\n\n" + text if text else "")
                pending_results = None
            out.append(USER_TOKEN + text)
        else:  # assistant
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatFormatError(f"{where}: tool_calls must be a list")
            keep = thinking and (keep_all_reasoning or i > last_user)
            body = _text(msg.get("content"), where)
            if calls:
                body += "\n\n" + render_tool_calls(calls)
            if keep:
                reasoning = _text(msg.get("reasoning_content"), where + ".reasoning_content")
                out.append(ASSISTANT_TOKEN + THINK_START + reasoning + THINK_END + body + EOS_TOKEN)
            else:
                out.append(ASSISTANT_TOKEN + THINK_END + body + EOS_TOKEN)
            prev_calls = calls
        i += 1

    if add_generation_prompt:
        out.append(ASSISTANT_TOKEN + (THINK_START if thinking else THINK_END))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Output parsing
#
# One state machine serves both the one-shot and the streaming parser, so the two cannot drift:
# `parse_completion(text)` is `feed(text) + finish()`. The streaming side only adds hold-back:
# text that might be the start of a tag (`</think>`, `<｜DSML｜tool_calls>`, EOS) waits until
# more text decides it, and whitespace before a possible tool_calls block waits too, because it
# is the separator that the block swallows.
#
# Grammar: thinking mode = reasoning [</think> body]; chat mode = body. body = content text up to
# EOS, or up to the end of the first well-formed tool_calls block (the turn ends there: anything
# after it, such as an imagined tool result, is ignored). Whitespace right before a well-formed
# block is dropped. A malformed or unterminated block is content, verbatim, and parsing goes on.
# ---------------------------------------------------------------------------------------------


@dataclass
class ParsedCompletion:
    reasoning: str | None  # None in chat mode; in thinking mode "" when there was none
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Delta:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    tool_call: ToolCall | None = None


def _partial_tag_len(text: str, tags: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for k in range(min(len(text), len(tag) - 1), best, -1):
            if tag.startswith(text[-k:]):
                best = k
                break
    return best


class StreamParser:
    """Incremental parser of model output text: `feed(text)` and `finish()` return Deltas."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self._state = "reasoning" if thinking else "content"  # then "block", "done"
        self._buf = ""
        self._block_at = 0  # in "block" state: index of TOOL_CALLS_START in _buf
        self._scan = 0      # in "block" state: where the search for the block's end resumes

    @property
    def done(self) -> bool:
        """True once EOS or a complete tool_calls block was seen: later text is ignored, so the
        caller may stop generating."""
        return self._state == "done"

    def feed(self, text: str) -> list[Delta]:
        if self._state == "done":
            return []
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Delta]:
        out = self._run(final=True)
        self._state, self._buf = "done", ""
        return out

    def _run(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        step = {"reasoning": self._step_reasoning, "content": self._step_content,
                "block": self._step_block}
        while self._state in step and step[self._state](final, out):
            pass
        return out

    def _emit(self, out: list[Delta], kind: str, text: str) -> None:
        if text:
            out.append(Delta(kind, text))

    def _finish_at(self, out: list[Delta], kind: str, stop: int) -> bool:
        self._emit(out, kind, self._buf[:stop])
        self._state, self._buf = "done", ""
        return False

    # Each step consumes what it can decide; it returns True when the state changed and the
    # next step should run on the rest of the buffer, False when it needs more text.
    def _step_reasoning(self, final: bool, out: list[Delta]) -> bool:
        buf = self._buf
        end, eos = buf.find(THINK_END), buf.find(EOS_TOKEN)
        if end >= 0 and (eos < 0 or end < eos):
            self._emit(out, "reasoning", buf[:end])
            self._buf, self._state = buf[end + len(THINK_END):], "content"
            return True
        if eos >= 0:
            return self._finish_at(out, "reasoning", eos)
        keep = 0 if final else _partial_tag_len(buf, (THINK_END, EOS_TOKEN))
        self._emit(out, "reasoning", buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _step_content(self, final: bool, out: list[Delta]) -> bool:
        buf = self._buf
        start, eos = buf.find(TOOL_CALLS_START), buf.find(EOS_TOKEN)
        if eos >= 0 and (start < 0 or eos < start):
            return self._finish_at(out, "content", eos)
        if start >= 0:
            head = buf[:start].rstrip()  # trailing whitespace waits: the block may swallow it
            self._emit(out, "content", head)
            self._buf = buf[len(head):]
            self._block_at = start - len(head)
            self._scan = self._block_at + len(TOOL_CALLS_START)
            self._state = "block"
            return True
        if final:
            return self._finish_at(out, "content", len(buf))
        keep = _partial_tag_len(buf, (TOOL_CALLS_START, EOS_TOKEN))
        head = buf[:len(buf) - keep].rstrip()
        self._emit(out, "content", head)
        self._buf = buf[len(head):]
        return False

    def _step_block(self, final: bool, out: list[Delta]) -> bool:
        # _buf = separator whitespace + the block so far (and maybe text after it).
        buf = self._buf
        end, eos = buf.find(TOOL_CALLS_END, self._scan), buf.find(EOS_TOKEN, self._scan)
        if end >= 0 and (eos < 0 or end < eos):
            stop = end + len(TOOL_CALLS_END)
            calls = parse_tool_calls_block(buf[self._block_at:stop])
            if calls:
                out.extend(Delta("tool_call", tool_call=c) for c in calls)
                self._state, self._buf = "done", ""
                return False
            self._emit(out, "content", buf[:stop])  # malformed: verbatim, separator included
            self._buf, self._state = buf[stop:], "content"
            return True
        if eos >= 0 or final:  # unterminated block: content, verbatim
            return self._finish_at(out, "content", eos if eos >= 0 else len(buf))
        # Resume the search where a tag split across feeds could begin.
        longest = max(len(TOOL_CALLS_END), len(EOS_TOKEN))
        self._scan = max(self._scan, len(buf) - longest + 1)
        return False


def parse_completion(text: str, *, thinking: bool) -> ParsedCompletion:
    """Split generated text into reasoning, content and tool calls (see the grammar above)."""
    parser = StreamParser(thinking)
    deltas = parser.feed(text) + parser.finish()
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    return ParsedCompletion(
        reasoning=reasoning if thinking else None,
        content="".join(d.text for d in deltas if d.kind == "content"),
        tool_calls=[d.tool_call for d in deltas if d.kind == "tool_call"],
    )
