"""Prometheus metrics of one ingress replica (text exposition at GET /metrics).

Owns: a private `prometheus_client` registry with the request / token / latency series this
ingress observed, plus gauges refreshed from the Engine replicas' stats at scrape time (queue
depth, running sequences, health, KV hits per tier).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they double the output and no dashboard uses them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsv4_requests", "HTTP API requests by API, model and status",
                                ["api", "model", "status"], registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("dsv4_cached_prompt_tokens", "Prompt tokens served by the KV cache",
                                     registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("dsv4_engine_running_sequences", "Running sequences", ["replica"], registry=r)
        self.waiting = Gauge("dsv4_engine_queue_depth", "Waiting sequences", ["replica"], registry=r)
        self.healthy = Gauge("dsv4_engine_healthy", "1 when the Engine replica and its shards are up",
                             ["replica"], registry=r)
        self.kv_hits = Gauge("dsv4_kv_hits", "KV records found, per tier (cumulative)", ["replica", "tier"],
                             registry=r)
        self.kv_misses = Gauge("dsv4_kv_misses", "KV records not found, per tier (cumulative)",
                               ["replica", "tier"], registry=r)
        self.kv_bytes = Gauge("dsv4_kv_bytes", "Bytes held per KV tier", ["replica", "tier"], registry=r)

    def on_request(self, api: str, model: str, status: int) -> None:
        self.requests.labels(api, model or "", str(status)).inc()

    def on_admitted(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.cached_tokens.inc(num_cached_tokens)

    def on_tokens(self, num_tokens: int, ttft: float | None, gap_s: float) -> None:
        self.generation_tokens.inc(num_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        elif num_tokens:
            per_token = gap_s / num_tokens  # a coalesced event spreads its gap over its tokens
            for _ in range(num_tokens):
                self.itl.observe(per_token)

    def set_engine(self, replica: int, stats, is_healthy: bool) -> None:
        label = str(replica)
        self.healthy.labels(label).set(1.0 if is_healthy else 0.0)
        if stats is None:
            return
        self.running.labels(label).set(stats.num_running)
        self.waiting.labels(label).set(stats.num_waiting)
        for tier, t in (stats.cache.get("tiers") or {}).items():
            self.kv_hits.labels(label, tier).set(t.get("num_hits", 0))
            self.kv_misses.labels(label, tier).set(t.get("num_misses", 0))
            self.kv_bytes.labels(label, tier).set(t.get("num_bytes", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
