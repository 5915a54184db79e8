"""Tests for model_shards.chat_format / model_shards.dsml: golden V4 prompts, DSML rendering,
completion parsing, and the streaming parser's split invariance."""

import json
import random
import zlib

import pytest

from model_shards.chat_format import (
    ChatFormatError, Delta, ParsedCompletion, StreamParser, ToolCall, encode_messages,
    normalize_reasoning_effort, parse_completion, render_tool_calls,
)
from model_shards.dsml import parse_tool_calls_block

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

TOOLS_SECTION = """## Tools

You can call the tools listed below. To call tools, end your reply with one block of this form:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="TOOL_NAME">
<｜DSML｜parameter name="ARGUMENT_NAME" string="true">a string value, written as is</｜DSML｜parameter>
<｜DSML｜parameter name="ARGUMENT_NAME" string="false">any other value as JSON: number, boolean, null, array or object</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls>

Several invoke elements in one block call several tools. Use string="true" only for string values. \
The results come back in the next user turn as <tool_result>...</tool_result> blocks, in the order of the calls.

Available tools, one JSON schema per line:
{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
{"name": "get_time", "parameters": {"type": "object"}}"""

MAX_PARAGRAPH = ("Reasoning effort: maximum. Think as long and as carefully as the problem needs: "
                 "explore alternative approaches, check each step, and verify the final answer "
                 "before replying.")


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# --------------------------------------------------------------------------- prompts

def test_generation_prompt_thinking_and_chat():
    msgs = [{"role": "user", "content": "hi"}]
    assert encode_messages(msgs) == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>"
    assert encode_messages(msgs, thinking=False) == \
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>"
    assert encode_messages(msgs, add_generation_prompt=False) == \
        "<｜begin▁of▁sentence｜><｜User｜>hi"


def test_text_parts_and_developer_role():
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert encode_messages(msgs) == "<｜begin▁of▁sentence｜><｜User｜>ab<｜Assistant｜><think>"


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add"},
    {"role": "user", "content": "times 3?"},
    {"role": "assistant", "content": "12", "reasoning_content": "multiply"},
]


def test_multi_turn_drops_reasoning_before_last_user():
    assert encode_messages(CONVERSATION, add_generation_prompt=False) == (
        "<｜begin▁of▁sentence｜>You are terse."
        "<｜User｜>2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>"
        "<｜User｜>times 3?<｜Assistant｜><think>multiply</think>12<｜end▁of▁sentence｜>")
    follow_up = CONVERSATION + [{"role": "user", "content": "minus 1?"}]
    assert encode_messages(follow_up) == (
        "<｜begin▁of▁sentence｜>You are terse."
        "<｜User｜>2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>"
        "<｜User｜>times 3?<｜Assistant｜></think>12<｜end▁of▁sentence｜>"
        "<｜User｜>minus 1?<｜Assistant｜><think>")


def test_chat_mode_never_renders_reasoning():
    assert encode_messages(CONVERSATION, thinking=False, tools=[TIME_TOOL]).endswith(
        "<｜User｜>times 3?<｜Assistant｜></think>12<｜end▁of▁sentence｜><｜Assistant｜></think>")


def test_reasoning_kept_when_tools_defined():
    expected_turns = (
        "<｜User｜>2+2?<｜Assistant｜><think>add</think>4<｜end▁of▁sentence｜>"
        "<｜User｜>times 3?<｜Assistant｜><think>multiply</think>12<｜end▁of▁sentence｜>"
        "<｜User｜>more<｜Assistant｜><think>")
    msgs = CONVERSATION + [{"role": "user", "content": "more"}]
    assert encode_messages(msgs, tools=[WEATHER_TOOL, TIME_TOOL]) == (
        BOS + "You are terse.\n\n" + TOOLS_SECTION + expected_turns)
    # tools carried by a message count too
    with_msg_tools = [dict(msgs[0], tools=[WEATHER_TOOL, TIME_TOOL])] + msgs[1:]
    assert encode_messages(with_msg_tools) == BOS + "You are terse.\n\n" + TOOLS_SECTION + expected_turns


