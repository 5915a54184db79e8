"""StepBatch: the per-step metadata every layer reads (passed explicitly, never global).

Owns nothing persistent: built once per forward step from the sequences' states and their new
tokens. Tokens of all sequences are laid out flat ([T]); segment k covers rows
[starts[k], starts[k] + lengths[k]) and belongs to `states[k]`, starting at position
`states[k].num_tokens` (+ an offset when the segment is a later part of a sequence's new tokens
cut over micro-batches, see `plan_micro_batches`). Segments of length 1 (decodes) take the
batched attention path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .micro_batches import MIN_PART_TOKENS, SegmentPart, plan_micro_batches
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
    decode_rows: torch.Tensor | None = None                    # [num decode segments] their rows
    # rope rotations for `positions`, filled by the model: {"main": cis, "compress": cis}, each
    # complex64 [T, rope_dim // 2] (ops.rope_cis)
    rope: dict[str, torch.Tensor] = field(default_factory=dict)
    decode: "DecodeMeta | None" = None  # set by the model when every decode state is in one StatePool
    # outputs a compiled decode region computed ahead for the step's next call: kind -> (layer id,
    # the h they came from, outputs); written and read only by regions.DecodeRegions
    ahead: dict[str, tuple] = field(default_factory=dict)

    @classmethod
    def build(cls, states: list[SequenceState], token_ids: list[torch.Tensor],
              device: torch.device | str = "cpu", vocab_size: int | None = None,
              offsets: list[int] | None = None) -> "StepBatch":
        """`vocab_size`: also check every id is in [0, vocab_size), before the ids move to `device`.
        `offsets[k]`: segment k's tokens start at position states[k].num_tokens + offsets[k] (a
        later part of a prefill cut over micro-batches; its earlier parts ran this layer first).
        Only segments of >= 2 tokens may have an offset: a decode row's position comes from its
        state's counter."""
        if len(states) != len(token_ids):
            raise ValueError(f"{len(states)} states but {len(token_ids)} token lists")
        offsets = offsets or [0] * len(states)
        if len(offsets) != len(states) or any(o < 0 for o in offsets):
            raise ValueError(f"offsets {offsets} do not fit {len(states)} sequences")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a sequence state appears twice in one step")
        starts, lengths, positions = [], [], []
        offset = 0
        for state, ids, off in zip(states, token_ids, offsets):
            n = int(ids.numel())
            if n == 0:
                raise ValueError("every sequence in a step needs at least one new token")
            if off and n == 1:
                raise ValueError("a one-token segment (decode row) cannot start at an offset")
            starts.append(offset)
            lengths.append(n)
            p0 = state.num_tokens + off
            positions.append(torch.arange(p0, p0 + n))
            offset += n
        flat = torch.cat([ids.reshape(-1).to(torch.int64) for ids in token_ids])
        if vocab_size is not None and (int(flat.max()) >= vocab_size or int(flat.min()) < 0):
            raise ValueError(f"token id out of range [0, {vocab_size})")
        flat = flat.to(device)
        batch = cls(flat, torch.cat(positions).to(device), list(states), starts, lengths)
        batch.decode_segments = [k for k, n in enumerate(lengths) if n == 1]
        batch.prefill_segments = [k for k, n in enumerate(lengths) if n > 1]
        batch.decode_rows = torch.tensor([starts[k] for k in batch.decode_segments], dtype=torch.int64, device=device)
        return batch

    @classmethod
    def fixed_decode(cls, token_ids: torch.Tensor, decode: "DecodeMeta") -> "StepBatch":
        """A decode-only step of B rows whose indices all live on the device (`decode` in its
        fixed-shape form): what a CUDA graph captures. Holds no states; the caller advances them."""
        B = token_ids.shape[0]
        return cls(token_ids, decode.token_positions, [], list(range(B)), [1] * B,
                   decode_segments=list(range(B)), decode=decode)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def last_rows(self) -> torch.Tensor:
        """Row of each segment's last token, [num_segments]."""
        return torch.tensor([s + n - 1 for s, n in zip(self.starts, self.lengths)], dtype=torch.int64)

    def plan(self, num_parts: int, min_part: int = MIN_PART_TOKENS) -> list[list["SegmentPart"]]:
        """Micro-batches of segment parts (prefills may be cut): see `plan_micro_batches`."""
        return plan_micro_batches(self.lengths, num_parts, min_part)


