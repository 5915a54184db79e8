"""One StepPlan on an expert shard: the collective transport's message loop (ExpertShard.run_step).

Owns nothing: it drives the shard's wire (and same-node link), bank and ExpertGraphs for one step
(a plain function, so tests run it on a real group without a Ray actor). Messages come in plan
order (layer-major, micro-batches in order). A micro-batch that Wire.link_micro_batches puts on
the link is read from it synchronously; the others come over the group, whose next recv is posted
early (gloo: as soon as the previous one arrived, so the router's send goes straight through;
nccl: after our previous send, see below). On an every-token NCCL shard with graphs, a
micro-batch of at most the graphs' largest bucket is received straight into the graph input and
computed by one replay per layer. A compute that raises keeps the lockstep (NaN rows answered)
and is re-raised after the plan; an ABORT (the router gave up) ends the loop.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from model_shards import ExpertBank
from model_shards.expert_graphs import ExpertGraphs

from .messages import StepPlan, StepReport
from .transport.wire import Wire


@torch.no_grad()
def run_plan(plan: StepPlan, shard_id: int, bank: ExpertBank, wire: Wire, link, graphs: ExpertGraphs | None,
             check_faults: Callable[[], None]) -> StepReport:
    """`link`: the same-node link or None; `graphs`: used for every-token NCCL messages;
    `check_faults()` runs before each compute (raises to inject a fault)."""
    caps = plan.micro_batch_tokens
    on_link = wire.link_micro_batches(caps) if link is not None else (False,) * len(caps)
    order = [(layer, m) for layer in plan.layer_ids for m in range(len(caps))]
    group_msgs = [i for i, (_, m) in enumerate(order) if not on_link[m]]   # indexes that come over the group
    num_rows, num_linked, num_replays, compute_s, wait_s = 0, 0, 0, 0.0, 0.0
    sends, error, msg = [], None, ()
    num_posted = 0          # group recvs posted so far (group_msgs[:num_posted])
    recv, is_graph_input = None, False   # the posted group recv; into an ExpertGraphs input?

    graphs = graphs if wire.is_every_token and not wire.is_sized_recv else None   # nccl, every token

    def post_next_group_recv():
        nonlocal recv, is_graph_input, num_posted
        if num_posted < len(group_msgs):
            m = order[group_msgs[num_posted]][1]
            is_graph_input = graphs is not None and graphs.can_run(caps[m])
            buf = graphs.message(caps[m], m) if is_graph_input else None   # straight into the graph's input
            recv = wire.post_dispatch(0, caps[m], buf)
            num_posted += 1

    post_next_group_recv()
    for layer, m in order:
        is_linked = on_link[m]
        t0 = time.perf_counter()
        in_graph = False
        if is_linked:
            msg = wire.recv_dispatch(link, caps[m])
            num_linked += 1
        else:
            in_graph = is_graph_input
            rows = recv.wait_rows()                  # the graph reads its input itself
            msg = None if rows is None else rows if in_graph else wire.unpack(rows)
        wait_s += time.perf_counter() - t0
        if msg is None:  # ABORT: the router gave up on this step
            break
        if not is_linked and wire.is_sized_recv:  # gloo: post the next recv now (sends go straight in)
            post_next_group_recv()
        n = msg.shape[0] if in_graph else msg[0].shape[0]   # (x [n, hidden], ids [n, k], weights [n, k])
        if not n:
            if not is_linked and not wire.is_sized_recv:
                post_next_group_recv()
            continue
        t0 = time.perf_counter()
        if error is None:
            try:   # [n, hidden] partial sum over the held experts
                check_faults()
                out = graphs.run(layer, n, m) if in_graph else bank(layer, *msg)
                num_replays += in_graph
            except Exception as e:  # keep the lockstep: answer NaN, re-raise after the plan
                error = e
        if error is not None:
            out = torch.full((n, bank.cfg.hidden_size), float("nan"), dtype=wire.dtype, device=wire.device)
        compute_s += time.perf_counter() - t0
        if is_linked:
            wire.send_combine(0, out, link)
        else:
            sends.append(wire.send_combine(0, out))
        num_rows += n
        if not is_linked and not wire.is_sized_recv:
            # nccl: one stream per peer pair runs our ops in issue order, so the next recv goes
            # after this send (posted before it, it would block the send the router waits for)
            post_next_group_recv()
    for work, _ in sends:
        work.wait()
    if error is not None:
        raise error
    return StepReport(shard_id, plan.step_id, num_rows, compute_s, wait_s, is_aborted=msg is None,
                      num_link_messages=num_linked, num_graph_replays=num_replays)