def test_tools_section_created_without_system_message():
    prompt = encode_messages([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL, TIME_TOOL])
    assert prompt == BOS + TOOLS_SECTION + "<｜User｜>hi<｜Assistant｜><think>"
    schema_lines = prompt.split("one JSON schema per line:\n")[1].split("<｜User｜>")[0].split("\n")
    assert [json.loads(line)["name"] for line in schema_lines] == ["get_weather", "get_time"]


def test_tool_results_folded_in_call_order():
    msgs = [
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "two tools",
         "tool_calls": [call("c1", "get_weather", {"city": "Paris"}), call("c2", "get_time", {})]},
        {"role": "tool", "tool_call_id": "c2", "content": "10:00"},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "rain"}]},
    ]
    assistant = (
        "<｜Assistant｜><think>two tools</think>Checking.\n\n"
        "<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n"
        "<｜DSML｜invoke name=\"get_time\">\n"
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    results = "<tool_result>rain</tool_result>\n\n<tool_result>10:00</tool_result>"
    # no user message after the results: they form a user turn by themselves
    assert encode_messages(msgs) == (
        BOS + "<｜User｜>weather and time?" + assistant
        + "<｜User｜>" + results + "<｜Assistant｜><think>")
    # a following user message gets the results folded in front of its text
    msgs2 = msgs + [{"role": "user", "content": "thanks"}]
    assert encode_messages(msgs2, thinking=False) == (
        BOS + "<｜User｜>weather and time?"
        + assistant.replace("<think>two tools</think>", "</think>")
        + "<｜User｜>" + results + "\n\nthanks<｜Assistant｜></think>")


def test_effort_max_paragraph():
    sys_first = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert encode_messages(sys_first, reasoning_effort="max") == (
        BOS + MAX_PARAGRAPH + "\n\nS<｜User｜>q<｜Assistant｜><think>")
    user_first = [{"role": "user", "content": "q"}]
    assert encode_messages(user_first, reasoning_effort="max") == (
        BOS + MAX_PARAGRAPH + "<｜User｜>q<｜Assistant｜><think>")
    assert encode_messages(user_first, reasoning_effort="max", tools=[WEATHER_TOOL, TIME_TOOL]) == (
        BOS + MAX_PARAGRAPH + "\n\n" + TOOLS_SECTION + "<｜User｜>q<｜Assistant｜><think>")
    assert encode_messages(user_first, reasoning_effort="xhigh") == \
        encode_messages(user_first, reasoning_effort="max")
    for effort in ("high", "low", "medium", None):
        assert encode_messages(user_first, reasoning_effort=effort) == \
            BOS + "<｜User｜>q<｜Assistant｜><think>"
    # the effort only shapes thinking; chat mode gets no paragraph
    assert encode_messages(user_first, thinking=False, reasoning_effort="max") == \
        BOS + "<｜User｜>q<｜Assistant｜></think>"


def test_reasoning_effort_normalization_and_errors():
    assert [normalize_reasoning_effort(e) for e in ("low", "medium", "high", "xhigh", "max")] == \
        ["high", "high", "high", "max", "max"]
    for bad in ("extreme", "HIGH", 3):
        with pytest.raises(ValueError, match="reasoning_effort"):
            encode_messages([{"role": "user", "content": "q"}], reasoning_effort=bad)


def test_response_format_section():
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"answer": {"type": "integer"}}}}}
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs, response_format=rf) == (
        BOS + "S\n\n## Response Format\n\nReply with one JSON value that follows this schema, "
        "and nothing else:\n{\"type\": \"object\", \"properties\": {\"answer\": {\"type\": \"integer\"}}}"
        "<｜User｜>q<｜Assistant｜><think>")
    assert encode_messages(msgs[1:], response_format={"type": "json_object"}) == (
        BOS + "## Response Format\n\nReply with one valid JSON object and nothing else."
        "<｜User｜>q<｜Assistant｜><think>")
    assert encode_messages(msgs, response_format={"type": "text"}) == encode_messages(msgs)


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "a", "content": "r"}],
     "without a preceding assistant"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": "", "tool_calls": [call("a", "f", {})]},
      {"role": "tool", "tool_call_id": "zzz", "content": "r"}], "matches no call"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
     "'image_url' is not supported"),
    ([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
     "not valid JSON"),
    ([], "non-empty"),
])
def test_invalid_input_raises(msgs, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_messages(msgs)


def test_prompt_is_prefix_stable_across_turns():
    """Prompt(turn n) + generated text == prompt of the history including that reply, so the
    next request reuses the previous one's KV cache."""
    msgs = [{"role": "user", "content": "weather?"}]
    prompt = encode_messages(msgs, tools=[WEATHER_TOOL])
    calls = [call("c1", "get_weather", {"city": "Oslo"})]
    generated = "need data</think>Let me look.\n\n" + render_tool_calls(calls) + EOS
    parsed = parse_completion(generated, thinking=True)
    reply = {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": c.name, "arguments": c.arguments}}
                            for c in parsed.tool_calls]}
    assert encode_messages(msgs + [reply], tools=[WEATHER_TOOL], add_generation_prompt=False) == \
        prompt + generated


