"""Wire format of the data plane: dispatch (router -> shard) and combine (shard -> router) messages.

Owns: no state beyond one group's backend handle, the message layout, the link budget and (shard
side) the link receive buffer. Per MoE layer and micro-batch, the router sends every shard exactly
one dispatch message (possibly with 0 rows, so each shard can follow the fixed order of the
StepPlan), and each shard that got n > 0 rows sends one combine message of [n, hidden] back; the
router knows n, so that recv has an exact size.

Dispatch layout, counts first (dtype = the model dtype, one flat tensor):
    [ header: int64 n (8 bytes; n = -1 aborts the step) | rows: n x (hidden + meta) ]
    rows[:, :hidden] = x                                   the normed MoE input
    rows[:, hidden:] = meta, float32 [n, 2k] viewed as dtype: expert ids (exact in float32 below
                       2^24) then routing weights, so bf16 payloads keep fp32 weights bit-exact.
gloo: the count rides in the same message: a gloo recv may be larger than the message, so the
shard posts a recv of its capacity (the micro-batch's token count, from the StepPlan) and reads
n from the header. One message instead of two matters: gloo sends only once the receiver has
posted its recv, so a separate count message costs an extra round trip (~0.6 ms per layer here).
nccl: recv sizes must match, so the count goes as its own int64 message, then the rows; except
to a shard that gets every token (GroupSpec.is_every_token): n is then the micro-batch's token
count, known to both sides from the StepPlan, so the message goes as one, header included, as
over gloo (an ABORT to such a shard is a message of the same size with n = -1). The shard can
receive it straight into a CUDA graph's static input (model_shards/expert_graphs.py), which
reads n from the header on the device (`unpack_message`).
Tags: 1 = dispatch, 2 = combine (gloo matches per (peer, tag) in order; nccl ignores tags).
Same-node links (actors/transport/links.py): the same two messages, byte for byte, over the
shard's Unix socket instead of gloo, for the micro-batches `link_micro_batches` picks (the rule
both sides apply to the StepPlan); the shard reads the header, then exactly n rows. A dispatch
message is one tensor however it travels: `pack` writes the header (n = T) and every row once, and
a shard that takes every token gets that same tensor (no copy per shard).
"""

from __future__ import annotations

import torch

from .links import as_bytes

ABORT = -1
TAG_DISPATCH, TAG_COMBINE = 1, 2


def meta_width(dtype: torch.dtype, k: int) -> int:
    """Columns of `dtype` that hold the float32 [n, 2k] meta block."""
    size = torch.empty(0, dtype=dtype).element_size()
    if 4 % size:
        raise ValueError(f"payload dtype {dtype} cannot carry float32 meta")
    return 2 * k * 4 // size


