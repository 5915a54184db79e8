"""Where a decode (or prefill) step's time goes: operator and kernel counts, top operators, host syncs.

    python benchmarks/decode_profile.py [--preset small] [--checkpoint DIR] [--batches 1,8]
        [--dtype float32|bfloat16] [--steps 3] [--graphs] [--out FILE]
    python benchmarks/decode_profile.py --prefill 4x2048,1x8192 [--batches ""]   # prefill steps too
        [--eager-mhc] [--eager-attention] [--key-align 1]   # prefill_compiled.py's pieces off (A/B)

One process holding every expert (DeepseekV4), on CUDA when available. For each batch size: the
sequences get a 256-token prompt, then `--steps` decode steps run under torch.profiler; reports per
step the wall time, the number of aten operators launched from Python, CUDA kernels launched and
their summed GPU time, cudaStreamSynchronize / cudaMemcpyAsync calls, and the operators with the
most self CPU time. Also the seconds `DenseModel.warm_up_prefill` took (the compile engines do at
start on GPUs: `prefill_warm_up_s`). Prints JSON (also to --out, default $OUT/decode_profile.json when $OUT is set);
appends nothing to RESULTS.md (a diagnostic, not a target).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_shards import DeepseekV4, ModelConfig  # noqa: E402
from model_shards.attention import Attention  # noqa: E402
from model_shards.random_checkpoint import generate  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def profile_batch(model: DeepseekV4, batch: int, steps: int, device: str, is_graphs: bool = False) -> dict:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    states = [model.new_state() for _ in range(batch)]
    model.step(states, [torch.randint(0, vocab, (256,), generator=gen) for _ in range(batch)], all_logits=False)
    tokens = [torch.randint(0, vocab, (1,), generator=gen) for _ in range(batch)]
    if is_graphs:
        from model_shards.cuda_graph import DecodeGraphs
        graphs = DecodeGraphs(model, max_batch=batch)

        def step():
            graphs.step(states, tokens)
    else:
        def step():
            model.step(states, tokens, all_logits=False)
    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    host = 0.0
    for _ in range(steps):
        h0 = time.perf_counter()
        step()
        host += time.perf_counter() - h0
    sync(device)
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    host_ms = host / steps * 1e3   # until step() returned: host work, plus any wait for the GPU inside it
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    out = {"step_ms": round(step_ms, 2), "host_ms_in_step_call": round(host_ms, 2)}
    out.update(summarize(prof, steps, device))
    return out


def summarize(prof, steps: int, device: str) -> dict:
    """The profiler's per-step counts: aten ops, top self-CPU ops and, on CUDA, kernels and syncs."""
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    top = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    out = {"aten_ops_per_step": round(sum(e.count for e in aten) / steps),
           "top_self_cpu_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 3) for e in top}}
    if device == "cuda":
        gpu = sorted((e for e in events if e.device_time_total > 0 and not e.key.startswith("aten::")),
                     key=lambda e: e.device_time_total, reverse=True)[:16]
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        runtime = {e.key: e.count for e in events if e.key.startswith("cuda")}
        out.update(top_gpu_ms_per_step={e.key[:90]: round(e.device_time_total / 1e3 / steps, 3) for e in gpu},
                   kernels_per_step=round(len(kernels) / steps),
                   gpu_kernel_ms_per_step=round(sum(e.device_time_total for e in kernels) / 1e3 / steps, 3),
                   stream_syncs_per_step=round(runtime.get("cudaStreamSynchronize", 0) / steps),
                   memcpy_async_per_step=round(runtime.get("cudaMemcpyAsync", 0) / steps),
                   launches_per_step=round(runtime.get("cudaLaunchKernel", 0) / steps))
    return out


@torch.no_grad()
def profile_prefill(model: DeepseekV4, num_seqs: int, length: int, steps: int, device: str) -> dict:
    """`num_seqs` fresh prompts of `length` tokens in one step: wall time, tokens/s, profile."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(length)
    prompts = [torch.randint(0, vocab, (length,), generator=gen) for _ in range(num_seqs)]

    def step():
        model.step([model.new_state() for _ in range(num_seqs)], prompts, all_logits=False)
    step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    best = min(times)
    return {"step_ms": round(best * 1e3, 2), "tokens_per_s": round(num_seqs * length / best, 1),
            **summarize(prof, 1, device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--checkpoint", default=None, help="reuse this checkpoint directory (generated there if absent)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--graphs", action="store_true", help="replay decode steps from CUDA graphs (model_shards.cuda_graph)")
    p.add_argument("--regions", action="store_true", help="compiled decode regions (model_shards.regions)")
    p.add_argument("--prefill", default="", help="prefill shapes NUMxLEN, comma-separated (e.g. 4x2048,1x8192)")
    p.add_argument("--eager-mhc", action="store_true",
                   help="prefill mHC eagerly (turns model_shards.prefill_compiled.PrefillMHC off: the earlier path)")
    p.add_argument("--eager-attention", action="store_true",
                   help="prefill attention eagerly (turns model_shards.prefill_compiled.PrefillAttention off)")
    p.add_argument("--eager-indexer", action="store_true",
                   help="prefill indexer top-k eagerly (turns model_shards.prefill_compiled.PrefillIndexer off)")
    p.add_argument("--fp32-indexer", action="store_true",
                   help="prefill indexer scores as a float32 GEMM (the earlier path; default on GPUs: bf16 "
                        "operands, float32 accumulation)")
    p.add_argument("--key-align", type=int, default=None,
                   help="Attention.KEY_ALIGN_GPU (1: the unaligned window keys of the earlier path)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    path = args.checkpoint or tempfile.mkdtemp(prefix="decode_profile_")
    if not os.path.exists(os.path.join(path, "config.json")):
        generate(path, args.preset, "hf", "none", seed=0, dtype=dtype, with_mtp=False)
    model = DeepseekV4.from_pretrained(path, dtype=dtype, device=device, load_mtp=False)
    cfg: ModelConfig = model.config
    if args.eager_mhc:
        model.dense.prefill_mhc.is_enabled = False
    if args.eager_attention:
        model.dense.prefill_attention.is_enabled = False
    if args.eager_indexer:
        model.dense.prefill_indexer.is_enabled = False
    if args.fp32_indexer:
        for layer in model.dense.layers:
            if layer.attn.indexer is not None:
                layer.attn.indexer.is_half_gemm = False
    if args.key_align is not None:
        Attention.KEY_ALIGN_GPU = args.key_align
    if args.regions:
        from model_shards.regions import DecodeRegions
        model.dense.regions = DecodeRegions()
    t0 = time.perf_counter()
    model.dense.warm_up_prefill()   # what engines compile at start (GPUs; nothing on CPUs)
    warm_up_s = time.perf_counter() - t0
    result = {"preset": args.preset, "device": device, "graphs": args.graphs, "regions": args.regions,
              "prefill_mhc": model.dense.prefill_mhc.is_enabled,
              "prefill_attention": model.dense.prefill_attention.is_enabled, "key_align_gpu": Attention.KEY_ALIGN_GPU,
              "half_gemm_indexer": not args.fp32_indexer, "prefill_indexer": model.dense.prefill_indexer.is_enabled,
              "dtype": str(dtype).removeprefix("torch."), "prefill_warm_up_s": round(warm_up_s, 2),
              "num_layers": cfg.num_layers, "threads": torch.get_num_threads(), "decode": {}}
    for shape in filter(None, args.prefill.split(",")):
        num_seqs, length = (int(x) for x in shape.split("x"))
        result.setdefault("prefill", {})[shape] = profile_prefill(model, num_seqs, length, args.steps, device)
        print(f"prefill {shape}: {result['prefill'][shape]}", file=sys.stderr, flush=True)
    for batch in (int(b) for b in filter(None, args.batches.split(","))):
        result["decode"][f"batch_{batch}"] = profile_batch(model, batch, args.steps, device, args.graphs)
        print(f"batch {batch}: {result['decode'][f'batch_{batch}']}", file=sys.stderr, flush=True)
    out = args.out or (os.path.join(os.environ["OUT"], "decode_profile.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
