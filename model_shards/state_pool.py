"""StatePool: slot and page storage for many sequences' states (the paged KV of the router).

Owns, on the model's device:
- per layer the window rings [num_slots, W, head_dim];
- per compressor (layer, "comp" | "index") the tail buffers [num_slots, rate, in_dim] (kv, gate)
  and, for CSA, the overlap buffers [num_slots, rate, dim] (kv, gate);
- per compressor the entry pages [num_pages(rate), page_size, dim]. Page ids are allocated per
  compression rate and shared by every compressor of that rate (they all hold the same number of
  entries), so one page table per rate serves every layer. Page 0 is a zero page for padding.
A SequenceState made by `new_state()` takes a slot: its ring / tail / overlap tensors are views of
the slot's rows and its entries live in its pages, so code that treats a state as standalone
tensors still works, while a decode step over B pooled sequences reads and writes all of them with
one indexed op per tensor (see batch.DecodeMeta). The slot and pages are given back when the state
is garbage collected (clones and `SequenceState.from_export` states are standalone). Growth doubles
a buffer: slot views of live states are re-pointed; pages are addressed by id, so they need nothing.
`generation` counts growths (a captured CUDA graph holds the buffers' addresses and is stale after one).

Fixed-shape decode steps (CUDA graphs, see cuda_graph.py) also need somewhere harmless to write:
`pad_slot_id` (a slot no sequence owns, for padding rows) and per rate a `scratch_page_ids` page
(where rows that complete no window write their unused entry). Both are reserved on first use.
"""

from __future__ import annotations

import weakref

import torch

from .config import ModelConfig
from .state import SequenceState

PAGE_SIZE = 64  # entries per page


