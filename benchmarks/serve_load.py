"""Serving load benchmark: output tokens/s and TTFT p50/p99 at several concurrencies, through
HTTP + Serve, and the same workload against the Engine called directly (in process).

    python benchmarks/serve_load.py [--presets tiny small] [--concurrency 1 8 32] [--max-tokens 64]
                                    [--requests-per-client 4] [--no-results]

Each client sends `requests-per-client` streaming requests one after another (greedy, thinking
off, EOS ignored so every request produces exactly max_tokens). TTFT is measured at the client
(request sent -> first content chunk); output tok/s = all completion tokens / wall time of the
level. The "direct" rows run the identical requests through `actors.engine.Engine` in this
process (one torch thread, as the Engine replica gets with num_cpus=1), so
`overhead_ms_per_token` = (HTTP wall per output token - direct wall per output token) at
concurrency 1: the cost of the proxy, the ingress, two Serve streaming hops and SSE.
Prints one JSON document; appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def prompt_text(client: int, request: int) -> str:
    return f"client {client} request {request}: " + "please summarise the following sentence. " * 3


def summarize(ttfts: list[float], num_tokens: int, wall_s: float, concurrency: int) -> dict:
    return {"concurrency": concurrency, "num_requests": len(ttfts), "output_tokens": num_tokens,
            "wall_s": round(wall_s, 3), "output_tok_per_s": round(num_tokens / wall_s, 1),
            "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 1),
            "ttft_p99_ms": round(1000 * percentile(ttfts, 0.99), 1),
            "wall_ms_per_token_per_stream": round(1000 * wall_s * concurrency / max(num_tokens, 1), 2)}


# ---- HTTP ----------------------------------------------------------------------------------------

async def http_level(url: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    ttfts: list[float] = []
    counts: list[int] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for r in range(per_client):
            body = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": prompt_text(c, r)}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}, "thinking": {"type": "disabled"}}
            t0 = time.perf_counter()
            first = None
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and "content" in chunk["choices"][0]["delta"] \
                            and chunk["choices"][0]["delta"]["content"] != "":
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        counts.append(chunk["usage"]["completion_tokens"])
            ttfts.append(first if first is not None else time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await client(-1, http)  # warm-up (not counted)
        ttfts.clear()
        counts.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, http) for c in range(concurrency)])
        wall = time.perf_counter() - t0
    return summarize(ttfts, sum(counts), wall, concurrency)


# ---- Engine in process ----------------------------------------------------------------------------

async def direct_level(engine, tokenizer, concurrency: int, per_client: int, max_tokens: int) -> dict:
    from actors.messages import GenerateRequest, TokenEvent
    from actors.sampling import SamplingParams
    from model_shards.chat_format import encode_messages

    ttfts: list[float] = []
    counts: list[int] = []
    seq = [0]

    async def client(c: int) -> None:
        for r in range(per_client):
            t0 = time.perf_counter()
            text = encode_messages([{"role": "user", "content": prompt_text(c, r)}], thinking=False)
            ids = tokenizer.encode(text)
            seq[0] += 1
            req = GenerateRequest(f"d{seq[0]}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                    is_eos_ignored=True))
            first, n = None, 0
            async for ev in engine.generate(req):
                if isinstance(ev, TokenEvent):
                    n += len(ev.token_ids)
                    if first is None and ev.text:
                        first = time.perf_counter() - t0
            ttfts.append(first if first is not None else time.perf_counter() - t0)
            counts.append(n)

    await client(-1)
    ttfts.clear()
    counts.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*[client(c) for c in range(concurrency)])
    return summarize(ttfts, sum(counts), time.perf_counter() - t0, concurrency)


# ---- driver ---------------------------------------------------------------------------------------

def checkpoint(preset: str) -> str:
    from cluster.tiny_checkpoint import default_cache_dir, ensure_tiny_checkpoint
    if preset == "tiny":
        return ensure_tiny_checkpoint()
    from model_shards.random_checkpoint import generate
    path = os.path.join(default_cache_dir(), f"{preset}-seed0-v1")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tmp = path + f".tmp{os.getpid()}"
        generate(tmp, preset, "hf", "none", seed=0)
        os.rename(tmp, path)
    return path


def machine() -> dict:
    import ray
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "os": platform.platform(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


def run_preset(preset: str, args) -> dict:
    import torch
    from ray import serve

    from actors.engine import Engine, EngineConfig
    from actors.runner import LocalRunner
    from cluster.app import build_app
    from model_shards.tokenizer import load_tokenizer

    path = checkpoint(preset)
    app_args = dict(model=path, num_replicas=1, max_num_seqs=64, max_num_batched_tokens=1024, kv_enabled=False)
    serve.run(build_app(app_args), name=f"bench-{preset}", route_prefix=f"/{preset}")
    url = f"http://127.0.0.1:{args.port}/{preset}"
    http_rows = [asyncio.run(http_level(url, c, args.requests_per_client, args.max_tokens)) for c in args.concurrency]
    serve.delete(f"bench-{preset}")

    torch.set_num_threads(1)  # what the Engine replica gets (num_cpus=1)
    runner = LocalRunner.from_pretrained(path)

    async def direct_all():
        engine = Engine(runner, load_tokenizer(path), EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024))
        rows = [await direct_level(engine, engine.tokenizer, c, args.requests_per_client, args.max_tokens)
                for c in args.concurrency]
        await engine.close()
        return rows

    direct_rows = asyncio.run(direct_all())
    one_http = next(r for r in http_rows if r["concurrency"] == 1) if 1 in args.concurrency else http_rows[0]
    one_direct = next(r for r in direct_rows if r["concurrency"] == one_http["concurrency"])
    overhead = one_http["wall_ms_per_token_per_stream"] - one_direct["wall_ms_per_token_per_stream"]
    return {"preset": preset, "http": http_rows, "direct": direct_rows,
            "overhead_ms_per_token": round(overhead, 2),
            "overhead_ttft_ms": round(one_http["ttft_p50_ms"] - one_direct["ttft_p50_ms"], 1)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"## serve_load — {result['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
             f"torch {m['torch']}, Ray {m['ray']}; {m['os']}; load average {m['load_avg_1m_at_start']} at "
             "start (other work shares the machine: compare rows of one section, not across sections).",
             f"Workload: streaming chat, greedy, thinking off, EOS ignored, {result['max_tokens']} output tokens "
             f"per request, {result['requests_per_client']} requests per client; 1 Engine replica (num_cpus=1, "
             "LocalRunner), KV cache off.", "",
             "| preset | path | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | ms/token/stream |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in result["presets"]:
        for kind in ("http", "direct"):
            for r in p[kind]:
                lines.append(f"| {p['preset']} | {kind} | {r['concurrency']} | {r['output_tok_per_s']} | "
                             f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['wall_ms_per_token_per_stream']} |")
    lines.append("")
    for p in result["presets"]:
        lines.append(f"- {p['preset']}: HTTP + Serve overhead at concurrency 1 = {p['overhead_ms_per_token']} ms per "
                     f"output token, {p['overhead_ttft_ms']} ms on TTFT (vs the Engine called in process).")
    return "\n".join(lines) + "\n\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1))
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        result = {"benchmark": "serve_load", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                  "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
                  "presets": [run_preset(preset, args) for preset in args.presets]}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print(json.dumps(result, indent=2))
    if not args.no_results:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
