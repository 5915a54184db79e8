"""ModelRunner: the contract between the Engine's scheduler and whatever runs the model.

Owns: nothing (an interface plus the single-process implementation). The Engine calls `step` once
per scheduler step with the sequences to advance and their new tokens; the runner owns the
weights and computes. Implementations: `LocalRunner` (one process, DeepseekV4 with every expert)
and the router + expert-shard handle returned by `actors.launch` (same methods).
"""

from __future__ import annotations

from typing import Protocol

import torch

from model_shards import DeepseekV4, ModelConfig, SequenceState


class ModelRunner(Protocol):
    config: ModelConfig
    fingerprint: str

    def new_state(self) -> SequenceState: ...

    def step(self, states: list[SequenceState], token_ids: list[torch.Tensor],
             all_logits: bool = False) -> list[torch.Tensor]:
        """Advance each state by its tokens; logits of each sequence's last token ([vocab] each),
        or of all its new tokens ([S_k, vocab]) when all_logits."""
        ...

    def is_healthy(self) -> bool: ...

    def shutdown(self) -> None: ...


class LocalRunner:
    """Single-process runner: the model with all experts in this process."""

    def __init__(self, model: DeepseekV4):
        self.model = model
        self.config = model.config
        self.fingerprint = model.fingerprint

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        progress=None) -> "LocalRunner":
        return cls(DeepseekV4.from_pretrained(path, dtype=dtype, device=device, progress=progress))

    def new_state(self) -> SequenceState:
        return self.model.new_state()

    def step(self, states, token_ids, all_logits: bool = False):
        return self.model.step(states, token_ids, all_logits=all_logits)

    def is_healthy(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass
