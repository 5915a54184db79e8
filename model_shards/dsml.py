"""DSML, the markup V4 uses for tool calls: rendering calls into a `<｜DSML｜tool_calls>` block
and parsing one such block back into structured calls.

Block layout (each invoke and parameter tag is followed by a newline):

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="ARG" string="true">raw string</｜DSML｜parameter>
    <｜DSML｜parameter name="N" string="false">42</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

String values are written raw (string="true"); every other JSON value (number, boolean, null,
array, object) as JSON with string="false". The format has no escaping, so a string value that
itself contains `</｜DSML｜parameter>` cannot be represented; such a block parses as malformed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

DSML_TOKEN = "\uff5cDSML\uff5c"
TOOL_CALLS_START = f"<{DSML_TOKEN}tool_calls>"
TOOL_CALLS_END = f"</{DSML_TOKEN}tool_calls>"
INVOKE_END = f"</{DSML_TOKEN}invoke>"
PARAMETER_END = f"</{DSML_TOKEN}parameter>"


class ChatFormatError(ValueError):
    """Input that the V4 chat format cannot represent (bad role, content part, tool call...)."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed tool call. `arguments` is the JSON text of an object (OpenAI style)."""

    name: str
    arguments: str


def _call_name_and_args(call: Any) -> tuple[str, dict]:
    """Accepts a ToolCall, an OpenAI tool call ({"function": {"name", "arguments"}}) or a flat
    {"name", "arguments"|"input"} dict; `arguments` may be JSON text or an already-decoded dict
    (Anthropic tool_use blocks carry a dict)."""
    if isinstance(call, ToolCall):
        name, args = call.name, call.arguments
    elif isinstance(call, dict):
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            raise ChatFormatError(f"tool call 'function' must be an object, got {fn!r}")
        name = fn.get("name")
        args = fn.get("arguments", fn.get("input", {}))
    else:
        raise ChatFormatError(f"tool call must be an object, got {type(call).__name__}")
    if not isinstance(name, str) or not name or '"' in name:
        raise ChatFormatError(f"tool call needs a non-empty name without quotes, got {name!r}")
    if args is None or args == "":
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"arguments of tool call {name!r} are not valid JSON: {e}") from e
    if not isinstance(args, dict):
        raise ChatFormatError(f"arguments of tool call {name!r} must be a JSON object")
    return name, args


def render_tool_calls(calls: Iterable[Any]) -> str:
    """The DSML block for `calls` (see `_call_name_and_args` for the accepted shapes)."""
    lines = [TOOL_CALLS_START]
    for call in calls:
        name, args = _call_name_and_args(call)
        lines.append(f'<{DSML_TOKEN}invoke name="{name}">')
        for key, value in args.items():
            if '"' in key:
                raise ChatFormatError(f"argument name {key!r} of {name!r} contains a quote")
            if isinstance(value, str):
                flag, text = "true", value
            else:
                flag, text = "false", json.dumps(value, ensure_ascii=False)
            lines.append(f'<{DSML_TOKEN}parameter name="{key}" string="{flag}">{text}{PARAMETER_END}')
        lines.append(INVOKE_END)
    lines.append(TOOL_CALLS_END)
    return "\n".join(lines)


_INVOKE_OPEN = re.compile(rf'<{DSML_TOKEN}invoke name="([^"]+)">')
_PARAM_OPEN = re.compile(rf'<{DSML_TOKEN}parameter name="([^"]+)" string="(true|false)">')
_WS = re.compile(r"\s*")


def parse_tool_calls_block(block: str) -> list[ToolCall] | None:
    """Parse one complete block, from TOOL_CALLS_START to TOOL_CALLS_END inclusive.

    Returns None when the block is malformed (stray text between tags, bad JSON in a
    string="false" value, duplicate argument, no invoke at all): the caller then reports the
    block text as plain content. Never raises.
    """
    if not (block.startswith(TOOL_CALLS_START) and block.endswith(TOOL_CALLS_END)):
        return None
    body = block[len(TOOL_CALLS_START):len(block) - len(TOOL_CALLS_END)]
    pos = _WS.match(body, 0).end()
    calls: list[ToolCall] = []
    while pos < len(body):
        m = _INVOKE_OPEN.match(body, pos)
        if not m:
            return None
        name, pos = m.group(1), _WS.match(body, m.end()).end()
        args: dict[str, Any] = {}
        while not body.startswith(INVOKE_END, pos):
            p = _PARAM_OPEN.match(body, pos)
            if not p:
                return None
            end = body.find(PARAMETER_END, p.end())
            if end < 0 or p.group(1) in args:
                return None
            raw = body[p.end():end]
            if p.group(2) == "true":
                args[p.group(1)] = raw
            else:
                try:
                    args[p.group(1)] = json.loads(raw)
                except json.JSONDecodeError:
                    return None
            pos = _WS.match(body, end + len(PARAMETER_END)).end()
        pos = _WS.match(body, pos + len(INVOKE_END)).end()
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls or None
