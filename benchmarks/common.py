"""Helpers shared by the benchmark scripts: machine description and RESULTS.md appends."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            names = out.stdout.strip().splitlines()
            gpu = f", {len(names)}x {names[0]}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB{gpu}"


def append_results(title: str, result: dict, notes: str = "") -> None:
    """Print the JSON result and append a dated section to benchmarks/RESULTS.md."""
    print(json.dumps(result, indent=2))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS, "a") as f:
        f.write(f"\n## {title} — {stamp}\n\nMachine: {machine()}\n\n")
        if notes:
            f.write(notes.strip() + "\n\n")
        f.write("```json\n" + json.dumps(result, indent=2) + "\n```\n")


def emit(title: str, result: dict, out_path: str | None, is_appended: bool, notes: str = "") -> None:
    """The end of a benchmark: the JSON to `out_path` (if any), then appended to RESULTS.md
    (`is_appended`) or only printed."""
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
    if is_appended:
        append_results(title, result, notes)
    else:
        print(json.dumps(result, indent=2))


def read_gbps(device) -> float:
    """Memory read bandwidth a decode matmul reaches: a matrix-vector product over a 256 MiB fp32
    matrix on CPU (same threads as the model); on a GPU, (read + write) bytes/s of a 1 GiB copy."""
    import time

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        b.copy_(a)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        torch.cuda.synchronize()
        return 2 * a.numel() * 5 / (time.perf_counter() - t0) / 1e9
    w = torch.randn(16384, 4096)
    v = torch.randn(1, 4096)
    v @ w.T
    t0 = time.perf_counter()
    for _ in range(5):
        v @ w.T
    return w.numel() * 4 * 5 / (time.perf_counter() - t0) / 1e9


def decode_floor(model, batch: int, context: int = 256, step_ms: float | None = None) -> dict:
    """What one decode step of `model` (a DeepseekV4) at `batch` must read from memory, and the
    shortest time this machine can read it in.

    bytes = dense weights (all but the embedding table, of which only `batch` rows) + the routed
    experts the step's tokens actually hit (counted per layer in a real step) + the sequences' KV
    state after `context` tokens; floor_ms = bytes / read_gbps(device). With `step_ms`, also
    x_floor = step_ms / floor_ms."""
    import torch

    cfg, device = model.config, model.dense.device
    gen = torch.Generator().manual_seed(1)
    hit: list[int] = []

    def routed(layer_id, x, expert_ids, weights):
        hit.append(int(expert_ids.unique().numel()))
        return model.experts(layer_id, x, expert_ids, weights)

    with torch.no_grad():
        states = [model.new_state() for _ in range(batch)]
        model.step(states, [torch.randint(0, cfg.vocab_size, (context,), generator=gen).to(device)
                            for _ in range(batch)], all_logits=False)
        model.step(states, [torch.randint(0, cfg.vocab_size, (1,), generator=gen).to(device) for _ in range(batch)],
                   all_logits=False, routed=routed)
    embed = model.dense.embed.weight
    size = embed.element_size()
    dense = sum(p.numel() * p.element_size() for p in model.dense.parameters())
    dense -= embed.numel() * size - batch * cfg.hidden_size * size
    experts = sum(hit) * 3 * cfg.hidden_size * cfg.moe_intermediate_size * size
    kv = sum(s.num_bytes() for s in states)
    gbps = read_gbps(device)
    floor_ms = (dense + experts + kv) / gbps / 1e6
    out = {"dense_mb": round(dense / 2**20, 1), "experts_hit_mb": round(experts / 2**20, 1),
           "kv_mb": round(kv / 2**20, 2), "distinct_experts_per_layer": round(sum(hit) / max(len(hit), 1), 1),
           "read_gbps": round(gbps, 1), "floor_ms": round(floor_ms, 3)}
    if step_ms is not None:
        out["x_floor"] = round(step_ms / floor_ms, 2)
    return out
