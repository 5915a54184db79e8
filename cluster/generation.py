"""One API request in flight: its n engine streams, parsed into reasoning / content / tool calls.

Owns: per choice, the output parser (`StreamParser`), token counts (reasoning tokens are those
before the `</think>` token), logprobs and the finish state; per request, the usage numbers.
API-neutral: the OpenAI and Anthropic modules render `ChoiceDelta`s and `Usage` in their own
shapes, streaming or not, so both APIs (and streaming vs not) see exactly the same text.

Lifecycle: `Generation.start` sends the n requests to one Engine replica and waits for each
admission (so a 429 / 400 from the Engine becomes the HTTP status, before any body byte);
`deltas()` yields parsed pieces as tokens arrive; `close()` (always called, also when the client
goes away) cancels whatever still runs, which aborts the sequences in the Engine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from actors.engine_output import FINISH_LENGTH, FINISH_STOP
from actors.messages import Admitted, GenerateRequest, Rejected, TokenEvent
from cluster.errors import APIError
from model_shards.chat_format import StreamParser, ToolCall

FINISH_TOOL_CALLS = "tool_calls"


@dataclass
class Usage:
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_completion_tokens: int = 0
    num_reasoning_tokens: int = 0

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens


@dataclass
class TokenInfo:
    """A generated position for logprobs: the token's text, bytes, logprob and alternatives."""

    text: str
    bytes: list[int]
    logprob: float
    top: list["TokenInfo"] = field(default_factory=list)


@dataclass
class ChoiceDelta:
    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenInfo] | None = None
    finish_reason: str | None = None     # "stop" | "length" | "tool_calls"
    stop_sequence: str | None = None     # the stop string that ended the choice

    @property
    def is_empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls or self.logprobs or self.finish_reason)


class _Choice:
    def __init__(self, index: int, is_thinking: bool, think_end_id: int | None, token_info: Callable):
        self.index = index
        self.parser = StreamParser(is_thinking)
        self.is_reasoning = is_thinking
        self.think_end_id = think_end_id
        self.token_info = token_info
        self.num_tokens = 0
        self.num_reasoning_tokens = 0
        self.has_tool_calls = False
        self.finish_reason: str | None = None

    def on_event(self, ev: TokenEvent) -> ChoiceDelta:
        out = ChoiceDelta(self.index)
        for t in ev.token_ids:
            self.num_tokens += 1
            if self.is_reasoning:
                if t == self.think_end_id:
                    self.is_reasoning = False
                else:
                    self.num_reasoning_tokens += 1
        if ev.logprobs is not None:
            out.logprobs = [self.token_info(lp.token_id, lp.logprob, lp.top) for lp in ev.logprobs]
        deltas = self.parser.feed(ev.text)
        is_final = ev.finish_reason is not None or self.parser.done
        if is_final:
            deltas += self.parser.finish()
        for d in deltas:
            if d.kind == "reasoning":
                out.reasoning += d.text
            elif d.kind == "content":
                out.content += d.text
            elif d.tool_call is not None:
                out.tool_calls.append(d.tool_call)
                self.has_tool_calls = True
        if is_final:
            if ev.finish_reason not in (None, FINISH_STOP, FINISH_LENGTH):
                raise APIError(500 if ev.finish_reason == "error" else 503,
                               "generation failed in the engine" if ev.finish_reason == "error"
                               else "the engine stopped this request (shutting down)")
            if self.has_tool_calls:
                out.finish_reason = FINISH_TOOL_CALLS
            elif ev.finish_reason == FINISH_LENGTH:
                out.finish_reason = FINISH_LENGTH
            else:
                out.finish_reason = FINISH_STOP
                if isinstance(ev.stop_reason, str):
                    out.stop_sequence = ev.stop_reason
            self.finish_reason = out.finish_reason
        return out


class Generation:
    def __init__(self, streams: list[AsyncIterator], choices: list[_Choice], usage: Usage, replica: int,
                 on_tokens: Callable[[int, float | None, float], None] | None = None, arrival: float = 0.0):
        self._streams = streams
        self.choices = choices
        self.usage = usage
        self.replica = replica
        self._on_tokens = on_tokens  # (num_tokens, ttft or None, seconds since the previous event)
        self._arrival = arrival or time.monotonic()
        self._last = None
        self._tasks: list[asyncio.Task] = []
        self._is_closed = False
        self.on_close: Callable[[], None] | None = None  # called once by close()

    @classmethod
    async def start(cls, pool, replica: int, requests: list[GenerateRequest], *, is_thinking: bool,
                    think_end_id: int | None, token_info: Callable, on_tokens=None) -> "Generation":
        arrival = time.monotonic()
        streams = [pool.generate(replica, r) for r in requests]
        try:
            firsts = await asyncio.gather(*[s.__anext__() for s in streams])
        except BaseException:
            await asyncio.gather(*[s.aclose() for s in streams], return_exceptions=True)
            raise
        rejected = [f for f in firsts if isinstance(f, Rejected)]
        if rejected or not all(isinstance(f, Admitted) for f in firsts):
            await asyncio.gather(*[s.aclose() for s in streams], return_exceptions=True)
            if rejected:
                raise APIError(rejected[0].status, rejected[0].message)
            raise APIError(500, "unexpected first event from the engine")
        usage = Usage(firsts[0].num_prompt_tokens, firsts[0].num_cached_tokens)
        choices = [_Choice(i, is_thinking, think_end_id, token_info) for i in range(len(requests))]
        return cls(streams, choices, usage, replica, on_tokens, arrival)

    def _observe(self, ev: TokenEvent) -> None:
        now = time.monotonic()
        if self._on_tokens is not None and ev.token_ids:
            ttft = now - self._arrival if self._last is None else None
            self._on_tokens(len(ev.token_ids), ttft, 0.0 if self._last is None else now - self._last)
        self._last = now

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Parsed pieces of every choice, interleaved as they arrive; ends when all finished."""
        if len(self._streams) == 1:
            async for ev in self._streams[0]:
                delta = self._on_event(0, ev)
                if not delta.is_empty:
                    yield delta
                if delta.finish_reason is not None:
                    break
            await self._end_checks()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for ev in stream:
                    await queue.put((i, ev))
                    if ev.finish_reason is not None:
                        break
            except Exception as e:  # surfaced to the consumer below
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        self._tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        num_open = len(self._tasks)
        finished: set[int] = set()
        while num_open:
            i, ev = await queue.get()
            if ev is None:
                num_open -= 1
                continue
            if isinstance(ev, Exception):
                raise ev
            if i in finished:
                continue
            delta = self._on_event(i, ev)
            if delta.finish_reason is not None:
                finished.add(i)
                self._tasks[i].cancel()  # e.g. a tool-call block ended the choice early
            if not delta.is_empty:
                yield delta
        await self._end_checks()

    def _on_event(self, i: int, ev: TokenEvent) -> ChoiceDelta:
        self._observe(ev)
        delta = self.choices[i].on_event(ev)
        self.usage.num_completion_tokens = sum(c.num_tokens for c in self.choices)
        self.usage.num_reasoning_tokens = sum(c.num_reasoning_tokens for c in self.choices)
        return delta

    async def _end_checks(self) -> None:
        if any(c.finish_reason is None for c in self.choices):
            raise APIError(500, "the engine stream ended without a finish reason")

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        if self.on_close is not None:
            self.on_close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*[s.aclose() for s in self._streams], return_exceptions=True)
