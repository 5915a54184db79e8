"""The `dsv4` command: local serving, a terminal chat client, and checkpoint tools.

Owns: the processes `dsv4 serve` starts (a local Ray instance, a private redis-server, the Serve
app) and their shutdown. Every user error is one line on stderr and exit code 2, never a traceback.

    dsv4 serve [--model DIR] [--port 8000] ...     serve the OpenAI + Anthropic APIs locally
    dsv4 chat [--url http://127.0.0.1:8000]         chat in the terminal (streaming)
    dsv4 random-checkpoint OUT --preset tiny ...    write a random-weight checkpoint
    dsv4 split-checkpoint SRC OUT --shards N        pre-split a checkpoint per expert shard
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import urllib.error
import urllib.request

from cluster.local_mode import (LocalModeError, PrivateRedis, find_redis_server, port_is_free, wait_healthy,
                                watch_prefills)


class CliError(Exception):
    """A problem to report as one line (exit code 2)."""


# ---- dsv4 serve ------------------------------------------------------------------------------

def _serve_config(args):
    from cluster.config import ConfigError, ServeConfig

    options = {
        "served_model_names": args.served_model_name or ["deepseek-v4-flash"],
        "num_replicas": args.replicas, "num_expert_shards": args.expert_shards,
        "micro_batches": args.micro_batches, "max_num_seqs": args.max_num_seqs,
        "kv_device_bytes": args.kv_device_bytes, "kv_enabled": not args.no_kv_cache,
        "device": args.device, "dtype": args.dtype, "cuda_graphs": not args.no_cuda_graphs,
        "compiled_decode": args.compiled_decode,
    }
    if args.model:
        options["model"] = os.path.abspath(args.model)
    if args.api_key:
        options["api_key"] = args.api_key
    if args.kv_dir:
        options["kv_dir"] = os.path.abspath(args.kv_dir)
    if args.redis_url:
        options["kv_redis_url"] = args.redis_url
    try:
        return ServeConfig.from_args(options)
    except ConfigError as e:
        raise CliError(str(e)) from None


def cmd_serve(args) -> int:
    from tqdm import tqdm

    if not port_is_free(args.host, args.port):
        raise CliError(f"port {args.port} on {args.host} is in use (choose another with --port)")
    config = _serve_config(args)
    if config.model is None:
        from cluster.tiny_checkpoint import default_cache_dir, ensure_tiny_checkpoint
        with tqdm(total=1, desc="embedded tiny checkpoint", unit="ckpt", disable=args.quiet) as bar:
            path = ensure_tiny_checkpoint(default_cache_dir())
            bar.update(1)
        config = _serve_config_with(config, model=path)
    if not args.no_kv_cache and config.kv_dir is None:
        from cluster.tiny_checkpoint import default_cache_dir
        config = _serve_config_with(config, kv_dir=os.path.join(default_cache_dir(), "kv"))

    started: list = []  # cleanup actions, last first
    redis = None
    stopping = {"flag": False}

    def cleanup() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup short
            signal.signal(signum, signal.SIG_IGN)
        for action in reversed(started):
            try:
                action()
            except Exception:  # shutting down: report nothing, keep going
                pass
        started.clear()

    def on_signal(signum, frame):
        stopping["flag"] = True
        raise KeyboardInterrupt

    # Both signals, explicitly: a process started in the background of a non-interactive shell
    # inherits SIGINT as ignored, and Ray may install its own handlers during init.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        if not args.no_kv_cache and config.kv_redis_url is None:
            binary = find_redis_server()
            if binary is None:
                print("warning: no redis-server found; the KV cache uses the device and disk tiers only",
                      file=sys.stderr)
            else:
                redis = PrivateRedis(binary)
                started.append(redis.stop)
                atexit.register(redis.stop)  # second guard if the interpreter exits another way
                config = _serve_config_with(config, kv_redis_url=redis.url)
        import ray
        from ray import serve

        from cluster.app import build_app
        from cluster.engine_deployment import PROGRESS_ENV

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # the local Ray's workers inherit this: engine replicas write their loading progress there
        progress_dir = tempfile.mkdtemp(prefix="dsv4-progress-")
        started.append(lambda: shutil.rmtree(progress_dir, ignore_errors=True))
        os.environ[PROGRESS_ENV] = os.path.join(progress_dir, "engine")
        ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=args.verbose, configure_logging=args.verbose)
        started.append(ray.shutdown)
        serve.start(http_options={"host": args.host, "port": args.port})
        started.append(serve.shutdown)
        # deploy without waiting for the replicas, so the loading progress can be drawn meanwhile
        from ray.serve.api import RunTarget
        serve.run_many([RunTarget(build_app(config), name="dsv4", route_prefix="/")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        url = f"http://{host}:{args.port}"
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
        wait_healthy(url, args.startup_timeout, os.environ[PROGRESS_ENV], config.num_replicas, not args.quiet)
        model_id = config.served_model_names[0]
        auth = f" -H 'Authorization: Bearer {config.api_key}'" if config.api_key else ""
        print(f"dsv4-serve is ready at {url}  (OpenAI /v1/chat/completions, Anthropic /v1/messages)")
        print("try:")
        print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
              f"    -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
              f"\"max_tokens\": 32}}'")
        print("stop with Ctrl-C", flush=True)
        watch_prefills(os.environ[PROGRESS_ENV], config.num_replicas, not args.quiet)
    except KeyboardInterrupt:
        if not args.quiet:
            print("stopping...", file=sys.stderr)
        return 0
    finally:
        cleanup()


def _serve_config_with(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes).validate()


# ---- dsv4 chat -------------------------------------------------------------------------------

DIM, RESET = "\033[2m", "\033[0m"


def _stream_chat(url: str, payload: dict, api_key: str | None):
    """Yield (kind, text) from an OpenAI-format SSE stream."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:
            message = f"HTTP {e.code}"
        raise CliError(message) from None
    except urllib.error.URLError as e:
        raise CliError(f"cannot reach {url}: {e.reason}") from None
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("reasoning_content"):
                    yield "reasoning", delta["reasoning_content"]
                if delta.get("content"):
                    yield "content", delta["content"]


