"""KV cache benchmark (issue #4): restore throughput, bytes per token, a 1M-token context, the
effect of FP8 storage on logits, and TTFT of a cached long prompt.

    python benchmarks/kvcache.py [--quick] [--restore-only] [--no-append] [--redis-url URL]

``--restore-only`` runs just the restore section (tiny at 64K and 512K tokens, small at 64K;
a few minutes) and appends it as "kvcache restore".

Prints one JSON object and appends it, dated, with the machine, to benchmarks/RESULTS.md.
Every measurement runs with ONE torch thread (a shared 2-core machine: more threads contend);
timings are the best of several runs except the cold 32K prefill (one run). Sections:

- restore: lookup of a tiny-layout state (``--restore-only`` adds the small preset) from Redis
  alone and from disk alone (fresh service instances, device tier off so nothing is promoted),
  in GB/s of record bytes, against the raw speed of the same bytes: redis-py fetching the same
  keys through a client with the Redis tier's settings (pipelined GET, and MGET), the same
  MGETs on a socket read with ``recv_into`` into a reused buffer (no parsing), and plain
  reads of the segment files that hold them (page cache warm for both): ``read()`` into a new
  buffer, and ``readinto()`` a buffer reused across runs (warm memory, like the restore's
  pooled output; see READING_NOTES). Disk also from a cold page cache ("disk (cold)" rows):
  before every timed run of the restore and of ``read()`` the segment files are evicted
  (the restore's own mapped pages released, then fsync + ``POSIX_FADV_DONTNEED``; mincore
  checks it, `resident_after_evict`), so both read the same bytes from the device; the process
  stays warm (its parse cache, pools and open segment maps). "Ours" is what `resume()` does: the deferred lookup
  (hashing the tokens, index reads, fetch, parse) and the import into a state of the preset's
  model (``model.new_state()`` from its StatePool, then the load: each record's checksum pass,
  then its rows copied once, straight into the pool's pages); the state is checked bitwise.
  "eager" (a column) is the lookup that assembles the state dict plus the same import (two
  copies; the engine restores through the deferred one). Each preset and size has its own fingerprint and directory, and
  the readers run interleaved in a rotating order (see `best_interleaved`).
- bytes_per_token: from the state layout (kvcache/footprint.py), no weights: the tiny preset and
  the V4-Flash config (``ModelConfig.from_dict({})``: 43 layers, head_dim 512, ...), as computed
  and FP8, against plain full-attention KV and V3.2-style MLA at the same value width.
- million: a 1M-token context on the tiny preset. The state tensors are SYNTHESIZED with the exact
  names, shapes and dtypes the tiny model exports (kvcache/synthetic.py; tested against the
  model) because running the model over 1M tokens takes hours on 2 cores. Commit (device +
  background writes to Redis and disk), then a new process restores from Redis alone and from
  disk alone and checks the bytes against the original.
- fp8: max |dlogits| / max |logits| after restoring an FP8-stored state and 32 teacher-forced
  decode steps, tiny and small presets (random weights).
- ttft: `small` preset, a cached 32K-token prompt resent: cold = chunked prefill (2048-token
  chunks, cut at the checkpoints the engine exports); cached = lookup (at most len - 1 tokens)
  + from_export + prefill of the rest + first-token logits, from each tier.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_results  # noqa: E402
from kvcache import checksum, footprint  # noqa: E402
from kvcache.redis_tier import make_client  # noqa: E402
from kvcache.segments import evict_file, page_cache_fraction  # noqa: E402
from kvcache.resume import decode, import_state, prefill, prompt_checkpoints, resume  # noqa: E402
from kvcache.service import KVCacheService  # noqa: E402
from kvcache.synthetic import SyntheticLayout, synthetic_state  # noqa: E402
from model_shards import DeepseekV4, ModelConfig  # noqa: E402
from model_shards.random_checkpoint import PRESETS, generate  # noqa: E402

FINGERPRINT = "kvcache-benchmark"
READING_NOTES = (
    "Reading the restore rows: a restore does strictly more than a raw read of its bytes: it hashes the "
    "tokens, parses the records, runs a checksum pass over every byte and copies every byte into the state. "
    "Where the raw read lands in warm memory it is one memcpy (~6-18 GB/s here; the top when the file's "
    "pages are still in the 32 MiB L3, as at 12.9 MB), and the checksum pass (~0.5-0.8 of a memcpy) plus the "
    "copy (~1 memcpy) alone exceed 1/0.7 of it there: measured without any Python around them, the checksum "
    "and copy of tiny 64K's 16 spans take ~1.2 ms against ~0.65 ms for readinto(). A read() of 32 MiB or more "
    "always gets fresh pages from glibc (~2-6 us per 4 KiB page fault in this VM) while the restore's output "
    "comes from a pool of warm memory (kvcache/memory.py), so those read() rows flatter the restore. The "
    "redis-py rows are bound by redis-py's parser; whether its reply buffers land in warm memory or fault "
    "depends on what ran just before, which is why the readers rotate. The Redis tier reads its MGET replies "
    "itself (kvcache/resp_reader.py: recv_into pooled memory, one copy) rather than through redis-py's parser "
    "(three copies into fresh memory), so the redis-py rows now measure the tier against the client it "
    "replaced; the socket recv_into row is the strict one (one copy into warm memory and no parsing at all). "
    "Records are parsed once per process and the parse reused while the bytes it read are unchanged "
    "(kvcache/parse_cache.py); the checksum pass still runs over every data byte of every restore. Since the "
    "deferred restore (kvcache/restore.py) the restore rows time lookup + import into the model's pooled state "
    "(the copy moved from the lookup into the state load, so the import is timed too). With a C compiler the "
    "checksum pass and the copy are one pass (model_shards/byte_kernels.py: each word of a record read once, "
    "summed by colsum64's columns and stored into the pool's pages, every record of a load in one call; each "
    "record verified from its sums): per byte one read and one write, as read() does; without a compiler, a "
    "checksum pass then a copy. Each restore row is the best of repeated lookups of one prefix: where no tier "
    "lacks a change count (the disk rows' services have no Redis tier) a deferred lookup asked again while no "
    "tier changed replays its restore plan (kvcache/restore_plan.py: the records found and parsed the first "
    "time and the load planned once; every record's bytes still verified at every restore), so at tiny 64K what "
    "keeps the ratio below 1 is ~0.5 ms of Python around a copy that costs what read() costs (new_state, the "
    "replay with its comparison of the token ids, the load's digests and planning, when the runs before it "
    "flushed the caches); a first restore of a prefix, or any with a Redis tier, finds and parses its records "
    "again (~0.8 ms more at tiny 64K). The \"disk (cold)\" "
    "rows read the same bytes from the device: before every timed run of the restore (ours and eager) and of "
    "read() the segment files are evicted from memory (the disk tier's own mapped pages released, then fsync + "
    "POSIX_FADV_DONTNEED; `resident_after_evict` is the largest page-cache fraction mincore saw right after an "
    "eviction, 0 when it worked); the process stays warm. read() streams the file with the kernel's readahead; "
    "the restore maps it, and when a probe finds a lookup's records missing from memory kvcache/segments.py reads "
    "every record's head first, then asks for the records whole in file order from a background thread, while "
    "the restore decodes, verifies and copies them through the map as they arrive; the disk tier writes a "
    "segment's records in the order a restore reads them (index, checkpoint, spans head first), so that order is "
    "the file's. Both wait for the same device, whose speed here varies several-fold from run to run.")
GB = 1e9


@dataclass
class RestoreResult:
    tier: str
    preset: str
    num_tokens: int
    num_records: int
    num_bytes: int
    seconds: float             # deferred lookup + import into a pooled state (what resume() does)
    gbps: float
    raw_gbps: float | None
    raw_method: str
    ratio: float | None
    eager_seconds: float       # lookup that assembles the state dict + the same import (actors/' path)
    eager_gbps: float
    is_cold: bool = False      # disk: the segment files evicted from the page cache before every run (all readers)
    resident_after_evict: float | None = None  # cold rows: the largest page-cache fraction seen right after an eviction


def best(fn, repeats: int) -> tuple[float, object]:
    """(the fastest of `repeats` runs of `fn`, that run's output)."""
    seconds, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        elapsed = time.perf_counter() - t0
        if elapsed < seconds:
            seconds, out = elapsed, value
    return seconds, out


class Cold:
    """A reader timed from a cold start: `prepare` (untimed; e.g. evicting files from the page
    cache) runs right before each of its timed runs."""

    def __init__(self, fn, prepare):
        self.fn, self.prepare = fn, prepare


def best_interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """`best` of each of `fns`, their runs interleaved so that load changes hit them alike, and
    in an order that rotates every round: what a run costs depends on whether glibc hands it
    memory the run before it just freed (warm) or fresh pages (faults, ~2-6 us per 4 KiB here),
    so with a fixed order one reader would always follow the same other reader. A `Cold`
    reader's `prepare` runs, untimed, before each of its runs."""
    runs = {name: (float("inf"), None) for name in fns}
    names = list(fns)
    for round_id in range(repeats):
        for name in names[round_id % len(names):] + names[:round_id % len(names)]:
            fn = fns[name]
            if isinstance(fn, Cold):
                fn.prepare()
                fn = fn.fn
            elapsed, value = best(fn, 1)
            if elapsed < runs[name][0]:
                runs[name] = (elapsed, value)
            del value
    return runs


def tiny_layout() -> SyntheticLayout:
    return SyntheticLayout.from_model_config(PRESETS["tiny"])


def token_list(num_tokens: int, seed: int, vocab: int = 320) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, num_tokens).tolist()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        raw = state[name].contiguous().reshape(-1).view(torch.uint8).numpy()
        raw = np.concatenate([raw, np.zeros(-len(raw) % 8, np.uint8)])
        digest.update(checksum.compute("rowcol64", name.encode(), memoryview(raw)).encode())
    return digest.hexdigest()