# --------------------------------------------------------------------------- DSML

def test_render_tool_calls_argument_types():
    args = {"s": "line1\nline2 \"q\"", "n": 3, "f": 1.5, "b": True, "z": None,
            "o": {"k": [1, "两"]}, "a": [1, 2]}
    assert render_tool_calls([call("x", "f", args)]) == (
        "<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"f\">\n"
        "<｜DSML｜parameter name=\"s\" string=\"true\">line1\nline2 \"q\"</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"n\" string=\"false\">3</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"f\" string=\"false\">1.5</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"b\" string=\"false\">true</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"z\" string=\"false\">null</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"o\" string=\"false\">{\"k\": [1, \"两\"]}</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"a\" string=\"false\">[1, 2]</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>")
    # dict arguments (Anthropic tool_use input) and ToolCall objects render the same way
    assert render_tool_calls([{"name": "f", "input": args}]) == render_tool_calls([call("x", "f", args)])
    assert render_tool_calls([ToolCall("f", json.dumps(args))]) == render_tool_calls([call("x", "f", args)])


def test_render_parse_round_trip():
    calls = [call("1", "search", {"q": "深度 \"求索\"", "k": 5, "exact": False}),
             call("2", "noop", {}), call("3", "nested", {"x": {"y": [None, 1.25, "s"]}})]
    text = "Thinking...</think>I'll search." + "\n\n" + render_tool_calls(calls) + EOS
    parsed = parse_completion(text, thinking=True)
    assert parsed.reasoning == "Thinking..." and parsed.content == "I'll search."
    assert [c.name for c in parsed.tool_calls] == ["search", "noop", "nested"]
    assert [json.loads(c.arguments) for c in parsed.tool_calls] == \
        [json.loads(c["function"]["arguments"]) for c in calls]


MALFORMED = [
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
    "<｜DSML｜parameter name=\"n\" string=\"false\">{bad json</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    "<｜DSML｜tool_calls>\nstray text\n</｜DSML｜tool_calls>",
    "<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>",
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜tool_calls>",
]


@pytest.mark.parametrize("block", MALFORMED)
def test_malformed_dsml_is_content(block):
    assert parse_tool_calls_block(block) is None
    text = "answer:\n\n" + block + EOS
    assert parse_completion(text, thinking=False) == ParsedCompletion(None, "answer:\n\n" + block, [])


def test_unterminated_dsml_is_content():
    text = "r</think>hi\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">"
    assert parse_completion(text, thinking=True) == ParsedCompletion("r", text[len("r</think>"):], [])
    assert parse_completion(text + EOS + "junk", thinking=True).content == text[len("r</think>"):]


