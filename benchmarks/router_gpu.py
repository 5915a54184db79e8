"""The expert-parallel router's dense work on one GPU, eager vs CUDA-graph segments.

    python benchmarks/router_gpu.py [--preset medium] [--checkpoint DIR] [--batches 1,64,256] [--no-append]
        [--regions] [--banks N] [--expert-graphs off|on|both] [--no-eager] [--no-bitwise] [--micro-batches 1,2]

Router (actors.router) + LocalTransport with the experts in N in-process ExpertBanks (default one
holding every expert) on the same GPU: no Ray and no NCCL, so the step is the router's own work
(embedding, attention, mHC, gates, shared experts, head) plus the experts, with micro_batches 1
and 2. `--expert-graphs on`: every bank gets every token and computes each layer by one replay of
model_shards.expert_graphs (as an every-token shard does over NCCL); otherwise the banks run
eagerly (a host sync per layer with several banks). For each batch: step time and
the router's dense time eager and with `model_shards.segment_graphs.SegmentGraphs`, and whether a
replayed step gives bitwise the logits of the same segments run uncaptured (deterministic kernels,
identical states). A stand-in for `ep_gpu.py` when only one GPU is lent: the dense part is what
dominated the 2-GPU decode step (46 of 54 ms at batch 64).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS for the bitwise check

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import decode_floor, emit, machine  # noqa: E402


def make_router(path: str, micro_batches: int, graphs: bool, is_captured: bool = True, is_regions: bool = False,
                num_banks: int = 1, expert_graphs: bool = False):
    from actors.router import Router
    from actors.transport.local import LocalTransport
    from model_shards import ModelConfig
    from model_shards.checkpoint import CheckpointReader
    from model_shards.loading import load_dense, load_experts
    from actors.placement import owner_table, split_experts
    from model_shards.segment_graphs import SegmentGraphs
    cfg = ModelConfig.from_json(path)
    reader = CheckpointReader(path)
    dense = load_dense(cfg, reader, torch.bfloat16, "cuda")
    assignment = split_experts(cfg.n_routed_experts, num_banks)
    banks = [load_experts(cfg, reader, ids, torch.bfloat16, "cuda") for ids in assignment]
    transport = LocalTransport(banks, owner_table(assignment, cfg.n_routed_experts), expert_graphs=expert_graphs)
    router = Router(dense, transport, micro_batches)
    if graphs:
        router.graphs = SegmentGraphs(dense, is_captured=is_captured)
    if is_regions:   # compiled decode regions inside the segments (model_shards.regions)
        from model_shards.regions import DecodeRegions
        dense.regions = DecodeRegions()
    if graphs and is_captured:   # as actors.launch does: what the segments compile, compiled before timing
        router.graphs.warm_up(micro_batches, cfg.index_topk + 1)
    return router


@torch.no_grad()
def decode(router, batch: int, prompt: torch.Tensor, steps: int = 20) -> dict:
    states = [router.new_state() for _ in range(batch)]
    router.step(states, [prompt[:256].cuda() for _ in range(batch)])
    toks = [prompt[:1] for _ in range(batch)]
    for _ in range(3):
        router.step(states, toks)
    torch.cuda.synchronize()
    dense_s = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        router.step(states, toks)
        dense_s += router.last_timing.dense_s
    torch.cuda.synchronize()
    return {"step_ms": round((time.perf_counter() - t0) / steps * 1e3, 3),
            "router_dense_host_ms": round(dense_s / steps * 1e3, 3)}


@torch.no_grad()
def replay_is_bitwise(router, batch: int, prompt: torch.Tensor) -> bool:
    """Captured segments vs the same segments uncaptured, from states loaded from one export."""
    from model_shards.segment_graphs import SegmentGraphs
    captured, uncaptured = router.graphs, SegmentGraphs(router.dense, is_captured=False)
    base = [router.new_state() for _ in range(batch)]
    router.step(base, [prompt[:200].cuda() for _ in range(batch)])
    twins = []
    for _ in range(2):
        twins.append([router.new_state() for _ in range(batch)])
        for s, b in zip(twins[-1], base):
            s.load(b.export())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        is_equal = True
        for t in range(3):
            toks = [prompt[200 + t + k: 201 + t + k] for k in range(batch)]
            router.graphs = captured
            got = torch.stack(router.step(twins[0], toks))
            router.graphs = uncaptured
            is_equal &= torch.equal(got, torch.stack(router.step(twins[1], toks)))
    finally:
        torch.use_deterministic_algorithms(False)
        router.graphs = captured
    return bool(is_equal)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="medium")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--regions", action="store_true", help="graph segments built from compiled decode regions")
    p.add_argument("--micro-batches", default="1,2")
    p.add_argument("--banks", type=int, default=1, help="experts split over this many in-process banks (shards)")
    p.add_argument("--expert-graphs", default="off", choices=("off", "on", "both"),
                   help="on: every bank gets every token and replays each layer from model_shards.expert_graphs "
                        "(what an every-token shard does over NCCL); both: each batch with the eager banks, "
                        "then with the graphs (one router, its compiled regions shared)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager-router baseline")
    p.add_argument("--no-bitwise", action="store_true", help="skip the captured = uncaptured check")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from model_shards import DeepseekV4
    from model_shards.random_checkpoint import generate
    path = args.checkpoint or tempfile.mkdtemp(prefix="router_gpu_")
    if not os.path.exists(os.path.join(path, "config.json")):
        generate(path, args.preset, "hf", "none", seed=0, dtype=torch.bfloat16, with_mtp=False)
    prompt = torch.randint(0, 1000, (1024,), generator=torch.Generator().manual_seed(0))
    result: dict = {"preset": args.preset, "machine": machine(), "regions": args.regions, "banks": args.banks,
                    "expert_graphs": args.expert_graphs, "decode": {}}
    model = DeepseekV4.from_pretrained(path, dtype=torch.bfloat16, device="cuda", load_mtp=False)
    floors = {b: decode_floor(model, b)["floor_ms"] for b in (int(x) for x in args.batches.split(","))}
    del model
    for micro_batches in (int(m) for m in args.micro_batches.split(",")):
        eager = None if args.no_eager else make_router(path, micro_batches, False, num_banks=args.banks)
        graphs = make_router(path, micro_batches, True, is_regions=args.regions, num_banks=args.banks,
                             expert_graphs=args.expert_graphs == "on")
        if args.expert_graphs == "both":   # the same banks, every token, one replay per layer
            from actors.transport.local import LocalTransport
            plain = graphs.transport
            replayed = LocalTransport(plain.banks, plain.owner.tolist(), expert_graphs=True)
        for batch, floor in floors.items():
            row = {"graphs": decode(graphs, batch, prompt), "floor_ms": floor}
            row["graphs"]["x_floor"] = round(row["graphs"]["step_ms"] / floor, 2)
            print(f"batch {batch} micro_batches {micro_batches}: {row}", file=sys.stderr, flush=True)
            if args.expert_graphs == "both":
                graphs.set_transport(replayed)
                row["graphs_expert_graphs"] = decode(graphs, batch, prompt)
                row["graphs_expert_graphs"]["x_floor"] = round(row["graphs_expert_graphs"]["step_ms"] / floor, 2)
                graphs.set_transport(plain)
                print(f"  with expert graphs: {row['graphs_expert_graphs']}", file=sys.stderr, flush=True)
            if eager is not None:
                row["eager"] = decode(eager, batch, prompt)
            if not args.no_bitwise:
                row["graphs"]["replay_equals_uncaptured_bitwise"] = replay_is_bitwise(graphs, min(batch, 64), prompt)
            result["decode"][f"b{batch}_mb{micro_batches}"] = row
            print(f"row b{batch} mb{micro_batches}: {row}", file=sys.stderr, flush=True)
        del eager, graphs
        torch.cuda.empty_cache()
    out = args.out or (os.path.join(os.environ["OUT"], "router_gpu.json") if os.environ.get("OUT") else None)
    emit(f"router_gpu ({args.preset})", result, out, not args.no_append,
         "Router + in-process bank on one GPU (LocalTransport): dense work eager vs CUDA-graph segments.")


if __name__ == "__main__":
    main()