@dataclass
class DecodeMeta:
    """Per-step indices for decoding B sequences whose buffers live in one StatePool, shared by
    every layer: token b (position p_b) writes ring row p_b % W of slot `slot_ids[b]` and tail row
    p_b % rate; the sequences `completes[rate]` fill a compressor window this step and write its
    entry (at position `entry_positions`) to (`entry_page_ids`, `entry_rows`)[rate]. `page_table[rate]`
    [B, max pages] lists each sequence's entry pages after this step (padded with the zero page 0);
    `entry_ok[rate]` marks the real entries of the flattened pages. Every index is computed on the
    host from the states' counters and reaches the device in ONE copy (no per-layer transfers).

    Fixed-shape form (`num_rows` / `num_pages` given; what a CUDA graph replays): B = num_rows rows,
    the rows past the real sequences read and write the pool's pad slot; `completes[rate]` is None
    and every row pools a window, `complete_mask[rate]` [B] says whose entry is real (the others
    write to the pool's scratch page and leave their overlap as it was); page tables are
    `num_pages[rate]` wide and `max_entries[rate]` is that capacity, so every shape and every branch
    depends only on (num_rows, num_pages). The sequences' counters advance on the host, in
    `advance()`, after the step (never inside the step's device work)."""
    pool: Any
    slot_ids: torch.Tensor                      # [B] int64 pool slots
    ring_rows: torch.Tensor                     # [B] int64, p % W
    window_ok: torch.Tensor                     # [B, W] bool: ring rows holding one of the last W tokens
    tail_rows: dict[int, torch.Tensor]          # rate -> [B] int64, p % rate
    completes: dict[int, list[int] | None]      # rate -> batch indices whose window completes (None: fixed shape)
    complete_slot_ids: dict[int, torch.Tensor]  # rate -> [F] their pool slots ([B] every row's, fixed shape)
    entry_positions: dict[int, torch.Tensor]    # rate -> [F] token position of each new entry (its rope)
    entry_page_ids: dict[int, torch.Tensor]     # rate -> [F] page of each completing sequence's new entry
    entry_rows: dict[int, torch.Tensor]         # rate -> [F] row in that page
    page_table: dict[int, torch.Tensor]         # rate -> [B, max pages] int64
    entry_ok: dict[int, torch.Tensor]           # rate -> [B, max pages * page_size] bool
    max_entries: dict[int, int]                 # rate -> most entries any sequence has after this step
    complete_mask: dict[int, torch.Tensor] = field(default_factory=dict)  # rate -> [B] bool (fixed shape)
    plan: "DecodePlan | None" = None                                      # the host side it came from
    token_positions: torch.Tensor | None = None                          # [B] int64 (padding rows: 0)

    @classmethod
    def build(cls, states: list[SequenceState], device: torch.device | str, window: int,
              num_rows: int | None = None, num_pages: dict[int, int] | None = None) -> "DecodeMeta | None":
        """None when the states are not all in one pool. `num_rows` / `num_pages`: fixed shape."""
        plan = DecodePlan.build(states, window, num_rows, num_pages)
        if plan is None:
            return None
        return cls.from_indices(plan, plan.indices.to(device, non_blocking=True), device)

    @classmethod
    def from_indices(cls, plan: "DecodePlan", flat: torch.Tensor, device: torch.device | str) -> "DecodeMeta":
        """The device views and masks of `flat` (plan.indices on the device). Only device ops: a
        CUDA graph captures this, so that a replay re-derives everything from its static `flat`."""
        B, P, window = plan.num_rows, plan.pool.page_size, plan.window
        views = list(flat[: plan.indices.numel()].split(plan.part_sizes))
        slot_ids, ring_rows, pos = views[:3]
        window_ok = torch.arange(window, device=device)[None, :] <= pos[:, None]   # before wrap-around
        fields: dict[str, dict] = {k: {} for k in ("tail_rows", "complete_slot_ids", "entry_positions",
                                                    "entry_page_ids", "entry_rows", "page_table", "entry_ok",
                                                    "complete_mask")}
        per_rate = 8 if plan.is_fixed else 7
        for i, r in enumerate(plan.pool.rates):
            tail, cslots, epos, epages, erows, counts, table = views[3 + per_rate * i: 10 + per_rate * i]
            fields["tail_rows"][r], fields["complete_slot_ids"][r], fields["entry_positions"][r] = tail, cslots, epos
            fields["entry_page_ids"][r], fields["entry_rows"][r] = epages, erows
            fields["page_table"][r] = table.view(B, plan.num_pages[r])
            fields["entry_ok"][r] = torch.arange(plan.num_pages[r] * P, device=device)[None, :] < counts[:, None]
            if plan.is_fixed:
                fields["complete_mask"][r] = views[10 + per_rate * i].bool()
        return cls(plan.pool, slot_ids, ring_rows, window_ok, completes=plan.completes,
                   max_entries=plan.max_entries, plan=plan, token_positions=pos, **fields)

    def compressor(self, layer_id: int, name: str, rate: int) -> "PooledCompressor":
        pool = self.pool
        kv, gate = pool.tails[(layer_id, name)]
        ov_kv, ov_gate = pool.overlaps.get((layer_id, name), (None, None))
        return PooledCompressor(kv, gate, ov_kv, ov_gate, pool.pages[(layer_id, name)], self.slot_ids,
                                self.tail_rows[rate], self.completes[rate], self.complete_slot_ids[rate],
                                self.entry_positions[rate], self.entry_page_ids[rate], self.entry_rows[rate],
                                self.complete_mask.get(rate))


