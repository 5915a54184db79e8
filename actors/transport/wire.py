"""Wire format of the data plane: dispatch (router -> shard) and combine (shard -> router) messages.

Owns: no state beyond one group's backend handle and the message layout. Per MoE layer and
micro-batch, the router sends every shard exactly one dispatch message (possibly with 0 rows, so
each shard can follow the fixed order of the StepPlan), and each shard that got n > 0 rows sends
one combine message of [n, hidden] back; the router knows n, so that recv has an exact size.

Dispatch layout, counts first (dtype = the model dtype, one flat tensor):
    [ header: int64 n (8 bytes; n = -1 aborts the step) | rows: n x (hidden + meta) ]
    rows[:, :hidden] = x                                   the normed MoE input
    rows[:, hidden:] = meta, float32 [n, 2k] viewed as dtype: expert ids (exact in float32 below
                       2^24) then routing weights, so bf16 payloads keep fp32 weights bit-exact.
gloo: the count rides in the same message: a gloo recv may be larger than the message, so the
shard posts a recv of its capacity (the micro-batch's token count, from the StepPlan) and reads
n from the header. One message instead of two matters: gloo sends only once the receiver has
posted its recv, so a separate count message costs an extra round trip (~0.6 ms per layer here).
nccl: recv sizes must match, so the count goes as its own int64 message, then the rows.
Tags: 1 = dispatch, 2 = combine (gloo matches per (peer, tag) in order; nccl ignores tags).
"""

from __future__ import annotations

import torch

ABORT = -1
TAG_DISPATCH, TAG_COMBINE = 1, 2


def meta_width(dtype: torch.dtype, k: int) -> int:
    """Columns of `dtype` that hold the float32 [n, 2k] meta block."""
    size = torch.empty(0, dtype=dtype).element_size()
    if 4 % size:
        raise ValueError(f"payload dtype {dtype} cannot carry float32 meta")
    return 2 * k * 4 // size


class Wire:
    def __init__(self, pg, backend: str, device: torch.device, dtype: torch.dtype, hidden: int, k: int):
        self.pg = pg
        self.is_sized_recv = backend == "gloo"   # gloo: recv into a capacity buffer; nccl: exact sizes
        self.device = device
        self.dtype = dtype
        self.hidden = hidden
        self.k = k
        self.width = hidden + meta_width(dtype, k)           # columns per row
        self.header = 8 // torch.empty(0, dtype=dtype).element_size()  # columns of the int64 header

    # ---- router side -----------------------------------------------------------------------
    def pack(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every token's row once per dispatch: x [T, hidden], expert_ids / weights [T, k] -> [T, width]."""
        meta = torch.cat([expert_ids.to(torch.float32), weights.to(torch.float32)], dim=1)   # [T, 2k]
        return torch.cat([x.to(self.dtype), meta.view(self.dtype)], dim=1)

    def send_dispatch(self, dst: int, packed: torch.Tensor, rows: torch.Tensor | None) -> list:
        """packed [T, width] (from pack), rows [n] the tokens for dst (None: all T) -> works
        (keep each (work, tensor) pair alive until the work completed)."""
        n = packed.shape[0] if rows is None else rows.numel()
        msg = torch.empty(self.header + n * self.width, dtype=self.dtype, device=self.device)
        body = msg[self.header:].view(n, self.width)
        if rows is None:
            body.copy_(packed)
        else:
            torch.index_select(packed, 0, rows, out=body)
        if self.is_sized_recv:
            msg[: self.header].view(torch.int64).fill_(n)
            return [(self.pg.send([msg], dst, TAG_DISPATCH), msg)]
        count = torch.tensor([n], dtype=torch.int64, device=self.device)
        works = [(self.pg.send([count], dst, TAG_DISPATCH), count)]
        if n:
            works.append((self.pg.send([body], dst, TAG_DISPATCH), body))
        return works

    def send_abort(self, dst: int) -> list:
        if self.is_sized_recv:
            msg = torch.zeros(self.header, dtype=self.dtype, device=self.device)
            msg.view(torch.int64)[0] = ABORT
        else:
            msg = torch.tensor([ABORT], dtype=torch.int64, device=self.device)
        return [(self.pg.send([msg], dst, TAG_DISPATCH), msg)]

    def post_combine(self, src: int, n: int) -> tuple[object, torch.Tensor]:
        out = torch.empty(n, self.hidden, dtype=self.dtype, device=self.device)
        return self.pg.recv([out], src, TAG_COMBINE), out

    # ---- shard side ------------------------------------------------------------------------
    def post_dispatch(self, src: int, capacity: int) -> "DispatchRecv":
        return DispatchRecv(self, src, capacity)

    def send_combine(self, dst: int, out: torch.Tensor):
        out = out.contiguous()
        return self.pg.send([out], dst, TAG_COMBINE), out


class DispatchRecv:
    """A posted dispatch recv; wait() -> (x [n, hidden], expert_ids [n, k], weights [n, k]) or None (abort)."""

    def __init__(self, wire: Wire, src: int, capacity: int):
        self.wire, self.src = wire, src
        if wire.is_sized_recv:
            self.buf = torch.empty(wire.header + capacity * wire.width, dtype=wire.dtype, device=wire.device)
        else:
            self.buf = torch.empty(1, dtype=torch.int64, device=wire.device)
        self.work = wire.pg.recv([self.buf], src, TAG_DISPATCH)

    def wait(self):
        w = self.wire
        self.work.wait()
        if w.is_sized_recv:
            n = int(self.buf[: w.header].view(torch.int64)[0])
            if n == ABORT:
                return None
            rows = self.buf[w.header: w.header + n * w.width].view(n, w.width)
        else:
            n = int(self.buf[0])           # device -> host sync (nccl)
            if n == ABORT:
                return None
            rows = torch.empty(n, w.width, dtype=w.dtype, device=w.device)
            if n:
                w.pg.recv([rows], self.src, TAG_DISPATCH).wait()
        meta = rows[:, w.hidden:].contiguous().view(torch.float32)                        # [n, 2k]
        return rows[:, : w.hidden], meta[:, : w.k].to(torch.int64), meta[:, w.k:]