def cmd_chat(args) -> int:
    history: list[dict] = []
    thinking = not args.no_thinking
    print(f"chatting with {args.url} as {args.model}; /think on|off, /reset, /quit "
          f"(thinking {'on' if thinking else 'off'})")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history.clear()
            continue
        if text in ("/think on", "/think off"):
            thinking = text.endswith("on")
            print(f"thinking {'on' if thinking else 'off'}")
            continue
        history.append({"role": "user", "content": text})
        payload = {"model": args.model, "messages": history, "stream": True, "max_tokens": args.max_tokens,
                   "thinking": {"type": "enabled" if thinking else "disabled"},
                   **{k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}}
        answer = []
        kind_now = None
        try:
            for kind, piece in _stream_chat(args.url, payload, args.api_key):
                if kind != kind_now and kind_now == "reasoning":
                    print(RESET + "\n", end="")
                if kind == "reasoning" and kind_now != "reasoning":
                    print(DIM, end="")
                kind_now = kind
                print(piece, end="", flush=True)
                if kind == "content":
                    answer.append(piece)
        except KeyboardInterrupt:
            pass
        print(RESET)
        history.append({"role": "assistant", "content": "".join(answer)})


# ---- checkpoint tools ------------------------------------------------------------------------

def cmd_random_checkpoint(rest: list[str]) -> int:
    from model_shards.random_checkpoint import main as generator_main
    return generator_main(rest)


