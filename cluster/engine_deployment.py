"""EngineDeployment: one Engine replica as a Serve deployment (one router with its shards).

Owns: the replica's Engine (and through it the runner, the sequences and the KV-cache client).
The ingress reaches it through a DeploymentHandle: `generate` is a streaming method (an async
generator; the ingress calls it with `handle.options(stream=True)`), and cancelling that call
(the HTTP client went away) aborts the sequence. `check_health` makes Serve restart a replica
whose step loop or expert shards died.

Runner choice: `num_expert_shards == 0` runs every expert in this process (`LocalRunner`);
otherwise `actors.launch(checkpoint, num_expert_shards=N, micro_batches=M, transport=T)` starts
the expert-shard actors and returns a handle with the same ModelRunner protocol.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from actors.engine import Engine
from actors.engine_prefix import KVServicePrefixCache, NoPrefixCache
from actors.messages import GenerateRequest
from actors.runner import LocalRunner
from cluster.config import ServeConfig
from model_shards.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


PROGRESS_ENV = "DSV4_PROGRESS_FILE"  # set by `dsv4 serve`: replicas report weight loading there


def loading_progress(replica_index: int):
    """A progress(bytes_read, total) callback writing `<$DSV4_PROGRESS_FILE>.<replica>` (JSON,
    replaced atomically, at most every 0.2 s) for the local CLI's progress bar; None when unset."""
    base = os.environ.get(PROGRESS_ENV)
    if not base:
        return None
    path, last = f"{base}.{replica_index}", [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"done": done, "total": total}, f)
        os.replace(tmp, path)

    return report


def report_prefills(engine: Engine, replica_index: int) -> None:
    """While $DSV4_PROGRESS_FILE is set, write `<file>.<replica>.prefill` = the progress of long
    prefills (see Engine.prefill_progress) every 0.5 s from a daemon thread, for the local CLI."""
    base = os.environ.get(PROGRESS_ENV)
    if not base:
        return
    path = f"{base}.{replica_index}.prefill"

    def loop() -> None:
        while True:
            done, total = engine.prefill_progress()
            try:
                with open(f"{path}.tmp", "w") as f:
                    json.dump({"done": done, "total": total}, f)
                os.replace(f"{path}.tmp", path)
            except OSError:  # the CLI removed its directory: it is shutting down
                return
            time.sleep(0.5)

    threading.Thread(target=loop, name="prefill-progress", daemon=True).start()


def make_runner(config: ServeConfig, checkpoint_dir: str, progress=None):
    device, dtype = config.resolve_device()
    compiled_decode = config.is_compiled_decode(device)
    if config.num_expert_shards == 0:
        return LocalRunner.from_pretrained(checkpoint_dir, dtype=dtype, device=device, progress=progress,
                                           cuda_graphs=config.cuda_graphs, max_num_seqs=config.max_num_seqs,
                                           compiled_decode=compiled_decode)
    from actors.launch import launch  # lazy: starts Ray actors (the expert shards)
    return launch(checkpoint_dir, num_expert_shards=config.num_expert_shards,
                  micro_batches=config.micro_batches, transport=config.transport, dtype=dtype, device=device,
                  cuda_graphs=config.cuda_graphs, max_graph_batch=config.max_num_seqs,
                  compiled_decode=compiled_decode)


def make_prefix_cache(config: ServeConfig, runner, replica_index: int):
    if not config.kv_enabled:
        return NoPrefixCache()
    disk_dir = None
    if config.kv_dir:
        # One directory per replica: each replica's disk tier is its own writer; Redis is shared.
        disk_dir = os.path.join(config.kv_dir, f"replica-{replica_index}")
    return KVServicePrefixCache.build(runner.config, runner.fingerprint, redis_url=config.kv_redis_url,
                                      disk_dir=disk_dir, options=config.kv_options())


class EngineDeployment:
    def __init__(self, config: ServeConfig, replica_index: int = 0):
        self.config = config
        self.replica_index = replica_index
        path = config.resolve_model_path()
        self.runner = make_runner(config, path, loading_progress(replica_index))
        self.tokenizer = load_tokenizer(path)
        cache = make_prefix_cache(config, self.runner, replica_index)
        self.engine = Engine(self.runner, self.tokenizer, config.engine_config(), cache)
        report_prefills(self.engine, replica_index)
        log.info("engine replica %d ready: %s, %d expert shards", replica_index, path, config.num_expert_shards)

    async def generate(self, request: GenerateRequest):
        async for event in self.engine.generate(request):
            yield event

    async def stats(self):
        return self.engine.stats()

    async def is_healthy(self) -> bool:
        return await self.engine.check_health()

    async def check_health(self) -> None:
        if not await self.engine.check_health():
            raise RuntimeError("engine unhealthy (step loop or expert shards down)")

    async def flush_cache(self, timeout_s: float = 30.0) -> bool:
        """Wait for background KV writes (tests and orderly shutdown)."""
        flush = getattr(self.engine.cache, "flush", None)
        return True if flush is None else bool(flush(timeout_s))

    async def __del__(self):
        try:
            await self.engine.close()
            self.runner.shutdown()
        except Exception:
            pass