def test_parse_completion_cases():
    assert parse_completion("all reasoning, cut off", thinking=True) == \
        ParsedCompletion("all reasoning, cut off", "", [])
    assert parse_completion("</think>only content" + EOS, thinking=True) == \
        ParsedCompletion("", "only content", [])
    assert parse_completion("plain </think> text\n" + EOS + "ignored", thinking=False) == \
        ParsedCompletion(None, "plain </think> text\n", [])
    # the turn ends with a well-formed block: text after it is ignored
    block = render_tool_calls([call("1", "f", {"a": "b"})])
    assert parse_completion(block + "\n<tool_result>imagined", thinking=False) == \
        ParsedCompletion(None, "", [ToolCall("f", '{"a": "b"}')])


# --------------------------------------------------------------------------- streaming

def test_stream_parser_holds_back_partial_tags():
    p = StreamParser(thinking=True)
    assert p.feed("abc</th") == [Delta("reasoning", "abc")]
    assert p.feed("ink>Hello \n") == [Delta("content", "Hello")]
    assert p.feed("<｜DSML｜tool") == []
    deltas = p.feed("_calls>\n" + render_tool_calls([call("1", "f", {"x": 1})])[len("<｜DSML｜tool_calls>\n"):])
    assert deltas == [Delta("tool_call", tool_call=ToolCall("f", '{"x": 1}'))]
    assert p.done and p.feed("more") == [] and p.finish() == []


def test_stream_parser_releases_held_text_when_disambiguated():
    p = StreamParser(thinking=False)
    assert p.feed("a <") == [Delta("content", "a")]
    assert p.feed("b ") == [Delta("content", " <b")]
    assert p.finish() == [Delta("content", " ")]


def _collect(deltas):
    return ParsedCompletion(
        reasoning="".join(d.text for d in deltas if d.kind == "reasoning"),
        content="".join(d.text for d in deltas if d.kind == "content"),
        tool_calls=[d.tool_call for d in deltas if d.kind == "tool_call"])


STREAM_TEXTS = [
    "why</think>Because.\n\n" + render_tool_calls([call("1", "f", {"a": "x</y", "b": [1]}),
                                                     call("2", "g", {})]) + EOS,
    "r1 <think> </thi</think>c <｜DSML｜ not a block <｜end▁of▁sen" + EOS + "after",
    "reason only, with <｜DSML｜tool_calls> inside",
    "</think>" + MALFORMED[0] + " tail \n\n" + render_tool_calls([call("1", "h", {"k": True})]),
    "x</think>text\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">unterminated",
    "x</think>  \n " + EOS,
    "",
]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_parser_matches_parse_completion_for_any_split(text, thinking):
    expected = parse_completion(text, thinking=thinking)
    rng = random.Random(zlib.crc32(text.encode()))
    splits = [[text], list(text)]
    for _ in range(150):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 12))))
        splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    _check_splits(text, thinking, expected, splits)


def _check_splits(text, thinking, expected, splits):
    for pieces in splits:
        p = StreamParser(thinking)
        deltas = [d for piece in pieces for d in p.feed(piece)] + p.finish()
        got = _collect(deltas)
        assert got.content == expected.content and got.tool_calls == expected.tool_calls
        assert got.reasoning == (expected.reasoning if thinking else "")
        assert all(d.text or d.tool_call for d in deltas)


FRAGMENTS = ["a", " ", "\n", "<", "</", "</think>", "<think>", "<｜", "<｜DSML｜tool_calls>",
             "</｜DSML｜tool_calls>", '<｜DSML｜invoke name="f">', "</｜DSML｜invoke>",
             '<｜DSML｜parameter name="p" string="true">', '<｜DSML｜parameter name="q" string="false">',
             "</｜DSML｜parameter>", "1", "{", "<｜end▁of▁sentence｜>", "<｜end▁of", "你"]


def test_stream_parser_fuzz_never_raises_and_is_split_invariant():
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 25)))
        for thinking in (True, False):
            expected = parse_completion(text, thinking=thinking)
            splits = [list(text)]
            for _ in range(5):
                cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 4)))
                splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
            _check_splits(text, thinking, expected, splits)
