"""Per-sequence output processing: token ids -> text deltas, stop strings, finish reasons.

Owns: one sequence's detokenizer state and the text held back because it might be the start of
a stop string. Runs on the engine's event-loop thread, once per sampled token.

Stop strings are matched on decoded text, so a stop string split across several tokens (or a
multi-byte character split across byte tokens) is found. Text that could still become a stop
string is held back until the next token decides it; the stop string itself and everything
after it are never emitted (OpenAI semantics). EOS (unless ignored) and `stop_token_ids` end the
sequence without adding their text; an ignored EOS adds no text either.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.sampling import SamplingParams
from model_shards.tokenizer import IncrementalDecoder, Tokenizer

FINISH_STOP = "stop"      # EOS, a stop token or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context limit
FINISH_ABORT = "abort"    # cancelled (client went away) or engine shutdown
FINISH_ERROR = "error"    # the model step failed


def partial_suffix_len(text: str, patterns: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `patterns`."""
    best = 0
    for pat in patterns:
        for k in range(min(len(text), len(pat) - 1), best, -1):
            if pat.startswith(text[-k:]):
                best = k
                break
    return best


@dataclass
class TokenOutcome:
    text: str                      # text to emit now (possibly "")
    finish_reason: str | None      # FINISH_* when this token ends the sequence
    stop_reason: str | int | None  # the stop string, or the stop token id, that matched


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, max_new_tokens: int):
        self.params = params
        self.max_new_tokens = max_new_tokens  # max_tokens capped by the context limit
        self.num_output_tokens = 0
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop_ids = set(params.stop_token_ids)
        # An ignored EOS is generated but adds no text: its string would end the turn for any
        # parser of the V4 format downstream.
        self._silent_id = tokenizer.eos_id if params.is_eos_ignored else None
        if not params.is_eos_ignored:
            self._stop_ids.add(tokenizer.eos_id)
        self._held = ""  # decoded text not emitted yet (a possible stop-string prefix)

    def push(self, token_id: int) -> TokenOutcome:
        self.num_output_tokens += 1
        if token_id in self._stop_ids:
            return TokenOutcome(self._flush(), FINISH_STOP, token_id)
        text, stop = self._scan("" if token_id == self._silent_id else self._decoder.push(token_id))
        if stop is not None:
            return TokenOutcome(text, FINISH_STOP, stop)
        if self.num_output_tokens >= self.max_new_tokens:
            return TokenOutcome(text + self._flush(), FINISH_LENGTH, None)
        return TokenOutcome(text, None, None)

    def _scan(self, new_text: str) -> tuple[str, str | None]:
        buf = self._held + new_text
        stops = self.params.stop
        if not stops:
            self._held = ""
            return buf, None
        hits = [(buf.find(s), s) for s in stops]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, s = min(hits, key=lambda h: (h[0], -len(h[1])))  # earliest, then longest
            self._held = ""
            return buf[:pos], s
        keep = partial_suffix_len(buf, stops)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], None

    def _flush(self) -> str:
        """End of sequence: the decoder's pending bytes and any held-back text (a stop string
        can still complete inside the flushed text)."""
        text, stop = self._scan(self._decoder.flush())
        if stop is None:
            text, self._held = text + self._held, ""
        return text

    def finish_now(self) -> str:
        """Text still pending when the sequence is ended from outside (e.g. context limit)."""
        return self._flush()
