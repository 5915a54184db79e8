"""Sampling: per-request parameters and the token choice made from one step's logits.

Owns: `SamplingParams` (validated, immutable, crosses the ingress -> engine boundary inside a
`GenerateRequest`) and `SeqSampler`, the per-sequence random stream. Nothing here knows about
batches: the engine calls `SeqSampler.sample(logits_row)` once per sequence and step, so a
sequence's choices depend only on its own logits and its own seed, never on which other
sequences shared the step (the model's batched logits are themselves batch-invariant; ties in
every top-k / argmax here go to the lower token id, as in the model).

Transform order (the one vLLM and HF use): temperature -> top-k -> top-p -> sample.
`temperature == 0` is greedy (argmax). Logprobs are those of the raw model distribution
(log_softmax of the unscaled logits), the choice OpenAI's `logprobs` documents.

Test hook: `forced_token_ids` makes the sampler emit those ids in order (the model still runs,
so timing and batching are real). The engine refuses it unless its config enables test hooks.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class SamplingError(ValueError):
    """A SamplingParams value out of range (-> HTTP 400 at the ingress)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0            # (0, 1]; 1 = off
    top_k: int = 0                # 0 = off
    seed: int | None = None       # None = a fresh random seed per request
    stop: tuple[str, ...] = ()    # matched on the decoded text, across token boundaries
    stop_token_ids: tuple[int, ...] = ()
    is_eos_ignored: bool = False  # benchmarks: always generate max_tokens
    is_logprobs: bool = False
    num_top_logprobs: int = 0     # 0..MAX_TOP_LOGPROBS alternatives per position
    forced_token_ids: tuple[int, ...] | None = None  # test hook (see the module docstring)

    def validate(self) -> "SamplingParams":
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise SamplingError(msg)

        check(_is_int(self.max_tokens) and self.max_tokens >= 1,
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(_is_num(self.temperature) and 0.0 <= self.temperature <= 2.0,
              f"temperature must be a number in [0, 2], got {self.temperature!r}")
        check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0,
              f"top_p must be a number in (0, 1], got {self.top_p!r}")
        check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        check(self.seed is None or (_is_int(self.seed) and -(1 << 63) <= self.seed < (1 << 64)),
              f"seed must be a 64-bit integer, got {self.seed!r}")
        check(isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS,
              f"stop accepts at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS,
                  f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_CHARS} characters")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be ids >= 0")
        check(_is_int(self.num_top_logprobs) and 0 <= self.num_top_logprobs <= MAX_TOP_LOGPROBS,
              f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.num_top_logprobs!r}")
        check(self.num_top_logprobs == 0 or self.is_logprobs, "top_logprobs requires logprobs")
        check(self.forced_token_ids is None or all(_is_int(t) and t >= 0 for t in self.forced_token_ids),
              "forced_token_ids must be token ids")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@dataclass
class TokenLogprob:
    """One generated position: the chosen token's logprob and the top alternatives
    ([(token_id, logprob)], most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def derive_seed(seed: int | None, index: int = 0) -> int:
    """The seed of choice `index` of a request (n > 1 gives each choice its own stream); a fresh
    random seed when the request has none."""
    if seed is None:
        return secrets.randbits(63)
    return (int(seed) * 0x9E3779B97F4A7C15 + index) % (1 << 63) if index else int(seed) % (1 << 63)


class SeqSampler:
    """The sampling state of one sequence: its params, its own torch.Generator and the position
    in a forced completion."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.seed = derive_seed(params.seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._num_forced = 0

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """logits: [vocab] of the sequence's last position -> (token id, logprob info or None)."""
        # On the CPU: the per-sequence torch.Generator lives there (one [vocab] row per sequence
        # and step is cheap to move; it keeps draws identical across devices).
        logits = logits.detach().reshape(-1)[: self.vocab_size].float().cpu()
        p = self.params
        if p.forced_token_ids is not None and self._num_forced < len(p.forced_token_ids):
            token_id = int(p.forced_token_ids[self._num_forced])
            self._num_forced += 1
        elif p.is_greedy:
            token_id = int(torch.argmax(logits))  # first maximum = lowest id on ties
        else:
            token_id = self._draw(logits)
        return token_id, (self._logprobs(logits, token_id) if p.is_logprobs else None)

    def _draw(self, logits: torch.Tensor) -> int:
        p = self.params
        x = logits / p.temperature
        if p.top_k or p.top_p < 1.0:
            # Sorted descending, stable: equal logits keep lower ids first.
            values, order = torch.sort(x, descending=True, stable=True)
            keep = torch.ones_like(values, dtype=torch.bool)
            if p.top_k:
                keep[p.top_k:] = False
            if p.top_p < 1.0:
                probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
                # Keep the smallest head whose mass reaches top_p (the first token always stays).
                mass_before = torch.cumsum(probs, dim=-1) - probs
                keep &= mass_before < p.top_p
            values = values.masked_fill(~keep, float("-inf"))
            probs = torch.softmax(values, dim=-1)
            return int(order[torch.multinomial(probs, 1, generator=self._gen)])
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._gen))

    def _logprobs(self, logits: torch.Tensor, token_id: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)
        top: list[tuple[int, float]] = []
        k = self.params.num_top_logprobs
        if k:
            values, order = torch.sort(logp, descending=True, stable=True)
            top = [(int(i), float(v)) for i, v in zip(order[:k], values[:k])]
        chosen = float(logp[token_id]) if 0 <= token_id < logp.numel() else float("-inf")
        return TokenLogprob(token_id, chosen, top)