class StatePool:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 num_slots: int = 8, page_size: int = PAGE_SIZE, num_pages: int = 64):
        self.cfg, self.dtype, self.device, self.page_size = cfg, dtype, torch.device(device), page_size
        proto = SequenceState.new(cfg, dtype, "meta")       # shapes only; new states copy its structure
        self._proto = proto
        self._ring_shapes = [tuple(layer.ring.shape) for layer in proto.layers]
        self._comps = {(i, name): cs for i, layer in enumerate(proto.layers) for name, cs in _compressors(layer)}
        self.rates = sorted({cs.rate for cs in self._comps.values()})
        self.rings: list[torch.Tensor] = []
        self.tails: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.overlaps: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pages: dict[tuple[int, str], torch.Tensor] = {}
        self._live: weakref.WeakValueDictionary[int, SequenceState] = weakref.WeakValueDictionary()
        self._free_slots: list[int] = []
        self._free_pages: dict[int, list[int]] = {r: [] for r in self.rates}
        self.num_slots = 0
        self.num_pages = {r: 0 for r in self.rates}
        self.generation = 0                       # +1 on every growth (buffers re-allocated)
        self._pad_slot_id: int | None = None
        self._scratch_page_ids: dict[int, int] = {}
        self._grow_slots(num_slots)
        for r in self.rates:
            self._grow_pages(r, num_pages)

    # ---- states -------------------------------------------------------------------------------
    def new_state(self) -> SequenceState:
        """A fresh state whose fixed buffers are views of a reset slot and whose entries are paged."""
        if not self._free_slots:
            self._grow_slots(2 * self.num_slots)
        slot = self._free_slots.pop()
        state = self._proto.blank_copy(self.device)    # placeholders on "meta" until attached below
        for i in range(len(self.rings)):
            self.rings[i][slot].zero_()   # padding rows must hold finite values (0 * nan = nan)
        for kv, gate in self.overlaps.values():
            kv[slot].zero_()
            gate[slot].fill_(float("-inf"))   # "no previous window"
        state.pool, state.slot_id, state.page_ids = self, slot, {r: [] for r in self.rates}
        self._attach(state, slot)
        self._live[slot] = state
        weakref.finalize(state, self._release, slot, state.page_ids)
        return state

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def num_free_pages(self, rate: int) -> int:
        return len(self._free_pages[rate])

    def _release(self, slot: int, pages: dict[int, list[int]]) -> None:
        self._free_slots.append(slot)
        for rate, ids in pages.items():
            self._free_pages[rate].extend(ids)

    def _attach(self, state: SequenceState, slot: int) -> None:
        for i, layer in enumerate(state.layers):
            layer.ring = self.rings[i][slot]
            for name, cs in _compressors(layer):
                kv, gate = self.tails[(i, name)]
                cs._tail_kv, cs._tail_gate = kv[slot], gate[slot]
                if (i, name) in self.overlaps:
                    kv, gate = self.overlaps[(i, name)]
                    cs._overlap_kv, cs._overlap_gate = kv[slot], gate[slot]
                cs._paged = (self, (i, name), state.page_ids[cs.rate])

    # ---- fixed-shape steps ----------------------------------------------------------------------
    @property
    def pad_slot_id(self) -> int:
        """A slot owned by no sequence: padding rows of fixed-shape steps read and write it."""
        if self._pad_slot_id is None:
            if not self._free_slots:
                self._grow_slots(2 * self.num_slots)
            self._pad_slot_id = self._free_slots.pop()
        return self._pad_slot_id

    def scratch_page_id(self, rate: int) -> int:
        """A page of `rate` owned by no sequence: fixed-shape steps write unused entries there."""
        if rate not in self._scratch_page_ids:
            if not self._free_pages[rate]:
                self._grow_pages(rate, 2 * self.num_pages[rate])
            self._scratch_page_ids[rate] = self._free_pages[rate].pop()
        return self._scratch_page_ids[rate]

    def reserve(self, num_slots: int, num_pages: dict[int, int]) -> None:
        """Grow now to at least these capacities (so that later steps do not re-allocate)."""
        if num_slots > self.num_slots:
            self._grow_slots(num_slots)
        for rate, n in num_pages.items():
            if n > self.num_pages[rate]:
                self._grow_pages(rate, n)

    # ---- entry pages ----------------------------------------------------------------------------
    def ensure_pages(self, pages: list[int], rate: int, num_entries: int) -> None:
        """Grow a sequence's page list (shared by its compressors of `rate`) to hold num_entries."""
        need = -(-num_entries // self.page_size) - len(pages)
        while need > 0:   # (the pages `pop()` would take one by one, taken as one slice)
            free = self._free_pages[rate]
            if not free:
                self._grow_pages(rate, 2 * self.num_pages[rate])
                continue
            taken = free[len(free) - min(need, len(free)):]
            del free[len(free) - len(taken):]
            taken.reverse()
            pages += taken
            need -= len(taken)

    def read_entries(self, key: tuple[int, str], pages: list[int], num_entries: int) -> torch.Tensor:
        """[num_entries, dim] gathered from the pages (a copy)."""
        store = self.pages[key]
        num_pages = -(-num_entries // self.page_size)
        ids = torch.tensor(pages[:num_pages], dtype=torch.int64, device=self.device)
        return store[ids].flatten(0, 1)[:num_entries]

    # ---- growth ---------------------------------------------------------------------------------
    def _alloc(self, num: int, shape: tuple[int, ...], prev: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor:
        t = torch.full((num, *shape), fill, dtype=self.dtype, device=self.device)
        if prev is not None:
            t[: prev.shape[0]] = prev
        return t

    def _grow_slots(self, num_slots: int) -> None:
        old = self.num_slots
        self.rings = [self._alloc(num_slots, shape, self.rings[i] if old else None)
                      for i, shape in enumerate(self._ring_shapes)]
        for key, cs in self._comps.items():
            prev = self.tails.get(key, (None, None))
            self.tails[key] = (self._alloc(num_slots, (cs.rate, cs.in_dim), prev[0]),
                               self._alloc(num_slots, (cs.rate, cs.in_dim), prev[1]))
            if cs.is_overlapping:
                prev = self.overlaps.get(key, (None, None))
                self.overlaps[key] = (self._alloc(num_slots, (cs.rate, cs.dim), prev[0]),
                                      self._alloc(num_slots, (cs.rate, cs.dim), prev[1], float("-inf")))
        for slot, state in list(self._live.items()):
            self._attach(state, slot)
        self._free_slots = list(range(num_slots - 1, old - 1, -1)) + self._free_slots
        self.num_slots = num_slots
        self.generation += 1

    def _grow_pages(self, rate: int, num_pages: int) -> None:
        old = self.num_pages[rate]
        for key, cs in self._comps.items():
            if cs.rate == rate:
                self.pages[key] = self._alloc(num_pages, (self.page_size, cs.dim), self.pages.get(key))
        # page 0 stays a zero page (padding of page tables)
        self._free_pages[rate] = list(range(num_pages - 1, max(old, 1) - 1, -1)) + self._free_pages[rate]
        self.num_pages[rate] = num_pages
        self.generation += 1


def _compressors(layer) -> list[tuple[str, object]]:
    return [(name, cs) for name, cs in (("comp", layer.comp), ("index", layer.index)) if cs is not None]