def cmd_split_checkpoint(args) -> int:
    """Write SRC's dense tensors to OUT/dense and each shard's experts to OUT/shard-K, so every
    node copies only what it loads. Each part is a loadable checkpoint directory of its own."""
    from model_shards.checkpoint import CheckpointError, CheckpointReader
    from model_shards.config import ConfigError, ModelConfig
    from model_shards.names import EXPERT
    from safetensors.torch import save_file

    try:
        cfg = ModelConfig.from_json(args.src)
        reader = CheckpointReader(args.src)
    except (ConfigError, CheckpointError) as e:
        raise CliError(str(e)) from None
    if not 1 <= args.shards <= cfg.n_routed_experts:
        raise CliError(f"--shards must be in [1, {cfg.n_routed_experts}]")
    bounds = [cfg.n_routed_experts * k // args.shards for k in range(args.shards + 1)]
    parts: dict[str, dict] = {"dense": {}}
    for name in reader.names():
        m = EXPERT.match(name)
        if m and not m.group(1):
            e = int(m.group(3))
            k = next(i for i in range(args.shards) if bounds[i] <= e < bounds[i + 1])
            parts.setdefault(f"shard-{k}", {})[name] = reader.read_raw(name).contiguous()
        else:
            parts["dense"][name] = reader.read_raw(name).contiguous()
    with open(os.path.join(args.src, "config.json")) as f:
        config_text = f.read()
    for part, tensors in parts.items():
        out = os.path.join(args.out, part)
        os.makedirs(out, exist_ok=True)
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(config_text)
        print(f"{out}: {len(tensors)} tensors")
    with open(os.path.join(args.out, "shards.json"), "w") as f:
        json.dump({"experts_per_shard": [[bounds[k], bounds[k + 1]] for k in range(args.shards)]}, f)
    return 0


# ---- entry point -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4", description="dsv4-serve: serve DeepSeek-V4-architecture models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve locally (single-node Ray, private Redis, the Serve app)")
    s.add_argument("--model", help="checkpoint directory (default: the embedded tiny random-weight model)")
    s.add_argument("--served-model-name", action="append",
                   help="model id clients use (repeatable; default deepseek-v4-flash)")
    s.add_argument("--expert-shards", type=int, default=0, help="expert-shard actors per replica (0 = in-process)")
    s.add_argument("--micro-batches", type=int, default=1)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the engine's weights live (auto: CUDA when the engine sees a GPU)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    s.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on GPUs too")
    s.add_argument("--compiled-decode", default="auto", choices=["auto", "on", "off"],
                   help="decode layers as compiled fused regions (auto: on with CUDA graphs; on CPUs "
                        "~20%% faster decode for ~40 s of compiling at start-up)")
    s.add_argument("--replicas", type=int, default=1, help="engine replicas")
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--redis-url", help="host-RAM KV tier (default: a private redis-server if one is found)")
    s.add_argument("--kv-dir", help="disk KV tier directory (default: ~/.cache/dsv4-serve/kv)")
    s.add_argument("--kv-device-bytes", type=int, default=1 << 30, help="device KV tier budget")
    s.add_argument("--no-kv-cache", action="store_true", help="disable prefix caching")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require this key (Authorization: Bearer or x-api-key)")
    s.add_argument("--num-cpus", type=int, default=0, help="CPUs for the local Ray (default: all)")
    s.add_argument("--startup-timeout", type=float, default=600.0)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--verbose", action="store_true", help="show Ray's logs")

    c = sub.add_parser("chat", help="chat with a running server in the terminal")
    c.add_argument("--url", default="http://127.0.0.1:8000")
    c.add_argument("--model", default="deepseek-v4-flash")
    c.add_argument("--api-key")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--no-thinking", action="store_true", help="start with thinking off")
    c.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    c.add_argument("--seed", type=int, help="sampling seed, for repeatable replies")

    sub.add_parser("random-checkpoint", help="write a random-weight checkpoint (see --help)", add_help=False)

    sp = sub.add_parser("split-checkpoint", help="pre-split a checkpoint into dense + per-shard experts")
    sp.add_argument("src")
    sp.add_argument("out")
    sp.add_argument("--shards", type=int, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "random-checkpoint":
        return cmd_random_checkpoint(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "chat":
            return cmd_chat(args)
        return cmd_split_checkpoint(args)
    except (CliError, LocalModeError) as e:
        print(f"dsv4: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
