"""Per-sequence incremental state: everything a sequence needs to continue from `num_tokens`.

Owns: the tensors of one sequence across all layers. The model mutates a state only inside
`DenseModel` forward calls; everything else (scheduler, KV service) treats it as a value that it
exports / imports / clones.

Per layer (DESIGN.md §2):
- window: the last `sliding_window - 1` K=V latents, rope applied ([<= W-1, head_dim]; kept in a
  ring buffer of W slots, see LayerState).
- compressor (CSA / HCA layers) and indexer (CSA layers): compressed entries (one per `rate`
  tokens), the < rate raw projected tokens not yet compressed (`tail_kv`, `tail_gate`, gate without
  the position bias), and for the overlapping CSA pooling the Ca half of the last full window
  (`overlap_kv`, `overlap_gate`, gate WITH the position bias), which the next window reads.

Export names (the KV service stores these): "num_tokens" (int64 scalar) and per layer i
"{i}.window", "{i}.comp.{entries,tail_kv,tail_gate[,overlap_kv,overlap_gate]}",
"{i}.index.{entries,tail_kv,tail_gate,overlap_kv,overlap_gate}".

`SequenceState.load` (checks, row blocks, byte blocks, the window) is in state_load.py, load plans in load_plan.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch

from .config import CSA, HCA, SLIDING, ModelConfig
from .load_plan import LoadPlan
from .state_load import ByteCopies, RowSink, block_rows, load_state


class CompressorState:
    """State of one compressor (CSA / HCA main compressor or the CSA Lightning Indexer's).

    Fixed-size parts live in fixed buffers so that a decode step updates them in place and a batch
    of pooled sequences is read with one indexed op: the tail [rate, in_dim] (rows [0, num_tail)
    valid) and the overlap [rate, dim] (valid once num_entries > 0; until then its gate is -inf,
    which is exactly "no previous window" for the pooling). Entries grow: a capacity-doubling
    buffer, or for a pooled state pages of the StatePool (`_paged` = (pool, (layer, name), page
    ids shared by every layer of this rate))."""

    def __init__(self, rate: int, dim: int, in_dim: int, is_overlapping: bool,
                 dtype: torch.dtype, device: torch.device | str, fixed_device: torch.device | str | None = None):
        self.rate = rate                    # tokens per entry
        self.dim = dim                      # entry width
        self.in_dim = in_dim                # projected width per token (2*dim when overlapping)
        self.is_overlapping = is_overlapping
        self._entries = torch.empty(0, dim, dtype=dtype, device=device)  # capacity-doubling buffer
        self._paged: tuple[Any, tuple[int, str], list[int]] | None = None
        self.num_entries = 0
        fixed = device if fixed_device is None else fixed_device   # "meta" when a StatePool attaches them
        self._tail_kv = torch.zeros(rate, in_dim, dtype=dtype, device=fixed)    # rows [0, num_tail)
        self._tail_gate = torch.zeros(rate, in_dim, dtype=dtype, device=fixed)  # gate without the bias
        self.num_tail = 0
        ov = rate if is_overlapping else 0
        self._overlap_kv = torch.zeros(ov, dim, dtype=dtype, device=fixed)      # Ca half of the last window
        self._overlap_gate = torch.full((ov, dim), float("-inf"), dtype=dtype, device=fixed)  # bias included

    @property
    def entries(self) -> torch.Tensor:
        """[num_entries, dim] (a view of the growth buffer; a copy gathered from pages when pooled)."""
        if self._paged is not None:
            pool, key, pages = self._paged
            return pool.read_entries(key, pages, self.num_entries)
        return self._entries[: self.num_entries]

    @property
    def tail_kv(self) -> torch.Tensor:
        """[num_tail < rate, in_dim] projected tokens not yet pooled (a view)."""
        return self._tail_kv[: self.num_tail]

    @property
    def tail_gate(self) -> torch.Tensor:
        return self._tail_gate[: self.num_tail]

    @property
    def overlap_kv(self) -> torch.Tensor | None:
        """[rate, dim] Ca half of the last full window, None before the first one."""
        return self._overlap_kv if self.is_overlapping and self.num_entries else None

    @property
    def overlap_gate(self) -> torch.Tensor | None:
        return self._overlap_gate if self.is_overlapping and self.num_entries else None

    def set_tail(self, kv: torch.Tensor, gate: torch.Tensor) -> None:
        """Replace the tail by `kv` / `gate` ([< rate, in_dim])."""
        n = kv.shape[0]
        self._tail_kv[:n] = kv
        self._tail_gate[:n] = gate
        self.num_tail = n

    def set_overlap(self, kv: torch.Tensor, gate: torch.Tensor) -> None:
        self._overlap_kv.copy_(kv)
        self._overlap_gate.copy_(gate)

    def append_entries(self, new: torch.Tensor) -> None:
        """Append rows `new` [n, dim] (any dtype / device: copied, converted, into place)."""
        n_new = new.shape[0]
        if n_new == 0:
            return
        if self._paged is not None:
            self._write_pages(new)
            return
        need = self.num_entries + n_new
        if need > self._entries.shape[0]:
            self.reserve_entries(max(need, 2 * self._entries.shape[0], 16))
        self._entries[self.num_entries: need] = new
        self.num_entries = need

    def reserve_entries(self, num_entries: int) -> None:
        """Room for `num_entries` entries in all, so that appending up to there moves nothing
        (growth buffer) or allocates nothing (pages: taken now, in ascending id order)."""
        if self._paged is not None:
            pool, _, pages = self._paged
            num_old = len(pages)
            pool.ensure_pages(pages, self.rate, num_entries)
            # ascending ids: pages freed by a dead state come back in reverse order, and
            # consecutive ids are one copy in `_write_pages`
            pages[num_old:] = sorted(pages[num_old:])
        elif num_entries > self._entries.shape[0]:
            grown = torch.empty(num_entries, self.dim, dtype=self._entries.dtype, device=self._entries.device)
            grown[: self.num_entries] = self._entries[: self.num_entries]
            self._entries = grown

    def _write_pages(self, new: torch.Tensor) -> None:
        """Pooled append: one copy per run of consecutive page ids."""
        end = self.num_entries + new.shape[0]
        self.reserve_entries(end)
        RowSink(self, end).append(new)

    def entry_rows(self, start: int, end: int, page_runs: list[tuple[int, int, int]] | None = None
                   ) -> list[tuple[int, torch.Tensor]]:
        """Where entries [start, end) live, reserved (`reserve_entries`): [(first entry, rows
        view [n, dim])], one view per run of consecutive pages (one in all unless pooled pages
        are scattered). Valid until the storage grows (the next reserve past the capacity).
        `page_runs`: this range's `page_runs` if known (every compressor of a rate shares them)."""
        if self._paged is None:
            return [(start, self._entries[start:end])] if end > start else []
        pool, key, pages = self._paged
        store = pool.pages[key]                 # [num_pages, page_size, dim]
        rows = store.view(-1, self.dim)
        if page_runs is None:
            page_runs = self.page_runs(start, end)
        return [(row, rows[at: at + run_end - row]) for row, run_end, at in page_runs]

    def page_runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Pooled: entries [start, end) as runs of consecutive pages, [(first entry, end entry,
        the first entry's row in the page store)] (the same for every compressor of the rate)."""
        pool, _, pages = self._paged
        page_size = pool.page_size
        out = []
        row = start
        while row < end:
            first = row // page_size     # the run: pages[first..last] hold consecutive ids
            end_page = (end - 1) // page_size
            count = end_page - first + 1
            if pages[end_page] - pages[first] == count - 1 and pages[first:end_page + 1] == list(
                    range(pages[first], pages[first] + count)):
                last = end_page           # (the common case: one run to the end, checked in C)
            else:
                last = first
                while last < end_page and pages[last + 1] == pages[last] + 1:
                    last += 1
            run_end = min(end, (last + 1) * page_size)
            out.append((row, run_end, pages[first] * page_size + row - first * page_size))
            row = run_end
        return out

    def export(self, prefix: str, out: dict[str, torch.Tensor]) -> None:
        out[f"{prefix}.entries"] = self.entries.clone()
        out[f"{prefix}.tail_kv"] = self.tail_kv.clone()
        out[f"{prefix}.tail_gate"] = self.tail_gate.clone()
        if self.is_overlapping:
            empty = self._entries.new_empty(0, self.dim)
            out[f"{prefix}.overlap_kv"] = empty if self.overlap_kv is None else self.overlap_kv.clone()
            out[f"{prefix}.overlap_gate"] = empty if self.overlap_gate is None else self.overlap_gate.clone()

    def checked_parts(self, prefix: str, t: dict, num_tokens: int) -> dict:
        """This compressor's export() tensors of a `num_tokens` state, shape-checked (nothing is
        changed): ``{"entries": [row blocks], "tail_kv", "tail_gate"[, "overlap_kv", "overlap_gate"]}``.
        ``t[prefix + ".entries"]`` is one [num_entries, dim] tensor or a list of row blocks
        [rows_b, dim] that concatenate to it (see `SequenceState.load`)."""
        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            key = f"{prefix}.{name}"
            if key not in t:
                raise KeyError(f"state tensor {key!r} missing")
            v = t[key]
            if tuple(v.shape) != shape:
                raise ValueError(f"state tensor {key!r} has shape {tuple(v.shape)}, expected {shape}")
            return v

        n, r = num_tokens // self.rate, num_tokens % self.rate
        key = f"{prefix}.entries"
        if key not in t:
            raise KeyError(f"state tensor {key!r} missing")
        blocks = t[key]
        if isinstance(blocks, torch.Tensor):
            blocks = [get("entries", (n, self.dim))]
        elif not isinstance(blocks, (list, tuple)):
            raise TypeError(f"state tensor {key!r} must be a tensor or a list of row blocks")
        elif block_rows(blocks, self.dim, key) != n:
            shapes = [tuple(b.shape) if isinstance(b, torch.Tensor) else b[2] for b in blocks]
            raise ValueError(f"state tensor {key!r}: row blocks {shapes} do not make ({n}, {self.dim})")
        parts = {"entries": list(blocks), "tail_kv": get("tail_kv", (r, self.in_dim)),
                 "tail_gate": get("tail_gate", (r, self.in_dim))}
        if self.is_overlapping:
            m = self.rate if n > 0 else 0
            parts["overlap_kv"], parts["overlap_gate"] = get("overlap_kv", (m, self.dim)), get("overlap_gate", (m, self.dim))
        return parts

    def set_fixed(self, parts: dict) -> None:
        """The tail and overlap of `checked_parts` (the entries are appended by the caller)."""
        self.set_tail(parts["tail_kv"], parts["tail_gate"])   # (copies convert dtype and device)
        if self.is_overlapping and parts["overlap_kv"].shape[0]:
            self.set_overlap(parts["overlap_kv"], parts["overlap_gate"])

    def load(self, prefix: str, t: dict, num_tokens: int) -> None:
        """Fill this fresh compressor state from export() tensors of a `num_tokens` state."""
        parts = self.checked_parts(prefix, t, num_tokens)
        if self.num_entries:
            raise ValueError("load() needs a fresh state")
        self.reserve_entries(num_tokens // self.rate)
        for block in parts["entries"]:
            self.append_entries(block)
        self.set_fixed(parts)

    def clone(self) -> "CompressorState":
        """A standalone deep copy (never pooled)."""
        c = CompressorState.__new__(CompressorState)
        c.__dict__.update(self.__dict__)
        c._entries, c._paged = self.entries.clone(), None
        c._tail_kv, c._tail_gate = self._tail_kv.clone(), self._tail_gate.clone()
        c._overlap_kv, c._overlap_gate = self._overlap_kv.clone(), self._overlap_gate.clone()
        return c


class LayerState:
    """One layer's state: the sliding window as a ring buffer, and the layer's compressors.

    The token at position p keeps its K=V latent in slot p % W of `ring` [W, head_dim]; the ring
    holds the last min(num_tokens, W) latents. Attention is a set operation (the values are the keys,
    and a decode query sees every window key), so a decode step writes its latent into its slot and
    attends over the whole ring without reordering it."""

    def __init__(self, window_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 comp: CompressorState | None = None, index: CompressorState | None = None):
        self.ring = torch.zeros(window_size, head_dim, dtype=dtype, device=device)   # [W, D] ("meta": pooled)
        self.num_tokens = 0          # tokens this layer has seen (their latents went through the ring)
        self.comp = comp
        self.index = index

    @property
    def window_size(self) -> int:
        return self.ring.shape[0]

    def window_positions(self, count: int) -> torch.Tensor:
        """Positions of the last `count` tokens seen, oldest first."""
        return torch.arange(self.num_tokens - count, self.num_tokens, device=self.ring.device)

    @property
    def window(self) -> torch.Tensor:
        """[min(num_tokens, W-1), D]: the last W-1 latents in position order (a copy)."""
        count = min(self.num_tokens, self.window_size - 1)
        return self.ring[self.window_positions(count) % self.window_size]

    def write_window(self, latents: torch.Tensor) -> None:
        """Append the latents of the next S tokens ([S, D], positions num_tokens..) to the ring."""
        S, W = latents.shape[0], self.window_size
        keep = min(S, W)
        slots = torch.arange(self.num_tokens + S - keep, self.num_tokens + S, device=self.ring.device) % W
        self.ring[slots] = latents[S - keep:]
        self.num_tokens += S

    def set_window(self, window: torch.Tensor, num_tokens: int) -> None:
        """Restore: `window` holds the latents of the last len(window) tokens before `num_tokens`."""
        self.num_tokens = num_tokens - window.shape[0]
        self.write_window(window)

    def clone(self) -> "LayerState":
        c = LayerState.__new__(LayerState)
        c.ring, c.num_tokens = self.ring.clone(), self.num_tokens
        c.comp = None if self.comp is None else self.comp.clone()
        c.index = None if self.index is None else self.index.clone()
        return c


@dataclass
class SequenceState:
    """All layers' state of one sequence after `num_tokens` tokens."""

    config: ModelConfig
    layers: list[LayerState]
    num_tokens: int = 0
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    extra: dict = field(default_factory=dict)  # owner-specific tags (e.g. a request id); not exported
    pool: Any = None                              # the StatePool whose slot `slot_id` holds the fixed buffers
    slot_id: int = -1
    page_ids: dict = field(default_factory=dict)  # pooled: rate -> entry page ids (shared by that rate's layers)

    @classmethod
    def new(cls, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", allocate: bool = True) -> "SequenceState":
        """A fresh standalone state (`allocate=False`: ring / tail buffers left on "meta" for a StatePool)."""
        layers = []
        W, D, fixed = cfg.sliding_window, cfg.head_dim, (device if allocate else "meta")
        for layer_type in cfg.layer_types:
            if layer_type == SLIDING:
                layers.append(LayerState(W, D, dtype, fixed))
            elif layer_type == HCA:
                layers.append(LayerState(W, D, dtype, fixed,
                                         CompressorState(cfg.hca_rate, D, D, False, dtype, device, fixed)))
            else:
                layers.append(LayerState(
                    W, D, dtype, fixed,
                    CompressorState(cfg.csa_rate, D, 2 * D, True, dtype, device, fixed),
                    CompressorState(cfg.csa_rate, cfg.index_head_dim, 2 * cfg.index_head_dim, True, dtype, device,
                                    fixed)))
        return cls(cfg, layers, 0, dtype, device)

    def blank_copy(self, device: torch.device | str) -> "SequenceState":
        """A fresh state with the structure of this one (itself fresh, never stepped) that shares its
        placeholder tensors, allocating nothing: how a StatePool makes a state before attaching its
        slot views and pages (~20x cheaper than `new`, which builds every placeholder)."""
        layers = []
        for layer in self.layers:
            c = copy.copy(layer)
            c.comp = None if layer.comp is None else copy.copy(layer.comp)
            c.index = None if layer.index is None else copy.copy(layer.index)
            layers.append(c)
        return SequenceState(self.config, layers, 0, self.dtype, device)

    def export(self) -> dict[str, torch.Tensor]:
        """Named tensors (copies) describing this state exactly; see the module docstring."""
        out: dict[str, torch.Tensor] = {"num_tokens": torch.tensor(self.num_tokens, dtype=torch.int64)}
        for i, layer in enumerate(self.layers):
            out[f"{i}.window"] = layer.window
            if layer.comp is not None:
                layer.comp.export(f"{i}.comp", out)
            if layer.index is not None:
                layer.index.export(f"{i}.index", out)
        return out

    @classmethod
    def from_export(cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "SequenceState":
        """A standalone state rebuilt from `export()` output; shapes are checked against the config."""
        state = cls.new(cfg, dtype, device)
        state.load(tensors)
        return state

    def load(self, tensors: dict, *, before_block: Callable[[int], None] | None = None,
             copy_blocks: Callable[[ByteCopies], None] | None = None, plan: LoadPlan | None = None) -> None:
        """Overwrite this (fresh) state with `export()` output, in place (a pooled state keeps its slot).

        Each "*.entries" value is one tensor or a list of row blocks that concatenate to it (a
        block: a [rows, dim] tensor, or `state_load.ByteRows`, its bytes as a uint8 numpy array: the KV
        cache's restore passes those, and one of the state's dtype going to CPU memory is one
        numpy byte copy, no tensor built); each block is copied once, straight into place (a
        pooled state's pages, the destination views made once per load). Blocks go in block
        order: block j of every entries tensor before block j+1 of any, and `before_block(j)`
        runs right before block j's copies (a caller whose block j of every tensor comes from
        one source, e.g. a cache record, can verify that source there and the copies then read
        it from cache). `copy_blocks(copies)` (optional, instead of `before_block`): the
        `ByteRows` blocks that are plain byte copies into CPU memory are not copied here but
        handed over, all in ONE call once every block is planned, as `state_load.ByteCopies`
        (block, its j, byte offset in it, byte count, destination address per copy), for the
        caller to copy (e.g. verifying the bytes in the same pass, model_shards/byte_kernels.py,
        one C call for every record); the other blocks (tensors, another dtype, a non-CPU
        destination) are copied here while planning, before it. `plan`: a `plan_load` of this
        same `tensors`, whose checks and planning are then not repeated. Every tensor is
        shape-checked before anything changes (KeyError / ValueError / TypeError: the state is
        untouched); an exception from `before_block` or `copy_blocks` propagates and leaves the
        state partly loaded: the caller must discard it. (The work is state_load.py's.)"""
        load_state(self, tensors, before_block, copy_blocks, plan)

    def plan_load(self, tensors: dict) -> LoadPlan:
        """`load`'s checks (raising as `load` does) and copy plan of `tensors`, kept for loads of
        the same dict into fresh states of this one's structure (``load(tensors, plan=...)``)."""
        return LoadPlan(self, tensors)

    def clone(self) -> "SequenceState":
        layers = [layer.clone() for layer in self.layers]
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
