"""The model on a GPU: CUDA logits equal CPU logits (fp32), and bf16 prefill / decode speed.

    python benchmarks/model_gpu.py [--preset small] [--no-append] [--out FILE]

--out FILE (default: $OUT/model_gpu.json when $OUT is set) also writes the JSON result there.

Checks that model_shards runs unchanged on CUDA (the same code that CI runs on CPU) and reports
prefill tokens/s at 8K and decode step time at batch 1 / 64 for one process holding every expert.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS for the graph check
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import decode_floor, emit, machine  # noqa: E402
from model_shards import DeepseekV4  # noqa: E402
from model_shards.random_checkpoint import generate  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def graph_decode(model, prompt: torch.Tensor, batch: int, floor_ms: float, is_compiled: bool = False,
                 is_regions: bool = False) -> dict:
    """Decode steps replayed from CUDA graphs (model_shards.cuda_graph): step time (host
    preparation included: the step's index build and copy, the replay, the counters' update),
    capture time, and a check that a replay gives bitwise the same logits as the same fixed-shape
    step run without the graph (from identical states, deterministic kernels). `is_compiled`:
    torch.compile the step before capturing it; Inductor's fused kernels round differently, so
    the check reports the largest relative difference instead of bitwise equality. `is_regions`:
    the step's layers run as compiled decode regions (model_shards.regions), in the graph and in
    the uncaptured reference alike."""
    from model_shards.cuda_graph import DecodeGraphs
    from model_shards.regions import DecodeRegions

    model.dense.regions = DecodeRegions(is_enabled=is_regions)
    graphs = DecodeGraphs(model, max_batch=batch, is_compiled=is_compiled)
    graphs.reserve(2 * batch + 2, 512)
    uncaptured = DecodeGraphs(model, max_batch=batch, is_captured=False)
    prompt = prompt.cpu()            # sampled tokens reach a step from the host
    base = [model.new_state() for _ in range(batch)]
    model.step(base, [prompt[:256].to(model.dense.device) for _ in range(batch)], all_logits=False)
    twins = []
    for _ in range(2):
        twins.append([model.new_state() for _ in range(batch)])
        for s, b in zip(twins[-1], base):
            s.load(b.export())
    del base
    torch.use_deterministic_algorithms(True, warn_only=True)
    sync()
    t0 = time.perf_counter()
    is_equal, worst = True, 0.0
    for t in range(3):
        toks = [prompt[256 + t + k: 257 + t + k] for k in range(batch)]
        got = torch.stack(graphs.step(twins[0], toks)).float()
        want = torch.stack(uncaptured.step(twins[1], toks)).float()
        is_equal &= torch.equal(got, want)
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        if t == 0:
            sync()
            capture_s = time.perf_counter() - t0
    torch.use_deterministic_algorithms(False)
    toks = [prompt[:1] for _ in range(batch)]
    for _ in range(3):
        graphs.step(twins[0], toks)
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        graphs.step(twins[0], toks)
    sync()
    step_ms = (time.perf_counter() - t0) / 20 * 1e3
    model.dense.regions = DecodeRegions(is_enabled=False)
    return {"step_ms": round(step_ms, 3), "x_floor": round(step_ms / floor_ms, 2),
            "first_step_with_capture_s": round(capture_s, 2), "num_captures": graphs.num_captures,
            "replay_equals_uncaptured_step_bitwise": bool(is_equal), "max_rel_diff_vs_uncaptured": round(worst, 5)}


@torch.no_grad()
def eager_regions(model, prompt: torch.Tensor, batch: int, floor_ms: float) -> dict:
    """Decode steps with compiled decode regions but no graphs: step time (first step: compile)."""
    from model_shards.regions import DecodeRegions

    model.dense.regions = DecodeRegions()
    states = [model.new_state() for _ in range(batch)]
    model.step(states, [prompt[:256] for _ in range(batch)], all_logits=False)
    toks = [prompt[:1] for _ in range(batch)]
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        model.step(states, toks, all_logits=False)
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        model.step(states, toks, all_logits=False)
    sync()
    step_ms = (time.perf_counter() - t0) / 10 * 1e3
    model.dense.regions = DecodeRegions(is_enabled=False)
    return {"step_ms": round(step_ms, 2), "x_floor": round(step_ms / floor_ms, 2),
            "first_3_steps_with_compile_s": round(warm_s, 1)}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--prefill", type=int, default=8192)
    p.add_argument("--batches", default="1,64", help="decode batch sizes")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the fp32 CUDA-vs-CPU check and write the checkpoint in bf16 (large presets)")
    p.add_argument("--checkpoint", default=None, help="reuse this checkpoint directory (generated there if absent)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph decode measurement")
    p.add_argument("--compiled-batches", default="",
                   help="also measure these batch sizes with the step torch.compile'd before capture (~90 s each)")
    p.add_argument("--regions-batches", default="",
                   help="also measure these batch sizes with compiled decode regions (graphs and eager)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here (default: $OUT/model_gpu.json if $OUT)")
    args = p.parse_args()
    out_path = args.out or (os.path.join(os.environ["OUT"], "model_gpu.json") if os.environ.get("OUT") else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled_batches = {int(b) for b in args.compiled_batches.split(",") if b}
    regions_batches = {int(b) for b in args.regions_batches.split(",") if b}
    result: dict = {"preset": args.preset, "device": device, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            tmp = args.checkpoint
        if os.path.exists(os.path.join(tmp, "config.json")):
            from model_shards import ModelConfig
            cfg = ModelConfig.from_json(tmp)
        else:
            cfg = generate(tmp, args.preset, "hf", "none", seed=0,
                           **({"dtype": torch.bfloat16, "with_mtp": False} if args.no_parity else {}))
        if not args.no_parity:
            ids = torch.randint(0, cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
            cpu = DeepseekV4.from_pretrained(tmp)(ids)
            gpu32 = DeepseekV4.from_pretrained(tmp, device=device)
            err = ((gpu32(ids.to(device)).cpu() - cpu).abs().max() / cpu.abs().max()).item()
            result["fp32_rel_err_vs_cpu"] = err
            # the batched decode path on the device (pooled states, paged entries) vs the full forward
            lengths = (290, 200, 97)
            states = [gpu32.new_state() for _ in lengths]
            gpu32.step(states, [ids[0, :n].to(device) for n in lengths], all_logits=False)
            worst = 0.0
            for t in range(10):
                rows = gpu32.step(states, [ids[0, n + t: n + t + 1].to(device) for n in lengths], all_logits=False)
                for n, row in zip(lengths, rows):
                    want = cpu[0, n + t]
                    worst = max(worst, ((row.cpu() - want).abs().max() / want.abs().max()).item())
            result["fp32_decode_rel_err_vs_cpu_full"] = worst
            print(f"fp32 CUDA batched decode vs CPU full forward max rel err {worst:.3g}", flush=True)
            del gpu32, states
            print(f"fp32 CUDA vs CPU max rel err {err:.3g}", flush=True)
        model = DeepseekV4.from_pretrained(tmp, dtype=torch.bfloat16, device=device)
        prompt = torch.randint(0, cfg.vocab_size, (args.prefill,), device=device)
        model(prompt[:512].unsqueeze(0))
        sync()
        t0 = time.perf_counter()
        state = model.new_state()
        for i in range(0, args.prefill, 2048):
            model.step([state], [prompt[i: i + 2048]], all_logits=False)
        sync()
        result["prefill_tok_s"] = round(args.prefill / (time.perf_counter() - t0), 1)
        print(f"prefill {result['prefill_tok_s']} tok/s", flush=True)
        for batch in (int(b) for b in args.batches.split(",")):
            states = [model.new_state() for _ in range(batch)]
            model.step(states, [prompt[:256] for _ in range(batch)], all_logits=False)
            toks = [prompt[:1] for _ in range(batch)]
            for _ in range(3):
                model.step(states, toks, all_logits=False)
            sync()
            t0 = time.perf_counter()
            for _ in range(10):
                model.step(states, toks, all_logits=False)
            sync()
            step_ms = (time.perf_counter() - t0) / 10 * 1e3
            result[f"decode_b{batch}_step_ms"] = round(step_ms, 2)
            del states
            result[f"decode_b{batch}_floor"] = floor = decode_floor(model, batch, step_ms=step_ms)
            print(f"decode batch {batch}: {step_ms:.2f} ms/step; floor {floor}", flush=True)
            if not args.no_graphs and device == "cuda":
                result[f"decode_b{batch}_graphs"] = graph_decode(model, prompt, batch, floor["floor_ms"])
                print(f"decode batch {batch} with CUDA graphs: {result[f'decode_b{batch}_graphs']}", flush=True)
            if batch in regions_batches:
                if device != "cuda":   # on GPUs regions are for graphs (eagerly, each new shape compiles)
                    result[f"decode_b{batch}_regions_eager"] = eager_regions(model, prompt, batch, floor["floor_ms"])
                    print(f"decode batch {batch}, regions without graphs: {result[f'decode_b{batch}_regions_eager']}",
                          flush=True)
                else:
                    result[f"decode_b{batch}_regions_graphs"] = graph_decode(model, prompt, batch, floor["floor_ms"],
                                                                             is_regions=True)
                    print(f"decode batch {batch}, regions + graphs: {result[f'decode_b{batch}_regions_graphs']}",
                          flush=True)
            if batch in compiled_batches and device == "cuda":
                result[f"decode_b{batch}_compiled_graphs"] = graph_decode(model, prompt, batch, floor["floor_ms"], True)
                print(f"decode batch {batch}, compiled + graphs: {result[f'decode_b{batch}_compiled_graphs']}",
                      flush=True)
    emit(f"model_gpu ({args.preset})", result, out_path, not args.no_append,
         "One process, every expert local, bf16 speed; fp32 parity.")


if __name__ == "__main__":
    main()
