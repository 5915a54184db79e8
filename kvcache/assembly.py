"""StateAssembler: a lookup's fetched records -> the state at its position.

Owns nothing persistent (it borrows the service's TierStack, entry rates and config). Given the
run records of a hit (block or span records, with how many blocks of each the checkpoint needs)
and the checkpoint record, it builds either
- `assemble`: the state dict (``SequenceState.export()`` form), one byte copy of the stored
  tensors into pooled memory, each run's checksum pass (`TierStack.settle`) right before its
  bytes are copied (FP8 storage: dequantized, then concatenated); or
- `defer`: a `restore.DeferredState` whose entries are row blocks viewing the records (byte
  views of decoded records, ``(uint8 array, dtype, shape)``: no tensor is built per block), to
  be verified and copied once straight into the engine's state by `load_into`. The runs are
  checked (`layout.RunCheck`) from each record's parsed layout before any view is built.
A run that fails its checksum was deleted from its tier: `CorruptRecord` tells the lookup to ask
the tiers again for that record.
"""

from __future__ import annotations

import torch

from kvcache import fp8, layout
from kvcache.config import KVCacheConfig
from kvcache.hierarchy import Hit, TierStack
from kvcache.record import Record
from kvcache.restore import DeferredState


class CorruptRecord(Exception):
    """A fetched record failed its deferred checksum check (it was deleted from its tier)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class StateAssembler:
    def __init__(self, stack: TierStack, entry_rates: dict[str, int], config: KVCacheConfig):
        self.stack, self.entry_rates, self.config = stack, entry_rates, config
        self.num_restore_threads = config.num_restore_threads   # (once: it asks the OS for the CPUs)

    def defer(self, pieces: list[tuple[Hit, int, int]], checkpoint: Record, position: int) -> DeferredState:
        """The state at `position` as row blocks viewing the records (restore.py); nothing is
        copied, and the run records' checksum passes wait for `DeferredState.load_into`. The
        runs are checked from their parsed layout (`Record.specs`) before any view is built."""
        _check_kinds(pieces, checkpoint)
        tensors = checkpoint.tensors
        check = layout.RunCheck(tensors, self.entry_rates, self.config.block_tokens)
        blocks: dict[str, list[torch.Tensor]] = {name: [] for name in check.rows_per_block}
        sources: dict[int, int] = {}  # id(byte view) -> its first byte's address (the fused verify + copy)
        num_blocks = 0
        for hit, _, num_used in pieces:
            record = hit.record
            count = check.add(record.specs())
            views = record.row_blocks(verify=False)  # verified right before their rows are copied
            if record.kind == "span" and count > num_used:  # the blocks the checkpoint needs
                views = {name: _leading_rows(v, num_used * check.rows_per_block[name]) for name, v in views.items()}
                count = num_used
            num_blocks += count
            addresses = record.slot_addresses()  # (a leading-rows view starts where its tensor does)
            for name, view in views.items():
                blocks[name].append(view)
                if addresses is not None:
                    sources[id(view)] = addresses[name]
        if check.finish(num_blocks) != position:
            raise ValueError(f"checkpoint holds {check.num_tokens} tokens")
        state = {name: blocks[name] + [t] if name in blocks else t for name, t in tensors.items()}
        return DeferredState(state, [hit for hit, _, _ in pieces], self.stack.settle, sources,
                             num_threads=self.num_restore_threads)

    def assemble(self, pieces: list[tuple[Hit, int, int]], checkpoint: Record, position: int
                  ) -> dict[str, torch.Tensor]:
        _check_kinds(pieces, checkpoint)
        block_tokens = self.config.block_tokens
        if self.config.is_fp8:  # dequantize, then concatenate
            runs = []
            for hit, _, num_used in pieces:
                if not self.stack.settle(hit):
                    raise CorruptRecord(hit.record.key)
                tensors = fp8.dequantize_tensors(hit.record.tensors)
                if hit.record.kind == "span":  # keep the blocks the checkpoint needs (rows are per block)
                    tensors = {name: t[:num_used * (block_tokens // self.entry_rates.get(name, block_tokens))]
                               for name, t in tensors.items()}
                runs.append(tensors)
            state = layout.assemble_state(runs, fp8.dequantize_tensors(checkpoint.tensors), self.entry_rates,
                                          block_tokens)
        else:  # the stored bytes are the state's bytes: copy them into place
            runs = []
            for hit, _, num_used in pieces:
                views = hit.record.byte_views(verify=False)  # verified by `settle` below, before the copy
                if hit.record.kind == "span":
                    views = {name: layout.leading_rows(view, num_used * (block_tokens // self.entry_rates.get(
                        name, block_tokens))) for name, view in views.items()}
                runs.append(views)

            def settle(i: int) -> None:  # checksum pass, promotion; the copy then reads from cache
                hit = pieces[i][0]
                if not self.stack.settle(hit):
                    raise CorruptRecord(hit.record.key)

            state = layout.assemble_state_bytes(runs, checkpoint.tensors, self.entry_rates, block_tokens,
                                                before_run=settle)
        if layout.state_num_tokens(state) != position:
            raise ValueError(f"checkpoint holds {layout.state_num_tokens(state)} tokens")
        return state


def _leading_rows(block, num_rows: int):
    """The first `num_rows` rows of a row block (a tensor or a byte view)."""
    return block[:num_rows] if isinstance(block, torch.Tensor) else layout.leading_rows(block, num_rows)


def _check_kinds(pieces: list[tuple[Hit, int, int]], checkpoint: Record) -> None:
    if checkpoint.kind != "checkpoint" or any(h.record.kind not in ("block", "span") for h, _, _ in pieces):
        raise ValueError("unexpected record kinds")
