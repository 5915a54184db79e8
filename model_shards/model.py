"""DeepseekV4: the single-process model = DenseModel + one ExpertBank holding every expert.

Owns nothing beyond its two parts (and optional MTP layers). Public API:
    model = DeepseekV4.from_pretrained(path, dtype=torch.float32, device="cpu")
    logits = model(input_ids)                    # [B, S] -> [B, S, vocab], fresh sequences
    state = model.new_state()
    logits = model(input_ids, state=state)       # [1, S] -> [1, S, vocab]; state advances
    outs = model.step(states, [ids, ...])        # several sequences at once, any lengths
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointReader
from .config import ModelConfig
from .dense import DenseModel
from .moe import ExpertBank
from .state import SequenceState

RoutedFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DeepseekV4(nn.Module):
    def __init__(self, cfg: ModelConfig, dense: DenseModel | None = None, experts: ExpertBank | None = None,
                 mtp: list | None = None, fingerprint: str = ""):
        super().__init__()
        self.config = cfg
        self.dense = dense if dense is not None else DenseModel(cfg)
        self.experts = experts if experts is not None else ExpertBank(cfg, list(range(cfg.n_routed_experts)))
        self.mtp = nn.ModuleList(mtp or [])
        self.fingerprint = fingerprint  # identifies config + weights (the KV cache keys on it)
        self.prefill_chunk = 4096       # full forwards run in chunks of this many tokens

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        load_mtp: bool = True, progress=None) -> "DeepseekV4":
        """`progress(bytes_read, total_bytes)`, if given, is called as tensors are read."""
        from .loading import check_known, load_dense, load_experts, load_mtp

        cfg = ModelConfig.from_json(path)
        reader = CheckpointReader(path, progress=progress)
        dense = load_dense(cfg, reader, dtype, device)
        check_known(cfg, reader, set(dense.state_dict()), load_mtp)
        experts = load_experts(cfg, reader, list(range(cfg.n_routed_experts)), dtype, device)
        mtp = load_mtp(cfg, reader, dtype, device) if load_mtp else []
        model = cls(cfg, dense, experts, mtp, checkpoint_fingerprint(path))
        return model.eval()

    # ---- inference -------------------------------------------------------------------------
    def new_state(self) -> SequenceState:
        return self.dense.new_state()

    @torch.no_grad()
    def step(self, states: list[SequenceState], token_ids: list[torch.Tensor], all_logits: bool = True,
             routed: RoutedFn | None = None, return_hidden: bool = False):
        """Advance several sequences by their new tokens in one batched forward.

        Returns per-sequence logits ([S_k, vocab] each, or [vocab] of the last token when
        `all_logits=False`). `routed` replaces the local ExpertBank (e.g. remote shards)."""
        dense = self.dense
        h, batch = dense.begin_step(states, [t.reshape(-1) for t in token_ids])
        h = self.layers_step(h, batch, routed)
        rows = None if all_logits else batch.last_rows()
        logits, hidden = dense.finish_step(h, batch, rows, return_hidden=True)
        if all_logits:
            per_seq = [logits[s: s + n] for s, n in zip(batch.starts, batch.lengths)]
            hid = [hidden[s: s + n] for s, n in zip(batch.starts, batch.lengths)]
        else:
            per_seq, hid = list(logits), list(hidden)
        return (per_seq, hid) if return_hidden else per_seq

    def layers_step(self, h: torch.Tensor, batch, routed: RoutedFn | None = None) -> torch.Tensor:
        """Every decoder layer over h [T, hc, hidden] (device work only; a CUDA graph captures it)."""
        routed = routed or self.experts
        dense = self.dense
        for i in range(self.config.num_layers):
            h = dense.attention_sublayer(i, h, batch)
            work = dense.moe_begin(i, h, batch)
            h = dense.moe_end(work, routed(i, work.x, work.expert_ids, work.weights))
        return h

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: SequenceState | None = None) -> torch.Tensor:
        ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        if state is not None:
            if ids.shape[0] != 1:
                raise ValueError("with a state, input_ids must be [1, S]")
            return self.step([state], [ids[0]])[0].unsqueeze(0)
        outs = []
        for row in ids:
            st = self.new_state()
            chunks = [self.step([st], [row[i: i + self.prefill_chunk]])[0]
                      for i in range(0, row.numel(), self.prefill_chunk)]
            outs.append(torch.cat(chunks))
        return torch.stack(outs)

    @torch.no_grad()
    def propose_next_next(self, hidden: torch.Tensor, next_ids: torch.Tensor, mtp_state: SequenceState,
                          mtp_id: int = 0) -> torch.Tensor:
        """MTP: hidden [S, D] of positions p.. and the tokens at p+1.. -> logits [S, vocab] for p+2.."""
        if not len(self.mtp):
            raise RuntimeError("this checkpoint has no mtp.* weights")
        return self.mtp[mtp_id](hidden, next_ids.reshape(-1), mtp_state, self.dense.embed, self.dense.head)


def checkpoint_fingerprint(path: str, num_samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """Identity of a checkpoint for the KV cache: the KV state of two checkpoints may be shared only
    if this matches. Hashes config.json, and for every safetensors file its name, size, header and
    `num_samples` evenly spaced `sample_bytes` windows of the tensor data (1 MiB per file by
    default), so checkpoints that differ only in weight values (a fine-tune) differ here, without
    reading a 1.6T-parameter checkpoint whole at start-up."""
    h = hashlib.blake2b(digest_size=16)
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(json.dumps(json.load(f), sort_keys=True).encode())
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        h.update(name.encode())
        h.update(str(size).encode())
        with open(full, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 1 << 24)))
            data_start = 8 + header_len
            data_len = max(size - data_start, 0)
            for k in range(num_samples):
                f.seek(data_start + data_len * k // num_samples)
                h.update(f.read(min(sample_bytes, data_len)))
    return h.hexdigest()