def clear_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])
    client.close()


# -- restore throughput ---------------------------------------------------------------------------

def raw_redis_readers(url: str, prefix: str) -> dict:
    """redis-py fetching every key of the benchmark's prefix (what the lookup reads, plus the
    index record): pipelined GETs, and MGETs of 256 keys (what the Redis tier sends), through
    a client with the Redis tier's own settings (`make_client`); and, stricter (the Redis tier
    no longer reads through redis-py's parser, see kvcache/resp_reader.py), the same MGETs sent
    on a socket whose whole reply is read with ``recv_into`` into one reused buffer: one copy of
    each byte into warm memory, no parsing at all."""
    client = make_client(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    groups = [keys[start:start + 256] for start in range(0, len(keys), 256)]

    def pipelined_get():
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return sum(len(v) for v in pipe.execute())

    def mget():
        return sum(len(v) for group in groups for v in client.mget(group))

    values = [v for group in groups for v in client.mget(group)]
    command = b"".join(b"*%d\r\n$4\r\nMGET\r\n" % (len(group) + 1)
                       + b"".join(b"$%d\r\n%s\r\n" % (len(key), key) for key in group) for group in groups)
    num_reply_bytes = sum(len(b"*%d\r\n" % len(group)) for group in groups) + sum(
        len(b"$%d\r\n" % len(v)) + len(v) + 2 for v in values)
    connection = client.connection_pool.make_connection()
    connection.connect()
    reply = bytearray(num_reply_bytes)

    def socket_mget():  # holds `connection`: it closes its socket when collected
        sock = connection._sock
        sock.sendall(command)
        view, num_read = memoryview(reply), 0
        while num_read < num_reply_bytes:
            num_read += sock.recv_into(view[num_read:])
        return sum(len(v) for v in values)

    socket_mget()
    assert reply.endswith(values[-1] + b"\r\n")
    return {f"redis-py pipelined GET of the same {len(keys)} keys": pipelined_get,
            f"redis-py MGET of the same {len(keys)} keys": mget,
            f"socket MGET of the same {len(keys)} keys, recv_into a reused buffer (warm)": socket_mget}


def raw_disk_readers(directory: Path) -> dict:
    """Plain reads of the segment files holding the records: ``read()`` into a new buffer, and
    ``readinto`` a buffer reused across runs (warm memory: like for like with the restore, whose
    output comes from a pool of warm memory, at every size)."""
    files = sorted(directory.glob("*.kvseg"))
    reusable = bytearray(max(p.stat().st_size for p in files))

    def read_all():
        total = 0
        for path in files:
            with open(path, "rb") as f:
                total += len(f.read())
        return total

    def readinto_all():
        total = 0
        for path in files:
            with open(path, "rb", buffering=0) as f:
                total += f.readinto(memoryview(reusable)[:path.stat().st_size])
        return total

    return {f"read() of the {len(files)} segment files": read_all,
            f"readinto() of the {len(files)} segment files, reused buffer (warm)": readinto_all}


def cold_read_method(directory: Path) -> str:
    num_files = len(list(directory.glob("*.kvseg")))
    return f"read() of the {num_files} segment files, page cache evicted before each run (cold)"


def resident_fraction(directory: Path) -> float:
    """The largest page-cache fraction of the segment files (mincore)."""
    return max((page_cache_fraction(p) for p in directory.glob("*.kvseg")), default=0.0)


def preset_model(preset: str, tmp: Path) -> DeepseekV4:
    """A random-weight model of `preset` (the restore times its `new_state()` and state load)."""
    if not (tmp / preset).exists():
        generate(str(tmp / preset), preset, "hf", "none", seed=0)
    return DeepseekV4.from_pretrained(str(tmp / preset))


def bench_restore(num_tokens: int, repeats: int, url: str, tmp: Path, preset: str = "tiny") -> list[RestoreResult]:
    """Token ids go in as a numpy array: converting a Python list is the caller's cost, not
    the cache's (about 20 ns a token)."""
    model = preset_model(preset, tmp)
    lay = SyntheticLayout.from_model_config(PRESETS[preset])
    fingerprint = f"{FINGERPRINT}-{preset}"  # one per model: the presets' records must not mix
    tokens = np.asarray(token_list(num_tokens, seed=1), dtype=np.int64)
    state = synthetic_state(lay, tokens, num_tokens)
    # a directory per run, so that the raw reads read exactly this restore's records
    prefix, disk_dir = f"kvbench-{uuid.uuid4().hex[:8]}:", tmp / f"restore-{preset}-{num_tokens}"
    stores = {"redis": dict(redis_url=url, redis_prefix=prefix), "disk": dict(disk_dir=disk_dir)}
    results = []
    try:
        with KVCacheService(lay.entry_rates, fingerprint, **stores["redis"], **stores["disk"]) as svc:
            svc.commit(tokens, {num_tokens: state})
            svc.flush()
            results += restore_results(svc, model, "device", tokens, state, repeats, {}, preset)
        for tier, store in stores.items():
            with KVCacheService(lay.entry_rates, fingerprint, device_bytes=0, **store) as svc:
                raws = raw_redis_readers(url, prefix) if tier == "redis" else raw_disk_readers(disk_dir)
                results += restore_results(svc, model, tier, tokens, state, repeats, raws, preset)
                if tier == "disk":
                    results += cold_disk_results(svc, model, tokens, state, repeats, disk_dir, preset)
    finally:
        clear_prefix(url, prefix)
    return results


def restorers(svc, model, tokens):
    """(ours, eager): the deferred lookup + import (each record verified right before its rows
    are copied once into the state's pages, kvcache/restore.py), and the lookup that assembles the
    state dict, then the same import (two copies; the engine used it before the deferred restore). Each
    returns (hit, state)."""
    def ours():
        hit = svc.lookup(tokens, is_deferred=True)
        return hit, import_state(model, hit)

    def eager():
        hit = svc.lookup(tokens)
        return hit, import_state(model, hit.state_tensors)
    return ours, eager


def restore_results(svc, model, tier: str, tokens, state, repeats: int, raws: dict, preset: str = "tiny"
                    ) -> list[RestoreResult]:
    """Our restore (lookup + import into a pooled state of `model`), then one row per raw reader
    (the first row also without one). Ours is the deferred lookup (each record verified right
    before its rows are copied once into the state's pages, kvcache/restore.py); "eager" is the
    lookup that assembles the state dict, then the same import (two copies; the engine, actors/engine_prefix.py,
    uses the deferred one)."""
    ours, eager = restorers(svc, model, tokens)

    runs = best_interleaved({"ours": ours, "eager": eager, **raws}, repeats)
    seconds, (hit, restored) = runs.pop("ours")
    eager_seconds, (eager_hit, eager_restored) = runs.pop("eager")
    assert hit.num_cached_tokens == len(tokens) and hit.checkpoint_tier == tier
    assert state_digest(restored.export()) == state_digest(state) == state_digest(eager_restored.export())
    num_bytes = hit.num_bytes_by_tier[tier]
    gbps = num_bytes / seconds / GB
    rows = []
    for method, (raw_seconds, raw_bytes) in runs.items() or [("", (None, None))]:
        raw_gbps = raw_bytes / raw_seconds / GB if raw_seconds else None
        rows.append(RestoreResult(tier, preset, len(tokens), hit.num_records_by_tier[tier], num_bytes,
                                  round(seconds, 4), round(gbps, 3), raw_gbps and round(raw_gbps, 3), method,
                                  raw_gbps and round(gbps / raw_gbps, 3), round(eager_seconds, 4),
                                  round(num_bytes / eager_seconds / GB, 3)))
    return rows


def cold_disk_results(svc, model, tokens, state, repeats: int, disk_dir: Path, preset: str) -> list[RestoreResult]:
    """The disk rows from a cold page cache: before every timed run, of the restore (ours and
    eager) and of ``read()`` alike, the segment files are evicted (the disk tier's mapped pages
    released and the files dropped from the page cache: `DiskTier.drop_cached_pages`; the raw
    read's files the same way: fsync + POSIX_FADV_DONTNEED; all readers get the same eviction)
    and mincore checks that they left."""
    disk = svc.stack.tiers[-1]
    files = sorted(disk_dir.glob("*.kvseg"))
    resident: list[float] = []

    def drop():  # (the process's own mapped pages too: the kernel does not drop mapped pages)
        disk.drop_cached_pages()
        for path in files:
            evict_file(path)
        resident.append(resident_fraction(disk_dir))

    ours, eager = restorers(svc, model, tokens)

    def read_all():
        return sum(len(path.read_bytes()) for path in files)

    method = cold_read_method(disk_dir)
    runs = best_interleaved({"ours": Cold(ours, drop), "eager": Cold(eager, drop), method: Cold(read_all, drop)},
                            repeats)
    seconds, (hit, restored) = runs.pop("ours")
    eager_seconds, (_, eager_restored) = runs.pop("eager")
    raw_seconds, raw_bytes = runs.pop(method)
    assert hit.num_cached_tokens == len(tokens) and hit.checkpoint_tier == "disk"
    assert state_digest(restored.export()) == state_digest(state) == state_digest(eager_restored.export())
    num_bytes = hit.num_bytes_by_tier["disk"]
    gbps, raw_gbps = num_bytes / seconds / GB, raw_bytes / raw_seconds / GB
    return [RestoreResult("disk", preset, len(tokens), hit.num_records_by_tier["disk"], num_bytes,
                          round(seconds, 4), round(gbps, 3), round(raw_gbps, 3), method,
                          round(gbps / raw_gbps, 3), round(eager_seconds, 4),
                          round(num_bytes / eager_seconds / GB, 3), True, round(max(resident), 4))]


# -- bytes per token ------------------------------------------------------------------------------

def footprint_row(cfg: ModelConfig, value_bytes: int, checkpoint_tokens: int = 4096) -> dict:
    lay = SyntheticLayout.from_model_config(cfg)
    full = footprint.full_attention_values_per_token(cfg.num_layers, cfg.num_attention_heads, cfg.head_dim)
    mla = footprint.mla_values_per_token(cfg.num_layers)
    row = {"value_bytes": value_bytes,
           "full_attention_kv_bytes_per_token": full * value_bytes,
           "mla_v32_bytes_per_token": mla * value_bytes}
    for label, is_fp8 in (("as_computed", False), ("fp8", True)):
        fp = footprint.state_footprint(lay, value_bytes=value_bytes, rope_dim=cfg.qk_rope_head_dim,
                                       checkpoint_tokens=checkpoint_tokens, is_fp8=is_fp8)
        row[label] = {
            "entry_bytes_per_token": round(fp.entry_bytes_per_token, 2),
            "checkpoint_bytes": fp.checkpoint_bytes,
            "bytes_per_token_with_checkpoints": round(fp.bytes_per_token, 2),
            "vs_full_attention": round(fp.bytes_per_token / (full * value_bytes), 5),
            "vs_mla_v32": round(fp.bytes_per_token / (mla * value_bytes), 4),
        }
    return row


def bench_bytes_per_token(restore: list[RestoreResult]) -> dict:
    tiny, flash = PRESETS["tiny"], ModelConfig.from_dict({})
    disk = max((r for r in restore if r.tier == "disk" and r.preset == "tiny"),
               key=lambda r: r.num_tokens)  # framing included
    return {
        "definitions": {
            "full_attention_kv": "2 * num_layers * num_heads * head_dim values per token",
            "mla_v32": "num_layers * (512 + 64) values per token",
            "ours": "compressed entries (CSA + indexer + HCA) per token, plus one window checkpoint "
                    "(W-1 latents per layer + CSA overlap slices) per checkpoint_tokens=4096 tokens",
        },
        "tiny_fp32": footprint_row(tiny, 4), "tiny_bf16": footprint_row(tiny, 2),
        "v4_flash_bf16": footprint_row(flash, 2),
        "tiny_fp32_measured_record_bytes_per_token": round(disk.num_bytes / disk.num_tokens, 2),
    }


# -- 1M tokens: commit, restart (new process), restore ----------------------------------------------

def bench_million(num_tokens: int, url: str, tmp: Path) -> dict:
    lay = tiny_layout()
    tokens = np.asarray(token_list(num_tokens, seed=2), dtype=np.int64)
    t0 = time.perf_counter()
    state = synthetic_state(lay, tokens, num_tokens)
    synth_s = time.perf_counter() - t0
    prefix, disk_dir = f"kvbench-{uuid.uuid4().hex[:8]}:", tmp / "million"
    out: dict = {"num_tokens": num_tokens, "state_bytes": sum(t.numel() * t.element_size() for t in state.values()),
                 "synthesize_seconds": round(synth_s, 2), "state_source": "synthetic (exact tiny-model shapes)"}
    try:
        with KVCacheService(lay.entry_rates, FINGERPRINT, redis_url=url, redis_prefix=prefix, disk_dir=disk_dir,
                            device_bytes=4 << 30) as svc:
            t0 = time.perf_counter()
            commit = svc.commit(tokens, {num_tokens: state})
            out["commit_seconds"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            svc.flush()
            out["background_write_seconds"] = round(time.perf_counter() - t0, 3)
            out["committed_bytes"] = commit.num_bytes
            out["tiers"] = {name: {"num_records": s.num_records, "num_bytes": s.num_bytes}
                            for name, s in svc.stats().tiers.items()}
        out["disk_file_bytes"] = sum(p.stat().st_size for p in disk_dir.glob("*.kvseg"))
        child = dict(num_tokens=num_tokens, seed=2, url=url, prefix=prefix, disk_dir=str(disk_dir),
                     digest=state_digest(state))
        del state
        proc = subprocess.run([sys.executable, __file__, "--restore-child", json.dumps(child)],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(proc.stderr)
        out["restart_restore"] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        clear_prefix(url, prefix)
    return out


def restore_child(cfg: dict) -> None:
    """A new process: open a service on one tier, look the tokens up (the first lookup after the
    restart, then the best of 2 more), check the bytes, and time the raw reads of the same bytes."""
    torch.set_num_threads(1)
    lay = tiny_layout()
    tokens = np.asarray(token_list(cfg["num_tokens"], seed=cfg["seed"]), dtype=np.int64)
    stores = {"redis": dict(redis_url=cfg["url"], redis_prefix=cfg["prefix"]), "disk": dict(disk_dir=cfg["disk_dir"])}
    out = {}
    for tier, store in stores.items():
        t0 = time.perf_counter()
        svc = KVCacheService(lay.entry_rates, FINGERPRINT, device_bytes=0, **store)
        open_s = time.perf_counter() - t0
        first_s, hit = best(lambda: svc.lookup(tokens), 1)
        is_equal = state_digest(hit.state_tensors) == cfg["digest"]
        del hit
        warm_s, hit = best(lambda: svc.lookup(tokens), 2)
        svc.close()
        num_bytes = hit.num_bytes_by_tier.get(tier, 0)
        if tier == "redis":
            raws = raw_redis_readers(cfg["url"], cfg["prefix"])
        else:
            raws = raw_disk_readers(Path(cfg["disk_dir"]))
        method, reader = next(iter(raws.items()))
        raw_s, raw_bytes = best(reader, 2)
        out[tier] = {"open_seconds": round(open_s, 3), "first_lookup_seconds": round(first_s, 3),
                     "lookup_seconds": round(warm_s, 3), "num_cached_tokens": hit.num_cached_tokens,
                     "num_records": hit.num_records_by_tier.get(tier), "num_bytes": num_bytes,
                     "gbps": round(num_bytes / warm_s / GB, 3), "raw_method": method,
                     "raw_gbps": round(raw_bytes / raw_s / GB, 3), "is_bitwise_equal": is_equal}
    print(json.dumps(out))


# -- models: FP8 effect and TTFT ------------------------------------------------------------------

def service_for(model, **kwargs) -> KVCacheService:
    return KVCacheService.for_model_config(model.config, model.fingerprint, **kwargs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def bench_fp8(model, preset: str, num_prompt_tokens: int, num_steps: int = 32) -> dict:
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (num_prompt_tokens,), generator=gen)
    steps = torch.randint(0, model.config.vocab_size, (num_steps,), generator=gen)
    state = model.new_state()
    run = prefill(model, state, prompt, export_positions=[num_prompt_tokens])
    expected = decode(model, state, steps)
    out: dict = {"preset": preset, "prompt_tokens": num_prompt_tokens, "decode_steps": num_steps}
    for label, is_fp8 in (("as_computed", False), ("fp8", True)):
        with service_for(model, is_fp8=is_fp8) as svc:
            commit = svc.commit(prompt.tolist(), run.exports)
            hit = svc.lookup(prompt.tolist())
        logits = decode(model, import_state(model, hit.state_tensors), steps)
        errors = [relative_error(logits[i], expected[i]) for i in range(num_steps)]
        out[label] = {"stored_bytes": commit.num_bytes, "max_rel_logit_error": float(f"{max(errors):.3e}"),
                      "median_rel_logit_error": float(f"{float(np.median(errors)):.3e}"),
                      "last_step_rel_logit_error": float(f"{errors[-1]:.3e}"),
                      "argmax_agreement": float((logits.argmax(-1) == expected.argmax(-1)).float().mean())}
    return out


def bench_ttft(model, num_prompt_tokens: int, url: str, tmp: Path, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, model.config.vocab_size, (num_prompt_tokens,), generator=gen)
    prefix, disk_dir = f"kvbench-{uuid.uuid4().hex[:8]}:", tmp / "ttft"
    stores = {"redis": dict(redis_url=url, redis_prefix=prefix), "disk": dict(disk_dir=disk_dir)}
    out: dict = {"preset": "small", "prompt_tokens": num_prompt_tokens, "chunk_tokens": 2048}
    try:
        with service_for(model, **stores["redis"], **stores["disk"]) as svc:
            positions = prompt_checkpoints(svc, num_prompt_tokens)
            cold = prefill(model, model.new_state(), prompt, chunk_tokens=2048, export_positions=positions)
            out["cold_seconds"] = round(cold.compute_seconds, 3)
            out["export_positions"], out["export_seconds"] = positions, round(cold.export_seconds, 3)
            svc.commit(prompt.tolist(), cold.exports)
            svc.flush()
            out["cached"] = {"device": ttft_cached(model, svc, prompt, cold, repeats)}
        for tier, store in stores.items():
            with service_for(model, device_bytes=0, **store) as svc:
                out["cached"][tier] = ttft_cached(model, svc, prompt, cold, repeats)
    finally:
        clear_prefix(url, prefix)
    for row in out["cached"].values():
        row["speedup"] = round(out["cold_seconds"] / row["total_seconds"], 1)
    return out


def ttft_cached(model, svc, prompt, cold, repeats: int) -> dict:
    seconds, run = best(lambda: resume(model, svc, prompt), repeats)
    assert run.num_cached_tokens == len(prompt) - 1
    assert torch.equal(run.logits, cold.logits)  # same last chunk from the same state: bitwise
    return {"total_seconds": round(seconds, 4), "lookup_seconds": round(run.lookup_seconds, 4),
            "import_seconds": round(run.import_seconds, 4), "compute_seconds": round(run.compute_seconds, 4),
            "num_cached_tokens": run.num_cached_tokens, "checkpoint_tier": run.checkpoint_tier}


# -- driver ---------------------------------------------------------------------------------------

def restore_table(rows: list[dict]) -> list[str]:
    lines = ["| restore | preset | tokens | records | MB | ours GB/s | raw GB/s | ours / raw | raw | eager GB/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        tier = r["tier"] + (" (cold)" if r.get("is_cold") else "")
        lines.append(f"| {tier} | {r['preset']} | {r['num_tokens']} | {r['num_records']} | "
                     f"{r['num_bytes'] / 1e6:.1f} | {r['gbps']} | {r['raw_gbps'] or '-'} | {r['ratio'] or '-'} | "
                     f"{r['raw_method'] or '-'} | {r['eager_gbps']} |")
    return lines


def restore_targets(restore: list[RestoreResult]) -> dict:
    return {f"{r.tier}{' (cold)' if r.is_cold else ''} {r.preset} {r.num_tokens} tokens: {r.raw_method}":
            r.ratio >= 0.7 for r in restore if r.ratio is not None}


def summary(result: dict) -> str:
    """The headline numbers as markdown (the JSON below it has everything)."""
    lines = restore_table(result["restore"])
    bpt = result["bytes_per_token"]
    lines += ["", "| bytes / token | full-attention KV | V3.2 MLA | ours | ours FP8 | ours / MLA (FP8) |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("tiny_fp32", "tiny_bf16", "v4_flash_bf16"):
        row = bpt[name]
        lines.append(f"| {name} | {row['full_attention_kv_bytes_per_token']} | {row['mla_v32_bytes_per_token']} | "
                     f"{row['as_computed']['bytes_per_token_with_checkpoints']} | "
                     f"{row['fp8']['bytes_per_token_with_checkpoints']} | "
                     f"{row['as_computed']['vs_mla_v32']} ({row['fp8']['vs_mla_v32']}) |")
    million = result["million"]
    lines += ["", f"{million['num_tokens']}-token tiny context ({million['state_bytes'] / 1e6:.0f} MB, "
              f"synthetic state): commit {million['commit_seconds']} s + background writes "
              f"{million['background_write_seconds']} s; after a restart (new process):"]
    for tier, row in million["restart_restore"].items():
        lines.append(f"- {tier}: open {row['open_seconds']} s, first lookup {row['first_lookup_seconds']} s, "
                     f"then {row['lookup_seconds']} s ({row['gbps']} GB/s vs raw {row['raw_gbps']}), "
                     f"{row['num_records']} records, {row['num_bytes'] / 1e6:.0f} MB, bitwise equal: "
                     f"{row['is_bitwise_equal']}")
    lines.append("")
    for row in result["fp8"]:
        fp8 = row["fp8"]
        lines.append(f"- FP8 {row['preset']} ({row['prompt_tokens']} + {row['decode_steps']} steps): max |dlogits| / "
                     f"max |logits| = {fp8['max_rel_logit_error']} (median step {fp8['median_rel_logit_error']}), "
                     f"argmax agreement {fp8['argmax_agreement']}, stored bytes x"
                     f"{fp8['stored_bytes'] / row['as_computed']['stored_bytes']:.2f}")
    ttft = result["ttft"]
    cached = ", ".join(f"{tier} {row['total_seconds']} s ({row['speedup']}x)" for tier, row in ttft["cached"].items())
    lines.append(f"- TTFT small, {ttft['prompt_tokens']}-token prompt resent: cold {ttft['cold_seconds']} s; "
                 f"cached {cached}")
    return "\n".join(lines)


def run_restore_only(args) -> None:
    runs = [("tiny", 1 << 16), ("tiny", 1 << 19), ("small", 1 << 16)]
    result: dict = {"mode": "restore-only", "torch_threads": torch.get_num_threads(), "repeats": 9,
                    "runs": [f"{preset} {n}" for preset, n in runs]}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        restore = [row for preset, n in runs for row in bench_restore(n, 9, args.redis_url, Path(tmp_name), preset)]
    result["restore"] = [asdict(r) for r in restore]
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["targets"] = {"restore_vs_raw_ge_0.7": restore_targets(restore)}
    notes = ("KV cache restore throughput (issue #4), restore section only (`--restore-only`). One torch thread; "
             "shared 2-core machine, so absolute times vary with load. See the module docstring of "
             "benchmarks/kvcache.py. " + READING_NOTES)
    table = "\n".join(restore_table(result["restore"]))
    if args.no_append:
        print(json.dumps(result, indent=2))
        print(table, file=sys.stderr)
    else:
        append_results("kvcache restore", result, notes + "\n\n" + table)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller contexts (about 1-2 minutes)")
    parser.add_argument("--restore-only", action="store_true",
                        help="only the restore section: tiny at 64K and 512K tokens, small at 64K")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--redis-url", default=os.environ.get("KV_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--restore-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restore_child:
        restore_child(json.loads(args.restore_child))
        return
    torch.set_num_threads(1)
    if args.restore_only:
        run_restore_only(args)
        return
    sizes = dict(restore=[1 << 16], million=1 << 17, fp8_small=512, ttft=8192, repeats=3) if args.quick else \
        dict(restore=[1 << 16, 1 << 19], million=1 << 20, fp8_small=1024, ttft=32768, repeats=7)
    result: dict = {"mode": "quick" if args.quick else "full", "torch_threads": torch.get_num_threads(),
                    "sizes": sizes}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        restore = [row for n in sizes["restore"] for row in bench_restore(n, sizes["repeats"], args.redis_url, tmp)]
        result["restore"] = [asdict(r) for r in restore]
        result["bytes_per_token"] = bench_bytes_per_token(restore)
        result["million"] = bench_million(sizes["million"], args.redis_url, tmp)
        models = {preset: preset_model(preset, tmp) for preset in ("tiny", "small")}
        result["fp8"] = [bench_fp8(models["tiny"], "tiny", 603),
                         bench_fp8(models["small"], "small", sizes["fp8_small"])]
        result["ttft"] = bench_ttft(models["small"], sizes["ttft"], args.redis_url, tmp, sizes["repeats"])
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["targets"] = {
        "restore_vs_raw_ge_0.7": restore_targets(restore),
        "ttft_speedup_ge_10x": {tier: row["speedup"] >= 10 for tier, row in result["ttft"]["cached"].items()},
    }
    notes = ("KV cache (issue #4). One torch thread; shared 2-core machine, so absolute times vary with "
             "load. million: state synthesized with the tiny model's exact export shapes (the model over "
             "1M tokens takes hours here). See the module docstring of benchmarks/kvcache.py. " + READING_NOTES)
    if args.no_append:
        print(json.dumps(result, indent=2))
        print(summary(result), file=sys.stderr)
    else:
        append_results(f"kvcache ({result['mode']})", result, notes + "\n\n" + summary(result))


if __name__ == "__main__":
    main()
