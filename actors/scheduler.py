"""Scheduler: continuous batching with chunked prefill, one counter model per sequence.

Owns: the waiting queue and the running list, and each sequence's two counters. A sequence has
`num_tokens` tokens (prompt + sampled) and `num_computed_tokens` of them are already in its
model state; every step advances some sequences by `num_tokens - num_computed_tokens` tokens or
fewer (the vLLM v1 model: a prefill and a decode are the same thing with different counts).
When a chunk reaches `num_tokens`, the step's logits of its last token are sampled and the new
token makes `num_tokens` one larger, so the sequence is a decode (1 token per step) from then on.

Per step (`schedule`), under a token budget `max_num_batched_tokens`:
  1. running sequences first, in admission order (decodes cost 1 token, an unfinished prefill
     takes what the budget leaves, in chunks);
  2. then waiting sequences, first come first served, while fewer than `max_num_seqs` run.
A chunk never crosses the sequence's next checkpoint position (where the engine exports the
state for the KV cache), so the state at that position exists after some step.

Back-pressure is a return value: `add` returns False when `max_num_waiting` sequences already
wait; the engine turns that into HTTP 429. No preemption: a sequence's state is its own tensors
(no shared block pool to run out of), so the cap on running sequences bounds memory.
Not thread-safe: the engine calls it from its event-loop thread only.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    token_ids: list[int]            # prompt, then sampled tokens
    num_prompt_tokens: int
    num_computed_tokens: int = 0    # tokens already in the model state (> 0 after a cache hit)
    checkpoint_positions: list[int] = field(default_factory=list)  # sorted; chunks stop at these
    status: str = WAITING
    payload: Any = None             # the engine's per-sequence data (state, sampler, stream)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def chunk_limit(self) -> int:
        """Tokens this sequence may advance in one step (up to the next checkpoint, if any)."""
        n = self.num_tokens - self.num_computed_tokens
        i = bisect.bisect_right(self.checkpoint_positions, self.num_computed_tokens)
        if i < len(self.checkpoint_positions):
            n = min(n, self.checkpoint_positions[i] - self.num_computed_tokens)
        return n


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int           # == seq.num_computed_tokens when scheduled
    num_new_tokens: int

    @property
    def is_sampling(self) -> bool:
        """Whether this chunk reaches the end of the known tokens (its last logits are sampled)."""
        return self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start: self.start + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    admitted_ids: list[str]   # sequences that moved from waiting to running in this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64               # cap on running sequences
    max_num_batched_tokens: int = 512    # token budget per step (prefill chunks + decodes)
    max_num_waiting: int = 256           # queue bound; beyond it `add` refuses (-> 429)

    def validate(self) -> "SchedulerConfig":
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.max_num_waiting, int) or self.max_num_waiting < 0:
            raise ValueError(f"max_num_waiting must be an integer >= 0, got {self.max_num_waiting!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}) so every running decode fits a step")
        return self


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None):
        self.config = (config or SchedulerConfig()).validate()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> bool:
        """Queue a sequence; False (nothing queued) when the waiting queue is full."""
        if len(self.waiting) >= self.config.max_num_waiting:
            return False
        if not 0 <= seq.num_computed_tokens < seq.num_tokens:
            raise ValueError(f"{seq.seq_id}: needs 0 <= num_computed_tokens < num_tokens, got "
                             f"{seq.num_computed_tokens} / {seq.num_tokens}")
        seq.status = WAITING
        self.waiting.append(seq)
        return True

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in self.running:
            if budget == 0:
                break
            n = min(seq.chunk_limit(), budget)
            if n > 0:
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
        admitted: list[str] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            admitted.append(seq.seq_id)
            n = min(seq.chunk_limit(), budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return SchedulerOutput(chunks, admitted)

    def on_chunk_done(self, chunk: ScheduledChunk, sampled_token_id: int | None) -> None:
        """Advance the counters after the step ran `chunk`; append the sampled token, if any."""
        seq = chunk.seq
        if seq.status != RUNNING:
            return  # aborted while the step was running
        if seq.num_computed_tokens != chunk.start:
            raise RuntimeError(f"{seq.seq_id}: chunk started at {chunk.start}, counter is "
                               f"{seq.num_computed_tokens}")
        seq.num_computed_tokens += chunk.num_new_tokens
        if sampled_token_id is not None:
            seq.token_ids.append(int(sampled_token_id))

    def finish(self, seq_id: str) -> Sequence | None:
        """Remove a sequence (finished, aborted or failed) from wherever it is."""
        for i, seq in enumerate(self.running):
            if seq.seq_id == seq_id:
                del self.running[i]
                seq.status = FINISHED
                return seq
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                seq.status = FINISHED
                return seq
        return None
