"""The Engine's seam to the KV cache: a small `PrefixCache` protocol, a no-op default, and the
adapter over `kvcache.KVCacheService`.

Owns: nothing but the adapter's reference to the service (the service owns its tiers). The
engine calls `lookup` at admission (before a sequence is queued; run off the event loop),
exports its state at the positions `prompt_checkpoints` / `is_checkpoint` name (chunks are cut
there by the scheduler), and hands each export to `commit` (also off the event loop).

Position choice: the engine needs the logits of the last prompt token, so a lookup may resume at
most at `len(prompt) - 1`; the adapter therefore adds a checkpoint at `len(prompt) - 1` to the
service's own choice (every `checkpoint_tokens`, end of prompt, end of sequence) so that an
identical prompt sent again skips all but its last token.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Protocol, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass
class PrefixHit:
    num_tokens: int                               # tokens covered by the hit (0 = miss)
    state_tensors: dict[str, torch.Tensor] | None  # SequenceState.export() at num_tokens, or None when
    tier: str | None = None                       # the hit is deferred (`load_into` copies it)
    deferred: Any = None                          # an object with load_into(state) -> bool

    @property
    def is_hit(self) -> bool:
        return self.num_tokens > 0 and (self.state_tensors is not None or self.deferred is not None)

    def load_into(self, state) -> bool:
        """Fill a fresh state with the hit. False: a record failed its check while loading (it was
        deleted from its tier); `state` is partly written and must be discarded."""
        if self.deferred is not None:
            return self.deferred.load_into(state)
        state.load(self.state_tensors)
        return True


class PrefixCache(Protocol):
    is_enabled: bool

    def lookup(self, token_ids: Sequence[int], salt: str, max_tokens: int) -> PrefixHit: ...

    def prompt_checkpoints(self, num_prompt_tokens: int) -> list[int]: ...

    def is_checkpoint(self, position: int) -> bool: ...

    def commit(self, token_ids: Sequence[int], states_by_position: dict[int, dict[str, torch.Tensor]],
               salt: str) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class NoPrefixCache:
    """No caching: every lookup misses, no exports are requested."""

    is_enabled = False

    def lookup(self, token_ids, salt, max_tokens) -> PrefixHit:
        return PrefixHit(0, None)

    def prompt_checkpoints(self, num_prompt_tokens: int) -> list[int]:
        return []

    def is_checkpoint(self, position: int) -> bool:
        return False

    def commit(self, token_ids, states_by_position, salt) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class KVServicePrefixCache:
    """Adapter over `kvcache.service.KVCacheService`."""

    is_enabled = True

    def __init__(self, service):
        self.service = service
        self.checkpoint_tokens = service.config.checkpoint_tokens

    @classmethod
    def build(cls, model_config, fingerprint: str, *, redis_url: str | None, disk_dir: str | None,
              options: dict | None = None) -> "KVServicePrefixCache":
        from kvcache.service import KVCacheService  # lazy: kvcache pulls in pyarrow / redis

        # for_model_config also sets the FP8 rope width from the model (qk_rope_head_dim)
        service = KVCacheService.for_model_config(model_config, fingerprint, redis_url=redis_url,
                                                  disk_dir=disk_dir, **(options or {}))
        return cls(service)

    def lookup(self, token_ids, salt, max_tokens) -> PrefixHit:
        """Deferred: the record bytes are verified and copied once, straight into the engine's
        state, when it calls `load_into` on its model thread."""
        res = self.service.lookup(token_ids, salt, max_tokens=max_tokens, is_deferred=True)
        return PrefixHit(res.num_cached_tokens, res.state_tensors, res.checkpoint_tier,
                         res if res.is_hit and res.state_tensors is None else None)

    def prompt_checkpoints(self, num_prompt_tokens: int) -> list[int]:
        positions = set(self.service.checkpoint_positions(num_prompt_tokens, num_prompt_tokens))
        if num_prompt_tokens > 1:
            positions.add(num_prompt_tokens - 1)
        return sorted(p for p in positions if p > 0)

    def is_checkpoint(self, position: int) -> bool:
        return position > 0 and position % self.checkpoint_tokens == 0

    def commit(self, token_ids, states_by_position, salt) -> None:
        self.service.commit(token_ids, states_by_position, salt)

    def stats(self) -> dict:
        s = self.service.stats()
        return _plain(s)

    def flush(self, timeout: float | None = None) -> bool:
        return self.service.flush(timeout)

    def close(self) -> None:
        self.service.close()


def _plain(obj):
    """Dataclasses (with properties dropped) -> dicts of plain values, for stats messages."""
    if is_dataclass(obj):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
