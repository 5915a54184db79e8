"""Expert parallelism on CPU: per-layer dispatch + combine overhead, collective vs Ray transport,
and decode step time of router + 2 shards vs the single-process model.

    python benchmarks/ep_cpu.py [--preset small] [--shards 2] [--layers 64] [--iters 5] [--no-append]

1. Overhead: on a launched router + N shards, the transport alone runs `--layers` MoE layers of
   dispatch then combine (no overlap) with random routing at decode batch 1 and 32. Reported per
   layer: the round trip (p50 over --iters runs), the shards' expert compute in it (the slowest
   shard's), and overhead = round trip - compute.
2. Decode: B sequences (16-token prompts), then decode steps; p50 step time for the
   single-process DeepseekV4 and for router + N shards (collective M=1 / M=2, ray M=1).
Targets (issue #3): collective overhead <= 1 ms per layer here, and >= 5x below the Ray transport.
Prints JSON and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results  # noqa: E402


def routing(batch: int, cfg, seed: int):
    """x [B, hidden], expert_ids [B, k] (distinct per row), weights [B, k]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.hidden_size, generator=gen)
    ids = torch.rand(batch, cfg.n_routed_experts, generator=gen).argsort(dim=1)[:, : cfg.num_experts_per_tok]
    weights = torch.rand(batch, cfg.num_experts_per_tok, generator=gen)
    return x, ids.contiguous(), weights


def overhead_collective(runner, batch: int, layers: int, iters: int) -> dict:
    t = runner.transports["collective"]
    t.ensure_ready()
    cfg = runner.config
    rounds, computes = [], []
    for it in range(iters + 1):                          # first run warms up
        x, ids, w = routing(batch, cfg, it)
        layer_ids = tuple(i % cfg.num_layers for i in range(layers))
        t.begin_step(10_000 + it, layer_ids, (batch,))
        t0 = time.perf_counter()
        for layer in layer_ids:
            t.combine(t.dispatch(layer, 0, x, ids, w))
        total = time.perf_counter() - t0
        t.end_step()
        reports = t.step_reports()
        if it:
            rounds.append(total / layers)
            computes.append(max(r.compute_s for r in reports) / layers)
    return _summary(rounds, computes)


def overhead_ray(runner, batch: int, layers: int, iters: int) -> dict:
    t = runner.transports["ray"]
    cfg = runner.config
    rounds, computes = [], []
    for it in range(iters + 1):
        x, ids, w = routing(batch, cfg, it)
        t.compute_s = 0.0
        t0 = time.perf_counter()
        for layer in range(layers):
            t.combine(t.dispatch(layer % cfg.num_layers, 0, x, ids, w))
        total = time.perf_counter() - t0
        if it:
            rounds.append(total / layers)
            computes.append(t.compute_s / layers)
    return _summary(rounds, computes)


def _summary(rounds: list[float], computes: list[float]) -> dict:
    r, c = statistics.median(rounds), statistics.median(computes)
    return {"round_trip_us": round(r * 1e6, 1), "expert_compute_us": round(c * 1e6, 1),
            "overhead_us": round((r - c) * 1e6, 1)}


@torch.no_grad()
def decode_ms(new_state, step, batch: int, steps: int, vocab: int) -> float:
    gen = torch.Generator().manual_seed(batch)
    states = [new_state() for _ in range(batch)]
    step(states, [torch.randint(0, vocab, (16,), generator=gen) for _ in range(batch)])
    times = []
    for _ in range(steps + 1):
        tokens = [torch.randint(0, vocab, (1,), generator=gen) for _ in range(batch)]
        t0 = time.perf_counter()
        step(states, tokens)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times[1:]) * 1e3, 2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--layers", type=int, default=64, help="MoE layers per overhead run")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from actors.launch import launch
    from model_shards import DeepseekV4
    from model_shards.random_checkpoint import generate

    tmp = tempfile.mkdtemp(prefix="ep_cpu_")
    cfg = generate(tmp, args.preset, seed=0, with_mtp=False)
    ray.init(address="local", num_cpus=max(4, args.shards + 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    # Router + shards share the cores: the router gets one torch thread (a second one would spin
    # against the shards' processes); the single-process model gets them all.
    cores = os.cpu_count() or 1
    result: dict = {"preset": args.preset, "num_shards": args.shards, "hidden": cfg.hidden_size,
                    "num_layers": cfg.num_layers, "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
                    "threads": {"router": 1, "each_shard": 1, "single_process": cores}, "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
                    "overhead_per_layer": {}, "decode_step_ms": {}}
    try:
        torch.set_num_threads(1)
        runner = launch(tmp, num_expert_shards=args.shards, transport="collective")
        try:
            for b in batches:
                result["overhead_per_layer"][f"batch_{b}"] = {
                    "collective": overhead_collective(runner, b, args.layers, args.iters),
                    "ray": overhead_ray(runner, b, args.layers, args.iters)}
            for b in batches:
                row = {}
                for name, transport, mb in (("collective_m1", "collective", 1), ("collective_m2", "collective", 2),
                                            ("ray_m1", "ray", 1)):
                    runner.use_transport(transport)
                    runner.micro_batches = mb
                    row[name] = decode_ms(runner.new_state, runner.step, b, args.decode_steps, cfg.vocab_size)
                result["decode_step_ms"][f"batch_{b}"] = row
        finally:
            runner.shutdown()
        torch.set_num_threads(cores)
        model = DeepseekV4.from_pretrained(tmp, load_mtp=False)
        for b in batches:
            result["decode_step_ms"][f"batch_{b}"]["single_process"] = decode_ms(
                model.new_state, lambda s, t: model.step(s, t, all_logits=False), b, args.decode_steps,
                cfg.vocab_size)
    finally:
        ray.shutdown()
    checks = {}
    for b in batches:
        o = result["overhead_per_layer"][f"batch_{b}"]
        checks[f"batch_{b}"] = {"collective_le_1ms": o["collective"]["overhead_us"] <= 1000,
                                "ray_over_collective": round(o["ray"]["overhead_us"] / max(o["collective"]["overhead_us"], 1e-3), 1)}
    result["targets"] = checks
    if args.no_append:
        import json
        print(json.dumps(result, indent=2))
    else:
        append_results(f"ep_cpu ({args.preset}, router + {args.shards} shards)", result,
                       "Overhead = dispatch + combine round trip per MoE layer minus the slowest shard's expert "
                       "compute; router and shards share this machine's cores.")
    return result


if __name__ == "__main__":
    main()