class Wire:
    def __init__(self, pg, backend: str, device: torch.device, dtype: torch.dtype, hidden: int, k: int,
                 link_budget: int = 0, is_every_token: bool = False):
        """`is_every_token` (shard side): this shard gets every token of each micro-batch."""
        self.pg = pg
        self.is_sized_recv = backend == "gloo"   # gloo: recv into a capacity buffer; nccl: exact sizes
        self.is_every_token = is_every_token
        # the dispatch comes as one message with its header (gloo always; nccl to every-token shards)
        self.is_one_message = self.is_sized_recv or is_every_token
        self.device = device
        self.dtype = dtype
        self.hidden = hidden
        self.k = k
        self.width = hidden + meta_width(dtype, k)           # columns per row
        self.element_size = torch.empty(0, dtype=dtype).element_size()
        self.header = 8 // self.element_size                 # columns of the int64 header
        self.link_budget = link_budget                       # bytes; 0: no same-node link
        self._headers: dict[int, torch.Tensor] = {}          # n -> header columns (router)
        self._link_buf: torch.Tensor | None = None           # link dispatch rows (shard; grows)
        self._link_header = bytearray(8)

    def message_numel(self, n: int) -> int:
        """Elements (of dtype) of a dispatch message of n rows, header included."""
        return self.header + n * self.width

    def message_bytes(self, n: int) -> int:
        """Bytes of a dispatch message of n rows."""
        return self.message_numel(n) * self.element_size

    def link_micro_batches(self, micro_batch_tokens: tuple[int, ...]) -> tuple[bool, ...]:
        """Which micro-batches of a step go over a same-node link (both sides apply this rule to
        the StepPlan): each one whose dispatch message at capacity still fits in the link budget
        next to the ones already taken (at most one message per micro-batch is ever unread)."""
        out, used = [], 0
        for tokens in micro_batch_tokens:
            size = self.message_bytes(tokens)
            fits = used + size <= self.link_budget
            used += size if fits else 0
            out.append(fits)
        return tuple(out)

    def _header(self, n: int) -> torch.Tensor:
        h = self._headers.get(n)
        if h is None:
            if len(self._headers) > 4096:
                self._headers.clear()
            h = self._headers[n] = torch.tensor([n], dtype=torch.int64).view(self.dtype).to(self.device)
        return h

    # ---- router side -----------------------------------------------------------------------
    def pack(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's row once, as the dispatch message to a shard that takes all T tokens:
        x [T, hidden], expert_ids / weights [T, k] -> [header (n = T) | T x width], flat (written
        into the front of `out` when given: a bigger static buffer keeps its tail)."""
        num_tokens = x.shape[0]
        size = self.message_numel(num_tokens)
        msg = torch.empty(size, dtype=self.dtype, device=self.device) if out is None else out[:size]
        msg[: self.header] = self._header(num_tokens)
        body = msg[self.header:].view(num_tokens, self.width)
        if self.dtype == torch.float32:   # meta columns are float32 already: one cat
            torch.cat([x.to(torch.float32), expert_ids.to(torch.float32), weights.to(torch.float32)], dim=1, out=body)
        else:
            meta = torch.cat([expert_ids.to(torch.float32), weights.to(torch.float32)], dim=1)   # [T, 2k]
            torch.cat([x.to(self.dtype), meta.view(self.dtype)], dim=1, out=body)
        return msg

    def send_dispatch(self, dst: int, msg: torch.Tensor, rows: torch.Tensor | None, link=None) -> list:
        """msg (from pack), rows [n] the tokens for dst (None: all T, msg as is) -> works (keep each
        (work, tensor) pair alive until the work completed; a link sends in place: [])."""
        if rows is not None:
            n = rows.numel()
            sub = torch.empty(self.header + n * self.width, dtype=self.dtype, device=self.device)
            sub[: self.header] = self._header(n)
            torch.index_select(msg[self.header:].view(-1, self.width), 0, rows,
                               out=sub[self.header:].view(n, self.width))
            msg = sub
        if link is not None:
            link.send(as_bytes(msg))
            return []
        if self.is_sized_recv or rows is None:   # one message (nccl: the every-token shard's exact size)
            return [(self.pg.send([msg], dst, TAG_DISPATCH), msg)]
        n = (msg.numel() - self.header) // self.width
        count = torch.tensor([n], dtype=torch.int64, device=self.device)
        works = [(self.pg.send([count], dst, TAG_DISPATCH), count)]
        if n:
            body = msg[self.header:]
            works.append((self.pg.send([body], dst, TAG_DISPATCH), body))
        return works

    def send_abort(self, dst: int, link=None, every_token_rows: int | None = None) -> list:
        """ABORT in place of dst's next dispatch; `every_token_rows`: dst gets every token over
        nccl and expects a message of that many rows (the same size, n = -1)."""
        if link is not None:
            link.send(as_bytes(torch.tensor([ABORT], dtype=torch.int64)))
            return []
        if self.is_sized_recv or every_token_rows is not None:
            msg = torch.zeros(self.header if self.is_sized_recv else self.message_numel(every_token_rows),
                              dtype=self.dtype, device=self.device)
            msg[: self.header].view(torch.int64)[0] = ABORT
        else:
            msg = torch.tensor([ABORT], dtype=torch.int64, device=self.device)
        return [(self.pg.send([msg], dst, TAG_DISPATCH), msg)]

    def post_combine(self, src: int, n: int, link=None) -> tuple[object, torch.Tensor]:
        """A receive of src's [n, hidden] answer -> (work with wait(), the buffer it fills)."""
        out = torch.empty(n, self.hidden, dtype=self.dtype, device=self.device)
        if link is not None:
            return link.post(as_bytes(out)), out
        return self.pg.recv([out], src, TAG_COMBINE), out

    # ---- shard side ------------------------------------------------------------------------
    def post_dispatch(self, src: int, capacity: int, buf: torch.Tensor | None = None) -> "DispatchRecv":
        """A recv of the next dispatch of at most `capacity` rows; `buf` (one-message layouts): the
        flat buffer to receive into, >= message_numel(capacity) elements."""
        return DispatchRecv(self, src, capacity, buf)

    def recv_dispatch(self, link, capacity: int):
        """Read the next dispatch message from a link now -> as DispatchRecv.wait(). The rows are a
        view of a buffer that the next call reuses (the caller is done with them by then)."""
        link.read_exact(memoryview(self._link_header))
        n = int.from_bytes(self._link_header, "little", signed=True)
        if n == ABORT:
            return None
        if not 0 <= n <= capacity:
            raise RuntimeError(f"dispatch message of {n} rows over the same-node link, capacity {capacity} "
                               "(the router and this shard disagree on the step plan)")
        if self._link_buf is None or self._link_buf.numel() < n * self.width:
            self._link_buf = torch.empty(max(n, capacity) * self.width, dtype=self.dtype, device=self.device)
        rows = self._link_buf[: n * self.width].view(n, self.width)
        if n:
            link.read_exact(as_bytes(rows))
        return self.unpack(rows)

    def unpack(self, rows: torch.Tensor):
        """rows [n, width] -> (x [n, hidden], expert_ids [n, k] int64, weights [n, k] float32)."""
        meta = rows[:, self.hidden:]
        if self.dtype != torch.float32:
            meta = meta.contiguous().view(torch.float32)                                    # [n, 2k]
        return rows[:, : self.hidden], meta[:, : self.k].to(torch.int64), meta[:, self.k:]

    def unpack_message(self, message: torch.Tensor, num_rows: int):
        """A one-message dispatch in a buffer of `num_rows` rows capacity, read on the device (no
        host sync; what ExpertGraphs captures): -> (x, expert_ids, weights of all num_rows rows,
        n: the header's row count, 0-dim int64; rows >= n are padding)."""
        n = message[: self.header].view(torch.int64)[0]
        rows = message[self.header: self.message_numel(num_rows)].view(num_rows, self.width)
        return (*self.unpack(rows), n)

    def send_combine(self, dst: int, out: torch.Tensor, link=None):
        """-> (work, tensor) to keep alive until complete; None over a link (sent in place)."""
        out = out.contiguous()
        if link is not None:
            link.send(as_bytes(out))
            return None
        return self.pg.send([out], dst, TAG_COMBINE), out


class DispatchRecv:
    """A posted dispatch recv; wait() -> (x [n, hidden], expert_ids [n, k], weights [n, k]) or None
    (abort); wait_rows() -> the rows [n, width] (a view of `buf` in the one-message layouts)."""

    def __init__(self, wire: Wire, src: int, capacity: int, buf: torch.Tensor | None = None):
        self.wire, self.src, self.capacity = wire, src, capacity
        if wire.is_one_message:
            size = wire.message_numel(capacity)
            self.buf = torch.empty(size, dtype=wire.dtype, device=wire.device) if buf is None else buf
            # gloo: a recv may be larger than the message; nccl: exactly the every-token message
            self.work = wire.pg.recv([self.buf if wire.is_sized_recv else self.buf[:size]], src, TAG_DISPATCH)
        else:
            self.buf = torch.empty(1, dtype=torch.int64, device=wire.device)
            self.work = wire.pg.recv([self.buf], src, TAG_DISPATCH)

    def wait(self):
        rows = self.wait_rows()
        return None if rows is None else self.wire.unpack(rows)

    def wait_rows(self) -> torch.Tensor | None:
        w = self.wire
        self.work.wait()
        if w.is_one_message:
            n = int(self.buf[: w.header].view(torch.int64)[0])     # nccl: a device -> host sync
            if n == ABORT:
                return None
            if w.is_every_token and not w.is_sized_recv and n != self.capacity:
                raise RuntimeError(f"every-token dispatch of {n} rows, the step plan says {self.capacity} "
                                   "(the router and this shard disagree on the step plan)")
            return self.buf[w.header: w.header + n * w.width].view(n, w.width)
        n = int(self.buf[0])           # device -> host sync (nccl)
        if n == ABORT:
            return None
        rows = torch.empty(n, w.width, dtype=w.dtype, device=w.device)
        if n:
            w.pg.recv([rows], self.src, TAG_DISPATCH).wait()
        return rows
