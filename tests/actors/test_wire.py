"""Data-plane messages over a real gloo group (two ranks in one process): counts ride in the
header, capacity buffers take shorter messages, meta stays bit-exact in bf16, ABORT ends a step.
The same messages over a same-node link (Unix socket), its failure modes and its budget rule."""

from __future__ import annotations

import time

import pytest
import torch

from actors.transport import links
from actors.transport.wire import Wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_combine_roundtrip(groups, dtype):
    hidden, k = 16, 3
    router = Wire(groups[0].pg, "gloo", torch.device("cpu"), dtype, hidden, k)
    shard = Wire(groups[1].pg, "gloo", torch.device("cpu"), dtype, hidden, k)
    x = torch.randn(5, hidden).to(dtype)
    ids = torch.tensor([[0, 5, 9], [1, 2, 3], [300, 7, 8], [4, 4, 4], [6, 1, 0]])
    weights = torch.rand(5, k) * 2.5
    packed = router.pack(x, ids, weights)
    rows = torch.tensor([0, 2, 4])
    for sel, expect in ((rows, rows), (None, torch.arange(5)), (torch.empty(0, dtype=torch.int64), rows[:0])):
        recv = shard.post_dispatch(0, capacity=8)                       # capacity > n: fine for gloo
        sends = router.send_dispatch(1, packed, sel)
        got_x, got_ids, got_w = recv.wait()
        assert torch.equal(got_x, x[expect]) and torch.equal(got_ids, ids[expect])
        assert torch.equal(got_w, weights[expect])                      # float32, bit-exact even in bf16
        for w, _ in sends:
            w.wait()
        if expect.numel():
            work, buf = router.post_combine(1, expect.numel())
            shard.send_combine(0, got_x * 2)[0].wait()
            work.wait()
            assert torch.equal(buf, x[expect] * 2)
    recv = shard.post_dispatch(0, capacity=8)
    router.send_abort(1)[0][0].wait()
    assert recv.wait() is None


def test_every_token_message_lands_in_a_static_buffer(groups):
    """An every-token shard's dispatch is one message with its header; received into a larger
    static buffer (an ExpertGraphs input), unpack_message reads the row count from the header on
    the device and all rows of the bucket (the tail keeps an earlier, larger message's rows)."""
    hidden, k = 8, 2
    router = Wire(groups[0].pg, "gloo", torch.device("cpu"), torch.bfloat16, hidden, k)
    shard = Wire(groups[1].pg, "gloo", torch.device("cpu"), torch.bfloat16, hidden, k, is_every_token=True)
    buf = torch.zeros(shard.message_numel(4), dtype=torch.bfloat16)
    for n in (4, 3):
        x = torch.randn(n, hidden).to(torch.bfloat16)
        ids = torch.arange(n * k).view(n, k)
        weights = torch.rand(n, k)
        recv = shard.post_dispatch(0, capacity=n, buf=buf)
        for w, _ in router.send_dispatch(1, router.pack(x, ids, weights), None):
            w.wait()
        rows = recv.wait_rows()
        assert rows.shape == (n, shard.width) and rows.data_ptr() == buf[shard.header:].data_ptr()
        all_x, all_ids, all_w, num_valid = shard.unpack_message(buf, 4)
        assert int(num_valid) == n and all_x.shape == (4, hidden)
        assert torch.equal(all_x[:n], x) and torch.equal(all_ids[:n], ids) and torch.equal(all_w[:n], weights)
    assert torch.equal(all_ids[3], torch.tensor([6, 7]))                # the 4-row message's last row
    recv = shard.post_dispatch(0, capacity=3, buf=buf)
    router.send_abort(1, every_token_rows=3)[0][0].wait()
    assert recv.wait_rows() is None


def test_pack_into_a_static_buffer_keeps_its_tail():
    wire = Wire(None, "nccl", torch.device("cpu"), torch.float32, 4, 1, is_every_token=True)
    buf = torch.full((wire.message_numel(3),), 7.0)
    msg = wire.pack(torch.ones(2, 4), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), out=buf)
    assert msg.data_ptr() == buf.data_ptr() and msg.numel() == wire.message_numel(2)
    assert int(wire.unpack_message(buf, 3)[3]) == 2
    assert bool((buf[wire.message_numel(2):] == 7.0).all())


# ---- same-node links (actors/transport/links.py) ----------------------------------------------

@pytest.fixture()
def linked():
    """(router link, shard link) over a real listener of generation 7, rank 1."""
    budget = links.budget_bytes()
    listener = links.Listener(7)
    try:
        shard = links.connect(listener.name, 1, 7, budget, 5.0)
        assert shard is not None
        assert links.connect(listener.name, 2, 6, budget, 5.0) is not None   # wrong generation: dropped
        router = listener.accept([1], budget, 5.0)[1]
    finally:
        listener.close()
    yield router, shard
    router.close()
    shard.close()


def test_link_unreachable_name_means_no_link():
    assert links.connect("dsv4-ep-no-such-listener", 1, 1, links.budget_bytes(), 1.0) is None
    assert links.connect("", 1, 1, links.budget_bytes(), 1.0) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_link_dispatch_combine_roundtrip(groups, linked, dtype):
    hidden, k = 16, 3
    router_link, shard_link = linked
    router = Wire(groups[0].pg, "gloo", torch.device("cpu"), dtype, hidden, k, links.budget_bytes())
    shard = Wire(groups[1].pg, "gloo", torch.device("cpu"), dtype, hidden, k, links.budget_bytes())
    x = torch.randn(5, hidden).to(dtype)
    ids = torch.tensor([[0, 5, 9], [1, 2, 3], [300, 7, 8], [4, 4, 4], [6, 1, 0]])
    weights = torch.rand(5, k) * 2.5
    msg = router.pack(x, ids, weights)
    rows = torch.tensor([0, 2, 4])
    for sel, expect in ((rows, rows), (None, torch.arange(5)), (torch.empty(0, dtype=torch.int64), rows[:0])):
        assert router.send_dispatch(1, msg, sel, router_link) == []      # written in place
        got_x, got_ids, got_w = shard.recv_dispatch(shard_link, capacity=8)
        assert torch.equal(got_x, x[expect]) and torch.equal(got_ids, ids[expect])
        assert torch.equal(got_w, weights[expect])                      # float32, bit-exact even in bf16
        if expect.numel():
            work, buf = router.post_combine(1, expect.numel(), router_link)
            assert shard.send_combine(0, got_x * 2, shard_link) is None
            work.wait()
            assert torch.equal(buf, x[expect] * 2)
    # receives complete in posting order, whichever is waited for first
    first, buf1 = router.post_combine(1, 2, router_link)
    second, buf2 = router.post_combine(1, 3, router_link)
    shard.send_combine(0, x[:2], shard_link)
    shard.send_combine(0, x[2:], shard_link)
    second.wait()
    first.wait()
    assert torch.equal(buf1, x[:2]) and torch.equal(buf2, x[2:])
    router.send_abort(1, router_link)
    assert shard.recv_dispatch(shard_link, capacity=8) is None


def test_link_peer_closed_or_silent_fails_fast(groups, linked):
    router_link, shard_link = linked
    wire = Wire(groups[0].pg, "gloo", torch.device("cpu"), torch.float32, 16, 3, links.budget_bytes())
    router_link.set_timeout(0.2)
    work, _ = wire.post_combine(1, 4, router_link)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no data"):                  # a hung peer: bounded wait
        work.wait()
    assert time.monotonic() - t0 < 2
    shard_link.close()                                                   # a dead peer: at once
    with pytest.raises(ConnectionError, match="closed by peer"):
        wire.post_combine(1, 4, router_link)[0].wait()
    with pytest.raises(OSError):
        for _ in range(3):
            wire.send_dispatch(1, wire.pack(torch.zeros(2, 16), torch.zeros(2, 3, dtype=torch.int64),
                                            torch.zeros(2, 3)), None, router_link)


def test_link_micro_batches_fit_the_budget():
    wire = Wire(None, "gloo", torch.device("cpu"), torch.float32, 16, 3)
    assert wire.link_micro_batches((4, 4)) == (False, False)             # no link budget
    wire.link_budget = wire.message_bytes(10)
    assert wire.message_bytes(3) == (2 + 3 * 22) * 4
    assert wire.link_micro_batches((7, 6)) == (True, False)              # together they would not fit
    assert wire.link_micro_batches((12, 5, 4)) == (False, True, True)
    assert wire.link_micro_batches((10,)) == (True,)
