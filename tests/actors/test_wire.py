"""Data-plane messages over a real gloo group (two ranks in one process): counts ride in the
header, capacity buffers take shorter messages, meta stays bit-exact in bf16, ABORT ends a step."""

from __future__ import annotations

import threading

import pytest
import torch

from actors.messages import GroupSpec
from actors.transport.group import Group, open_master_store
from actors.transport.wire import Wire


@pytest.fixture(scope="module")
def groups():
    store = open_master_store("127.0.0.1", 10.0)
    spec = GroupSpec(1, "127.0.0.1", store.port, 2, 0, "gloo", 10.0)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault(1, Group(GroupSpec(1, "127.0.0.1", store.port, 2, 1, "gloo", 10.0),
                                                                  "127.0.0.1", torch.device("cpu"))))
    th.start()
    out[0] = Group(spec, "127.0.0.1", torch.device("cpu"), store)
    th.join()
    yield out
    out[0].close()
    out[1].close()


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
