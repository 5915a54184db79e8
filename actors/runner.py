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
    """Single-process runner: the model with all experts in this process. On a GPU whose model
    can be captured (model_shards.cuda_graph), decode-only steps replay CUDA graphs; prefill and
    mixed steps, and every step on CPU, run the model eagerly. `compiled_decode`: decode steps'
    layers run as compiled regions (model_shards.regions; inside the graphs on a GPU)."""

    def __init__(self, model: DeepseekV4, cuda_graphs: bool = True, max_num_seqs: int = 64,
                 compiled_decode: bool = False):
        self.model = model
        self.config = model.config
        self.fingerprint = model.fingerprint
        self.graphs = None
        dense = model.dense
        if compiled_decode:
            from model_shards.regions import DecodeRegions
            dense.regions = DecodeRegions()
        if cuda_graphs and dense.device.type == "cuda" and model.experts.is_sync_free(dense.device, dense.dtype):
            from model_shards.cuda_graph import DecodeGraphs
            self.graphs = DecodeGraphs(model, max_batch=max_num_seqs)
        if self.graphs is not None and compiled_decode:
            self.graphs.warm_up(self.config.index_topk + 1)
        elif dense.device.type == "cpu":
            self.warm_up()
        dense.warm_up_prefill()   # (GPUs: prefill's compiled pieces, before the first prompt)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Build what builds on first use (the CPU kernels, `model_shards.cpu_kernels`, once per
        machine; the decode regions' compiled variants, when on) on throwaway states, so that the
        first request does not wait for it. (Regions of steps whose sequences hold more than the
        indexer's top-k entries compile on first use.)"""
        # regions also compile steps with compressed entries: prompts past the window
        n = self.config.sliding_window + 2 if self.model.dense.regions.is_enabled else 2
        states = [self.model.new_state() for _ in range(2)]
        self.model.step(states, [torch.arange(n) % 2, torch.arange(n) % 3], all_logits=False)
        for _ in range(2):
            self.model.step(states, [torch.tensor([0]), torch.tensor([1])], all_logits=False)
            self.model.step(states[:1], [torch.tensor([2])], all_logits=False)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        progress=None, cuda_graphs: bool = True, max_num_seqs: int = 64,
                        compiled_decode: bool = False) -> "LocalRunner":
        model = DeepseekV4.from_pretrained(path, dtype=dtype, device=device, progress=progress)
        return cls(model, cuda_graphs=cuda_graphs, max_num_seqs=max_num_seqs, compiled_decode=compiled_decode)

    def new_state(self) -> SequenceState:
        return self.model.new_state()

    def step(self, states, token_ids, all_logits: bool = False):
        """Logits rows of a graph step are views of its output: read them before the next step."""
        if self.graphs is not None and not all_logits and self.graphs.can_step(states, token_ids):
            return self.graphs.step(states, token_ids)
        return self.model.step(states, token_ids, all_logits=all_logits)

    def is_healthy(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass
