"""Expert parallelism on GPUs: router (one GPU) + N expert shards (one GPU each) over NCCL.

    python benchmarks/ep_gpu.py [--shards N] [--preset medium] [--checkpoint DIR] [--no-append]
    python benchmarks/ep_gpu.py --cpu            # smoke run: tiny sizes, CPU + gloo, bf16
    --out FILE (default: $OUT/ep_gpu.json when $OUT is set) also writes the JSON result there;
    progress lines go to stderr as each measurement finishes (partial results survive a timeout).

Measures, for the `medium` preset (bf16, random weights):
- decode step time at batch 1 / 64 / 256 (each sequence with --context tokens of history), with
  overlap off (micro_batches=1) and on (micro_batches=2), and each step as a multiple of its HBM
  floor: (bytes the step must read: router weights + KV state + the experts its tokens hit on the
  busiest shard) / measured read bandwidth (`benchmarks.common.read_gbps`: (read + write) bytes/s of a 1 GiB device copy on GPUs);
- prefill tokens/s for --prefill-tokens tokens in one step, for each count in --prefill-seqs
  (default "1,4": one 8K prompt, whose micro-batches cut it inside the sequence, and 4 x 2048,
  split by sequence), overlap off (micro_batches=1) vs on (2);
- where the time goes: router dense compute vs time blocked on the experts (StepTiming), and the
  shards' expert compute / wait (StepReport; `shard_compute_ms` is host time, which for layers
  replayed from model_shards/expert_graphs is the replay launch, not the GPU work;
  `shard_graph_replays_per_step` counts those layers; `--no-expert-graphs` runs the shards eagerly).
Targets (issue #3): overlap >= 1.2x on prefill; decode at batch 64 within 3x of its floor.
The router runs inside a Ray actor holding one GPU (as the Engine's Serve replica would), so Ray
hands the shards the other GPUs. Default --shards: GPUs - 1.
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
from benchmarks.common import append_results, machine, read_gbps  # noqa: E402


class Bench:
    """Runs inside the router's actor: launch() there, then time steps."""

    def __init__(self, path: str, num_shards: int, dtype: str, is_gpu: bool, transport: str = "collective",
                 cuda_graphs: bool = True, compiled_decode: bool = False, shard_graphs: bool = True):
        from actors.launch import launch
        self.dtype = getattr(torch, dtype)
        self.is_gpu = is_gpu
        self.runner = launch(path, num_expert_shards=num_shards, dtype=self.dtype,
                             device="cuda" if is_gpu else "cpu", transport=transport, cuda_graphs=cuda_graphs,
                             compiled_decode=compiled_decode, shard_cuda_graphs=shard_graphs)
        self.cfg = self.runner.config

    def _sync(self) -> None:
        if self.is_gpu:
            torch.cuda.synchronize()

    def _prompts(self, num: int, length: int, seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, self.cfg.vocab_size, (length,), generator=gen) for _ in range(num)]

    def _prefill(self, states, prompts, max_tokens: int) -> None:
        step = max(1, max_tokens // max(1, prompts[0].numel()))
        for i in range(0, len(states), step):
            self.runner.step(states[i: i + step], prompts[i: i + step])

    def copy_gbps(self) -> float:
        """The device's read bandwidth for the floor (benchmarks.common.read_gbps)."""
        return read_gbps(self.runner.router.dense.device)

    def decode(self, batch: int, context: int, steps: int, micro_batches: int, max_prefill: int) -> dict:
        r = self.runner
        r.micro_batches = micro_batches
        states = [r.new_state() for _ in range(batch)]
        self._prefill(states, self._prompts(batch, context, batch), max_prefill)
        gen = torch.Generator().manual_seed(1)
        times, dense, wait, shard_compute, replays = [], [], [], [], []
        transport = r.router.transport
        for i in range(steps + 1):
            compute0 = getattr(transport, "compute_s", 0.0)
            tokens = [torch.randint(0, self.cfg.vocab_size, (1,), generator=gen) for _ in range(batch)]
            self._sync()
            t0 = time.perf_counter()
            r.step(states, tokens)
            self._sync()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
                dense.append(r.last_timing.dense_s)
                wait.append(r.last_timing.wait_s)
                if hasattr(transport, "step_reports"):   # collective: the shards' StepReports
                    reports = transport.step_reports()
                    shard_compute.append(max(rep.compute_s for rep in reports))
                    replays.append(sum(rep.num_graph_replays for rep in reports))
                else:                                    # ray: slowest shard per layer, summed
                    shard_compute.append(transport.compute_s - compute0)
        kv_bytes = sum(s.num_bytes() for s in states)
        return {"step_ms": _ms(times), "router_dense_ms": _ms(dense), "router_wait_ms": _ms(wait),
                "shard_compute_ms": _ms(shard_compute), "kv_bytes": kv_bytes,
                "shard_graph_replays_per_step": max(replays) if replays else 0}

    def prefill(self, num_seqs: int, tokens: int, micro_batches: int, repeats: int) -> dict:
        r = self.runner
        r.micro_batches = micro_batches
        per_seq = tokens // num_seqs
        best, timing = float("inf"), None
        for i in range(repeats + 1):
            states = [r.new_state() for _ in range(num_seqs)]
            prompts = self._prompts(num_seqs, per_seq, 100 + i)
            self._sync()
            t0 = time.perf_counter()
            r.step(states, prompts)
            self._sync()
            if i:
                dt = time.perf_counter() - t0
                if dt < best:
                    best, timing = dt, r.last_timing
        return {"tokens": per_seq * num_seqs, "tok_per_s": round(per_seq * num_seqs / best, 1),
                "step_ms": round(best * 1e3, 2), "router_wait_ms": round(timing.wait_s * 1e3, 2),
                "micro_batches": timing.num_micro_batches, "cut_sequences": timing.num_cut_sequences}

    def floor_bytes(self, batch: int) -> dict:
        """Bytes a decode step must read on the critical path, except the KV (added per run)."""
        cfg, dense = self.cfg, self.runner.router.dense
        size = torch.empty(0, dtype=self.dtype).element_size()
        router = sum(p.numel() * p.element_size() for p in dense.parameters())
        router -= dense.embed.weight.numel() * size - batch * cfg.hidden_size * size   # only B embedding rows
        expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * size                # one expert, one layer
        most = max(len(a) for a in self.runner.assignment)
        # expected share of a shard's experts hit by B tokens with top-k routing (uniform load)
        hit = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch
        return {"router_weight_bytes": int(router), "busiest_shard_expert_bytes": int(cfg.num_layers * most * expert * hit)}

    def shutdown(self) -> None:
        self.runner.shutdown()


def _progress(t_start: float, msg: str) -> None:
    print(f"[ep_gpu {time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _write(path: str | None, result: dict) -> None:
    if path:
        import json
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def _ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3) if xs else 0.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="smoke run on CPU: tiny preset, small batches")
    p.add_argument("--shards", type=int, default=0, help="expert shards (default: GPUs - 1; 2 with --cpu)")
    p.add_argument("--preset", default=None)
    p.add_argument("--checkpoint", default=None, help="reuse a checkpoint directory (else one is generated)")
    p.add_argument("--batches", default=None)
    p.add_argument("--context", type=int, default=None, help="history tokens per decoding sequence")
    p.add_argument("--prefill-tokens", type=int, default=None)
    p.add_argument("--prefill-seqs", default="1,4",
                   help="sequences sharing the prefill tokens, a comma list (the first one sets the target)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prefill-repeats", type=int, default=2, help="timed prefill steps per setting (best kept)")
    p.add_argument("--no-overlap-decode", action="store_true", help="decode with micro_batches=1 only")
    p.add_argument("--transport", default="collective", choices=("collective", "ray"))
    p.add_argument("--no-graphs", action="store_true", help="router decode steps eager (no CUDA-graph segments)")
    p.add_argument("--no-expert-graphs", action="store_true",
                   help="shards compute every layer eagerly (no model_shards.expert_graphs replays)")
    p.add_argument("--no-compiled-decode", action="store_true",
                   help="router decode layers as eager modules (default on GPUs with graphs: compiled regions, "
                        "model_shards.regions, as `dsv4 serve --compiled-decode auto`)")
    p.add_argument("--share-gpu", action="store_true",
                   help="router + shards on ONE GPU (Ray told it has shards + 1 GPUs, CUDA_VISIBLE_DEVICES left "
                        "alone). NCCL refuses two ranks on one GPU, so this needs --transport ray; a code-path "
                        "check for 1-GPU machines, not an EP measurement")
    p.add_argument("--out", default=None, help="also write the JSON here (default: $OUT/ep_gpu.json if $OUT)")
    p.add_argument("--address", default="local", help="Ray address: local (a fresh instance) or auto")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    is_smoke = args.cpu
    preset = args.preset or ("tiny" if is_smoke else "medium")
    batches = [int(b) for b in (args.batches or ("1,4" if is_smoke else "1,64,256")).split(",")]
    context = args.context or (32 if is_smoke else 512)
    prefill_tokens = args.prefill_tokens or (256 if is_smoke else 8192)
    steps = args.steps or (3 if is_smoke else 10)
    dtype = "bfloat16"

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from model_shards.random_checkpoint import generate

    out_path = args.out or (os.path.join(os.environ["OUT"], f"ep_gpu{'_cpu' if is_smoke else ''}.json")
                            if os.environ.get("OUT") else None)
    t_start = time.perf_counter()
    path = args.checkpoint
    if path is None:
        path = tempfile.mkdtemp(prefix="ep_gpu_")
    if not os.path.exists(os.path.join(path, "config.json")):   # --checkpoint DIR: generated once, then reused
        generate(path, preset, seed=0, dtype=torch.bfloat16, with_mtp=False)
        _progress(t_start, f"checkpoint {preset} generated in {path}")
    # Ray workers inherit this process's environment; name the NCCL settings that must stay put
    # (NVLink multicast off on shared hosts) explicitly anyway, so they reach every actor.
    if args.share_gpu:
        if args.transport != "ray" or is_smoke:
            raise SystemExit("--share-gpu needs --transport ray (NCCL: one rank per GPU) and a GPU")
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    # keep the inherited PYTHONPATH: where Ray itself comes from PYTHONPATH (a carried bundle), a
    # worker started with PYTHONPATH=ROOT alone dies on `import ray` and the actors never start
    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    env.update({k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                            "NVSHMEM_DISABLE_NVLS", "NCCL_DEBUG",
                                            "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") if k in os.environ})
    ray.init(address=args.address, include_dashboard=False, log_to_driver=not is_smoke,
             runtime_env={"env_vars": env}, **({"num_cpus": 4} if is_smoke and args.address == "local" else {}),
             **({"num_gpus": (args.shards or 1) + 1} if args.share_gpu else {}))
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    is_gpu = not is_smoke
    if is_gpu and num_gpus < 2:
        raise SystemExit(f"needs >= 2 GPUs (router + 1 shard); this cluster has {num_gpus}. Use --cpu for a smoke run.")
    num_shards = args.shards or (2 if is_smoke else num_gpus - 1)
    compiled_decode = is_gpu and not args.no_graphs and not args.no_compiled_decode
    actor = ray.remote(num_gpus=1 if is_gpu else 0, num_cpus=1)(Bench).remote(path, num_shards, dtype, is_gpu,
                                                                                     args.transport, not args.no_graphs,
                                                                                     compiled_decode,
                                                                                     not args.no_expert_graphs)
    result: dict = {"preset": preset, "dtype": dtype, "num_shards": num_shards, "device": "cuda" if is_gpu else "cpu",
                    "transport": args.transport, "shared_gpu": args.share_gpu, "router_graphs": not args.no_graphs,
                    "shard_graphs": not args.no_expert_graphs,
                    "router_compiled_decode": compiled_decode,
                    "context": context, "machine": machine(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "decode": {}, "prefill": {}}
    _progress(t_start, f"router actor started ({num_shards} shards, launching)")
    try:
        gbps = ray.get(actor.copy_gbps.remote())
        result["copy_gbps"] = round(gbps, 1)
        _progress(t_start, f"launched; copy bandwidth {gbps:.1f} GB/s (read + write)")
        _write(out_path, result)
        for b in batches:
            row = {}
            for mb in ((1, 2) if b > 1 and not args.no_overlap_decode else (1,)):
                d = ray.get(actor.decode.remote(b, context, steps, mb, prefill_tokens))
                fb = ray.get(actor.floor_bytes.remote(b))
                floor_ms = (fb["router_weight_bytes"] + d["kv_bytes"] + fb["busiest_shard_expert_bytes"]) / (gbps * 1e9) * 1e3
                d.update(fb, floor_ms=round(floor_ms, 3), x_floor=round(d["step_ms"] / floor_ms, 2))
                row[f"micro_batches_{mb}"] = d
                result["decode"][f"batch_{b}"] = row
                _progress(t_start, f"decode batch {b} micro_batches {mb}: {d}")
                _write(out_path, result)
        for n in (int(x) for x in args.prefill_seqs.split(",")):
            off = ray.get(actor.prefill.remote(n, prefill_tokens, 1, args.prefill_repeats))
            _progress(t_start, f"prefill {n} seqs, overlap off: {off}")
            on = ray.get(actor.prefill.remote(n, prefill_tokens, 2, args.prefill_repeats))
            _progress(t_start, f"prefill {n} seqs, overlap on: {on}")
            result["prefill"][f"seqs_{n}"] = {"overlap_off": off, "overlap_on": on,
                                              "overlap_speedup": round(on["tok_per_s"] / off["tok_per_s"], 3)}
            _write(out_path, result)
    finally:
        try:
            ray.get(actor.shutdown.remote())
        finally:
            ray.shutdown()
    b64 = result["decode"].get("batch_64", {}).get("micro_batches_1")
    first = next(iter(result["prefill"].values()))   # the first --prefill-seqs (default: one long prompt)
    result["targets"] = {"prefill_overlap_ge_1.2x": first["overlap_speedup"] >= 1.2,
                         "decode_b64_within_3x_floor": None if b64 is None else b64["x_floor"] <= 3.0}
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    _write(out_path, result)
    if args.no_append or is_smoke:
        import json
        print(json.dumps(result, indent=2))
    else:
        append_results(f"ep_gpu ({preset}, router + {num_shards} shards, NCCL)", result,
                       "Floor = (router weights + KV + busiest shard's hit experts) bytes / copy bandwidth "
                       "(read + write bytes/s). router_wait = time the router blocked on experts + wire.")
    return result


if __name__ == "__main__":
    main()
