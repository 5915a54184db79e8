"""StepBatch: the per-step metadata every layer reads (passed explicitly, never global).

Owns nothing persistent: built once per forward step from the sequences' states and their new
tokens. Tokens of all sequences are laid out flat ([T]); segment k covers rows
[starts[k], starts[k] + lengths[k]) and belongs to `states[k]`, starting at position
`states[k].num_tokens`. Segments of length 1 (decodes) take the batched attention path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .state import SequenceState


@dataclass
class StepBatch:
    token_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64, absolute positions
    states: list[SequenceState]
    starts: list[int]
    lengths: list[int]
    decode_segments: list[int] = field(default_factory=list)   # segment indices with length 1
    prefill_segments: list[int] = field(default_factory=list)  # the others
    # rope tables for `positions`, filled by the model: {"main": (cos, sin), "compress": (cos, sin)}
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, states: list[SequenceState], token_ids: list[torch.Tensor],
              device: torch.device | str = "cpu") -> "StepBatch":
        if len(states) != len(token_ids):
            raise ValueError(f"{len(states)} states but {len(token_ids)} token lists")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a sequence state appears twice in one step")
        starts, lengths, positions = [], [], []
        offset = 0
        for state, ids in zip(states, token_ids):
            n = int(ids.numel())
            if n == 0:
                raise ValueError("every sequence in a step needs at least one new token")
            starts.append(offset)
            lengths.append(n)
            positions.append(torch.arange(state.num_tokens, state.num_tokens + n))
            offset += n
        flat = torch.cat([ids.reshape(-1).to(torch.int64) for ids in token_ids]).to(device)
        batch = cls(flat, torch.cat(positions).to(device), list(states), starts, lengths)
        batch.decode_segments = [k for k, n in enumerate(lengths) if n == 1]
        batch.prefill_segments = [k for k, n in enumerate(lengths) if n > 1]
        return batch

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def last_rows(self) -> torch.Tensor:
        """Row of each segment's last token, [num_segments]."""
        return torch.tensor([s + n - 1 for s, n in zip(self.starts, self.lengths)], dtype=torch.int64)

    def split(self, num_parts: int) -> list[list[int]]:
        """Partition segment indices into <= num_parts groups of similar token counts (micro-batches)."""
        order = sorted(range(len(self.lengths)), key=lambda k: -self.lengths[k])
        groups: list[list[int]] = [[] for _ in range(max(1, min(num_parts, len(order))))]
        loads = [0] * len(groups)
        for k in order:  # greedy longest-first keeps token counts balanced
            g = loads.index(min(loads))
            groups[g].append(k)
            loads[g] += self.lengths[k]
        return [sorted(g) for g in groups if g]