@dataclass
class DecodePlan:
    """The host side of a DecodeMeta: every index of the step as one int64 tensor (`indices`, laid
    out as `part_sizes`), the static facts that shape the step, and the counter update after it."""
    pool: Any
    window: int
    num_rows: int                               # B (>= len(positions); the rest are padding)
    is_fixed: bool
    num_pages: dict[int, int]                   # rate -> page-table width
    completes: dict[int, list[int] | None]
    max_entries: dict[int, int]
    positions: list[int]                        # each real sequence's position this step
    part_sizes: list[int]
    indices: torch.Tensor                       # [sum(part_sizes)] int64, on the host

    @classmethod
    def build(cls, states: list[SequenceState], window: int, num_rows: int | None = None,
              num_pages: dict[int, int] | None = None, pool: Any = None) -> "DecodePlan | None":
        """None when the states are not all in one pool. Fixed shape with no states (give `pool`):
        every row is padding, a step that writes only the pad slot and scratch pages."""
        pool = pool if pool is not None else states[0].pool
        if pool is None or any(s.pool is not pool for s in states):
            return None
        is_fixed = num_rows is not None
        B, P = (num_rows if is_fixed else len(states)), pool.page_size
        if B < len(states):
            raise ValueError(f"{len(states)} sequences do not fit a {B}-row step")
        positions = [s.num_tokens for s in states]
        num_pad = B - len(states)
        pad_slot = [pool.pad_slot_id] * num_pad if num_pad else []
        parts: list[list[int]] = [[s.slot_id for s in states] + pad_slot,
                                  [p % window for p in positions] + [0] * num_pad, positions + [0] * num_pad]
        completes, max_entries, widths = {}, {}, {}
        for r in pool.rates:
            counts = [(p + 1) // r for p in positions]                  # entries after this step
            for s, n in zip(states, counts):
                pool.ensure_pages(s.page_ids[r], r, n)
            need = -(-max(counts, default=0) // P)
            if is_fixed and need > num_pages[r]:
                raise ValueError(f"rate {r}: a sequence needs {need} entry pages, the step holds {num_pages[r]}")
            widths[r] = n_p = num_pages[r] if is_fixed else need
            table = [i for s in states for i in s.page_ids[r][:n_p] + [0] * (n_p - min(n_p, len(s.page_ids[r])))]
            table += [0] * (n_p * num_pad)
            tails = [p % r for p in positions] + [0] * num_pad
            if is_fixed:   # every row pools; rows that complete nothing write the scratch page
                completes[r], max_entries[r] = None, n_p * P
                scratch = pool.scratch_page_id(r)
                is_done = [int((p + 1) % r == 0) for p in positions]
                epos = [(c - 1) * r if d else 0 for c, d in zip(counts, is_done)]
                epages = [s.page_ids[r][(c - 1) // P] if d else scratch for s, c, d in zip(states, counts, is_done)]
                erows = [(c - 1) % P if d else 0 for c, d in zip(counts, is_done)]
                parts += [tails, parts[0], epos + [0] * num_pad, epages + [scratch] * num_pad,
                          erows + [0] * num_pad, counts + [0] * num_pad, table, is_done + [0] * num_pad]
            else:
                done = [b for b, p in enumerate(positions) if (p + 1) % r == 0]
                completes[r], max_entries[r] = done, max(counts, default=0)
                parts += [tails, [states[b].slot_id for b in done], [(counts[b] - 1) * r for b in done],
                          [states[b].page_ids[r][(counts[b] - 1) // P] for b in done],
                          [(counts[b] - 1) % P for b in done], counts, table]
        indices = torch.tensor([i for part in parts for i in part], dtype=torch.int64)
        return cls(pool, window, B, is_fixed, widths, completes, max_entries, positions,
                   [len(part) for part in parts], indices)

    def advance(self, states: list[SequenceState]) -> None:
        """After the step: every layer of each state saw one more token; a compressor whose window
        completed holds one more entry and an empty tail. (The step itself only wrote buffers.)"""
        for state, p in zip(states, self.positions):
            for layer in state.layers:
                layer.num_tokens = p + 1
                for cs in (layer.comp, layer.index):
                    if cs is not None:
                        cs.num_tail = (p + 1) % cs.rate
                        cs.num_entries = (p + 1) // cs.rate


@dataclass
class PooledCompressor:
    """One compressor's pool buffers and this step's indices into them (see DecodeMeta)."""
    tail_kv: torch.Tensor                       # [slots, rate, in_dim]
    tail_gate: torch.Tensor
    overlap_kv: torch.Tensor | None             # [slots, rate, dim] (CSA)
    overlap_gate: torch.Tensor | None
    entry_pages_store: torch.Tensor             # [pages, page_size, dim]
    slot_ids: torch.Tensor                      # [B]
    tail_rows: torch.Tensor                     # [B]
    completes: list[int] | None
    complete_slot_ids: torch.Tensor             # [F]
    entry_positions: torch.Tensor               # [F]
    entry_page_ids: torch.Tensor                # [F]
    entry_rows: torch.Tensor                    # [F]
    complete_mask: torch.Tensor | None = None   # [B] bool, fixed shape only (completes is None)
