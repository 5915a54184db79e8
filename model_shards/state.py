"""Per-sequence incremental state: everything a sequence needs to continue from `num_tokens`.

Owns: the tensors of one sequence across all layers. The model mutates a state only inside
`DenseModel` forward calls; everything else (scheduler, KV service) treats it as a value that it
exports / imports / clones.

Per layer (DESIGN.md §2):
- window: the last `sliding_window - 1` K=V latents, rope applied ([<= W-1, head_dim]).
- compressor (CSA / HCA layers) and indexer (CSA layers): compressed entries (one per `rate`
  tokens), the < rate raw projected tokens not yet compressed (`tail_kv`, `tail_gate`, gate without
  the position bias), and for the overlapping CSA pooling the Ca half of the last full window
  (`overlap_kv`, `overlap_gate`, gate WITH the position bias), which the next window reads.

Export names (the KV service stores these): "num_tokens" (int64 scalar) and per layer i
"{i}.window", "{i}.comp.{entries,tail_kv,tail_gate[,overlap_kv,overlap_gate]}",
"{i}.index.{entries,tail_kv,tail_gate,overlap_kv,overlap_gate}".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import CSA, HCA, SLIDING, ModelConfig


class CompressorState:
    """State of one compressor (CSA / HCA main compressor or the CSA Lightning Indexer's)."""

    def __init__(self, rate: int, dim: int, in_dim: int, is_overlapping: bool,
                 dtype: torch.dtype, device: torch.device | str):
        self.rate = rate                    # tokens per entry
        self.dim = dim                      # entry width
        self.in_dim = in_dim                # projected width per token (2*dim when overlapping)
        self.is_overlapping = is_overlapping
        self._entries = torch.empty(0, dim, dtype=dtype, device=device)  # capacity-doubling buffer
        self.num_entries = 0
        self.tail_kv = torch.empty(0, in_dim, dtype=dtype, device=device)    # [< rate, in_dim]
        self.tail_gate = torch.empty(0, in_dim, dtype=dtype, device=device)  # [< rate, in_dim]
        self.overlap_kv: torch.Tensor | None = None    # [rate, dim] Ca half of the last full window
        self.overlap_gate: torch.Tensor | None = None  # [rate, dim] (position bias included)

    @property
    def entries(self) -> torch.Tensor:
        """[num_entries, dim] (a view into the growth buffer)."""
        return self._entries[: self.num_entries]

    def append_entries(self, new: torch.Tensor) -> None:
        n_new = new.shape[0]
        if n_new == 0:
            return
        need = self.num_entries + n_new
        if need > self._entries.shape[0]:
            grown = torch.empty(max(need, 2 * self._entries.shape[0], 16), self.dim,
                                dtype=self._entries.dtype, device=self._entries.device)
            grown[: self.num_entries] = self.entries
            self._entries = grown
        self._entries[self.num_entries: need] = new
        self.num_entries = need

    def export(self, prefix: str, out: dict[str, torch.Tensor]) -> None:
        out[f"{prefix}.entries"] = self.entries.clone()
        out[f"{prefix}.tail_kv"] = self.tail_kv.clone()
        out[f"{prefix}.tail_gate"] = self.tail_gate.clone()
        if self.is_overlapping:
            empty = self.tail_kv.new_empty(0, self.dim)
            out[f"{prefix}.overlap_kv"] = empty if self.overlap_kv is None else self.overlap_kv.clone()
            out[f"{prefix}.overlap_gate"] = empty if self.overlap_gate is None else self.overlap_gate.clone()

    def load(self, prefix: str, t: dict[str, torch.Tensor], num_tokens: int) -> None:
        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            key = f"{prefix}.{name}"
            if key not in t:
                raise KeyError(f"state tensor {key!r} missing")
            v = t[key]
            if tuple(v.shape) != shape:
                raise ValueError(f"state tensor {key!r} has shape {tuple(v.shape)}, expected {shape}")
            return v.to(dtype=self._entries.dtype, device=self._entries.device)

        n, r = num_tokens // self.rate, num_tokens % self.rate
        self.num_entries = 0
        self._entries = self._entries[:0]
        self.append_entries(get("entries", (n, self.dim)))
        self.tail_kv = get("tail_kv", (r, self.in_dim)).clone()
        self.tail_gate = get("tail_gate", (r, self.in_dim)).clone()
        if self.is_overlapping:
            m = self.rate if n > 0 else 0
            ov_kv, ov_gate = get("overlap_kv", (m, self.dim)), get("overlap_gate", (m, self.dim))
            self.overlap_kv = ov_kv.clone() if m else None
            self.overlap_gate = ov_gate.clone() if m else None

    def clone(self) -> "CompressorState":
        c = CompressorState.__new__(CompressorState)
        c.__dict__.update(self.__dict__)
        c._entries = self.entries.clone()
        c.tail_kv, c.tail_gate = self.tail_kv.clone(), self.tail_gate.clone()
        c.overlap_kv = None if self.overlap_kv is None else self.overlap_kv.clone()
        c.overlap_gate = None if self.overlap_gate is None else self.overlap_gate.clone()
        return c


@dataclass
class LayerState:
    window: torch.Tensor                       # [<= W-1, head_dim]
    comp: CompressorState | None = None
    index: CompressorState | None = None


@dataclass
class SequenceState:
    """All layers' state of one sequence after `num_tokens` tokens."""

    config: ModelConfig
    layers: list[LayerState]
    num_tokens: int = 0
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    extra: dict = field(default_factory=dict)  # owner-specific tags (e.g. a request id); not exported

    @classmethod
    def new(cls, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> "SequenceState":
        layers = []
        for layer_type in cfg.layer_types:
            window = torch.empty(0, cfg.head_dim, dtype=dtype, device=device)
            if layer_type == SLIDING:
                layers.append(LayerState(window))
            elif layer_type == HCA:
                layers.append(LayerState(window, CompressorState(cfg.hca_rate, cfg.head_dim, cfg.head_dim, False, dtype, device)))
            else:
                layers.append(LayerState(
                    window,
                    CompressorState(cfg.csa_rate, cfg.head_dim, 2 * cfg.head_dim, True, dtype, device),
                    CompressorState(cfg.csa_rate, cfg.index_head_dim, 2 * cfg.index_head_dim, True, dtype, device)))
        return cls(cfg, layers, 0, dtype, device)

    def export(self) -> dict[str, torch.Tensor]:
        """Named tensors (copies) describing this state exactly; see the module docstring."""
        out: dict[str, torch.Tensor] = {"num_tokens": torch.tensor(self.num_tokens, dtype=torch.int64)}
        for i, layer in enumerate(self.layers):
            out[f"{i}.window"] = layer.window.clone()
            if layer.comp is not None:
                layer.comp.export(f"{i}.comp", out)
            if layer.index is not None:
                layer.index.export(f"{i}.index", out)
        return out

    @classmethod
    def from_export(cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "SequenceState":
        """Rebuild a state from `export()` output; shapes are checked against the config."""
        if "num_tokens" not in tensors:
            raise KeyError("state tensor 'num_tokens' missing")
        state = cls.new(cfg, dtype, device)
        n = int(tensors["num_tokens"])
        state.num_tokens = n
        w = min(n, cfg.sliding_window - 1)
        for i, layer in enumerate(state.layers):
            win = tensors.get(f"{i}.window")
            if win is None:
                raise KeyError(f"state tensor '{i}.window' missing")
            if tuple(win.shape) != (w, cfg.head_dim):
                raise ValueError(f"state tensor '{i}.window' has shape {tuple(win.shape)}, expected {(w, cfg.head_dim)}")
            layer.window = win.to(dtype=dtype, device=device).clone()
            if layer.comp is not None:
                layer.comp.load(f"{i}.comp", tensors, n)
            if layer.index is not None:
                layer.index.load(f"{i}.index", tensors, n)
        return state

    def clone(self) -> "SequenceState":
        layers = [LayerState(l.window.clone(), None if l.comp is None else l.comp.clone(),
                             None if l.index is None else l.index.clone()) for l in self.layers]
        return SequenceState(self.config, layers, self.num_tokens, self.dtype, self.device, dict(self.extra))

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.export().values())


def entry_rates(cfg: ModelConfig) -> dict[str, int]:
    """Every exported "*.entries" name -> tokens per entry (for slicing per-block records)."""
    rates: dict[str, int] = {}
    for i, layer_type in enumerate(cfg.layer_types):
        if layer_type == HCA:
            rates[f"{i}.comp.entries"] = cfg.hca_rate
        elif layer_type == CSA:
            rates[f"{i}.comp.entries"] = cfg.csa_rate
            rates[f"{i}.index.entries"] = cfg.csa_rate
    return rates
