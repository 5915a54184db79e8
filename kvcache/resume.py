"""The engine's half of the cache protocol, for one in-process model (tests and benchmarks).

Owns no state. Duck-typed on `model_shards.DeepseekV4`: ``model.config``, ``model.new_state()``,
``model.step(states, token_lists, all_logits=False)``, and the state's ``export()`` and
``state.load(tensors, before_block=...)``. It mirrors what actors/ does around the service:

- `prompt_checkpoints`: where to export a prompt's state: every `checkpoint_tokens`, the end of
  the prompt, and ``len - 1`` (a resent prompt still needs the logits of its last token, so a
  lookup may resume at most there);
- `prefill`: run tokens through ``model.step`` in chunks cut at every export position (as the
  scheduler cuts them), exporting the state there;
- `resume`: lookup (at most ``len - 1`` tokens; deferred: the import verifies and copies the
  records once, straight into the state), import the cached state, prefill the rest; returns
  the first token's logits and where the time went. A record found corrupt during the import
  drops that state (it was partly loaded) and the lookup runs again (the record is gone);
- `decode`: teacher-forced decode steps (fixed tokens), so that two runs can be compared.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from kvcache.stats import LookupResult

MAX_RESTORE_ATTEMPTS = 3  # lookups per resume; each failed one deleted a corrupt record

@dataclass
class PrefillResult:
    logits: torch.Tensor                                          # [vocab] of the last token
    exports: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    compute_seconds: float = 0.0                                  # model.step time only
    export_seconds: float = 0.0


@dataclass
class ResumeResult:
    state: object                                                 # the model's SequenceState
    logits: torch.Tensor                                          # [vocab] of the last token
    num_cached_tokens: int
    checkpoint_tier: str | None
    lookup_seconds: float
    import_seconds: float
    compute_seconds: float

    @property
    def total_seconds(self) -> float:
        return self.lookup_seconds + self.import_seconds + self.compute_seconds


def prompt_checkpoints(service, num_prompt_tokens: int) -> list[int]:
    positions = set(service.checkpoint_positions(num_prompt_tokens, num_prompt_tokens))
    if num_prompt_tokens > 1:
        positions.add(num_prompt_tokens - 1)
    return sorted(p for p in positions if p > 0)


def import_state(model, source):
    """A state of `model` (its dtype and device) from exported tensors (a dict: always a state)
    or a lookup hit (`LookupResult`; a deferred one is verified and copied once, straight into
    the state, see restore.py): None when a record failed its checksum during that copy; it was
    deleted from its tier and the partly loaded state is dropped (its slot and pages go back to
    the model's pool)."""
    state = model.new_state()
    if isinstance(source, dict):
        state.load(source)
        return state
    return state if source.load_into(state) else None


@torch.no_grad()
def prefill(model, state, token_ids: torch.Tensor, *, chunk_tokens: int = 2048,
            export_positions: Iterable[int] = ()) -> PrefillResult:
    """Advance `state` (at ``state.num_tokens``) over `token_ids`, the tokens that follow it."""
    if len(token_ids) == 0:
        raise ValueError("prefill needs at least one token")
    start = state.num_tokens
    end = start + len(token_ids)
    exports = sorted(p for p in set(export_positions) if start < p <= end)
    cuts = sorted(set(range(start + chunk_tokens, end, chunk_tokens)) | set(exports) | {end})
    result = PrefillResult(logits=torch.empty(0))
    position = start
    for cut in cuts:
        t0 = time.perf_counter()
        (result.logits,) = model.step([state], [token_ids[position - start:cut - start]], all_logits=False)
        result.compute_seconds += time.perf_counter() - t0
        position = cut
        if cut in exports:
            t0 = time.perf_counter()
            result.exports[cut] = state.export()
            result.export_seconds += time.perf_counter() - t0
    return result


@torch.no_grad()
def resume(model, service, token_ids: torch.Tensor | Sequence[int], salt=None, *,
           chunk_tokens: int = 2048) -> ResumeResult:
    """Cached prefix + prefill of the rest: the state after all of `token_ids` and the logits
    of the last token (a miss prefills everything from a new state)."""
    token_ids = torch.as_tensor(token_ids)
    lookup_seconds = import_seconds = 0.0
    for _ in range(MAX_RESTORE_ATTEMPTS):  # a record found corrupt while loading was deleted: ask again
        t0 = time.perf_counter()
        hit = service.lookup(token_ids.tolist(), salt, max_tokens=len(token_ids) - 1, is_deferred=True)
        t1 = time.perf_counter()
        state = import_state(model, hit) if hit.is_hit else model.new_state()
        lookup_seconds, import_seconds = lookup_seconds + t1 - t0, import_seconds + time.perf_counter() - t1
        if state is not None:
            break
    else:  # recompute everything
        hit, state = LookupResult(0, None), model.new_state()
    rest = prefill(model, state, token_ids[hit.num_cached_tokens:], chunk_tokens=chunk_tokens)
    return ResumeResult(state, rest.logits, hit.num_cached_tokens, hit.checkpoint_tier,
                        lookup_seconds, import_seconds, rest.compute_seconds)


@torch.no_grad()
def decode(model, state, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed `token_ids` one decode step at a time; the logits of every step, [steps, vocab]."""
    return torch.stack([model.step([state], [token_ids[i:i + 1]], all_logits=False)[0]
                        for i in range(len(token_ids))])
