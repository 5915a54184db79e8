"""Typed messages at every actor boundary of actors/ (what crosses a Ray call or a process boundary).

Owns: no state; only the dataclasses (and the one exception type) that the router, the expert
shards and the Engine exchange. Sections are separated by owner; add new boundaries in their own
section rather than widening an existing message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


# ---- router <-> shards ---------------------------------------------------------------------------
# Control plane (Ray calls): ShardSpec -> ExpertShard.__init__, ShardInfo <- ready() / info(),
# GroupSpec -> join_group() -> GroupJoined, StepPlan -> run_step() -> StepReport,
# LayerRequest -> compute() -> LayerResult.
# Data plane (torch.distributed, one group per generation, plus same-node links): see
# actors/transport/wire.py and actors/transport/links.py.


@dataclass(frozen=True)
class ShardSpec:
    """How to build one ExpertShard: which experts of which checkpoint, where and in what dtype."""
    shard_id: int                 # 0-based; the shard's rank in the collective group is shard_id + 1
    checkpoint_dir: str
    expert_ids: tuple[int, ...]   # global expert ids held by this shard (any set; need not be contiguous)
    dtype: str = "float32"        # torch dtype name of the dequantized expert weights
    device: str = "cpu"           # "cpu" or "cuda" (the GPU Ray assigned to the actor)
    num_threads: int = 1          # torch intra-op threads of the shard process
    cuda_graphs: bool = True      # GPU: every-token decode steps replay each layer's experts from a
                                  # CUDA graph (model_shards/expert_graphs.py); False: eager
    max_graph_rows: int = 256     # micro-batches of more tokens than this compute eagerly


@dataclass(frozen=True)
class ShardInfo:
    """A shard's identity and resource use, answered by ready() / info() (also after a restart)."""
    shard_id: int
    pid: int
    node_id: str
    node_ip: str
    expert_ids: tuple[int, ...]
    device: str
    num_expert_bytes: int         # bytes of the routed-expert weights this shard holds
    rss_before_load: int          # process resident bytes just before / after loading the experts
    rss_after_load: int
    load_s: float                 # seconds spent reading the experts
    is_restarted: bool            # this process is a Ray restart of the actor (experts reloaded)
    generation: int               # collective group generation the shard is in (-1: none)


@dataclass(frozen=True)
class GroupSpec:
    """Join a torch.distributed group: router = rank 0 and TCPStore master, shard k = rank k + 1."""
    generation: int               # increases on every rebuild; run_step refuses other generations
    master_addr: str
    master_port: int
    world_size: int
    rank: int
    backend: str                  # "gloo" or "nccl"
    timeout_s: float              # per collective operation; bounds how long a lost peer can stall us
    link_name: str = ""           # same-node link listener of the router (actors/transport/links.py); "": none
    link_budget: int = 0          # bytes a link may hold unread per direction (Wire.link_micro_batches)
    is_every_token: bool = False  # this shard gets every token of each micro-batch (transport.dense_shards)


@dataclass(frozen=True)
class GroupJoined:
    """join_group()'s answer: the generation joined, and whether the shard also connected the
    router's same-node link (then the link carries its small messages; else gloo carries all)."""
    generation: int
    is_linked: bool = False


@dataclass(frozen=True)
class StepPlan:
    """One engine step as a shard sees it (the only Ray call a shard gets per step, collective
    transport): for layer in layer_ids, for micro-batch m in order, expect one dispatch message of
    at most micro_batch_tokens[m] rows from the router; answer each with n > 0 rows with one
    combine message. A shard whose compute raises keeps answering (NaN rows, so nobody waits for
    a timeout) and re-raises at the end of the plan."""
    step_id: int
    generation: int
    layer_ids: tuple[int, ...]            # MoE layers in the order the router dispatches them
    micro_batch_tokens: tuple[int, ...]   # tokens of each micro-batch = recv capacity in rows


@dataclass(frozen=True)
class StepReport:
    """What a shard did in one step (returned by run_step; read lazily by the router)."""
    shard_id: int
    step_id: int
    num_rows: int                 # token rows received over all layers / micro-batches
    compute_s: float              # time in ExpertBank.forward
    wait_s: float                 # time blocked waiting for dispatch messages
    is_aborted: bool = False      # the router aborted the step (another shard failed or the router raised)
    num_link_messages: int = 0    # dispatch messages that came over the same-node link (the rest: the group)
    num_graph_replays: int = 0    # layers computed by replaying an ExpertGraphs graph (GPU, every token)


@dataclass
class LayerRequest:
    """Ray transport: one layer's tokens for one shard.  x [n, hidden]; expert_ids, weights [n, k]."""
    layer_id: int
    x: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor


@dataclass
class LayerResult:
    """Ray transport: the shard's partial sum over its experts, out [n, hidden]."""
    out: torch.Tensor
    compute_s: float = 0.0


class ShardError(RuntimeError):
    """An expert shard failed (died, hung past the collective timeout, or raised) during a step.

    The step's sequences are invalid afterwards: attention already advanced some of their layers'
    state. The handle restarts / reconnects the shards on the next call, so a new request succeeds."""

    def __init__(self, message: str, shard_ids: tuple[int, ...] = (), step_id: int = -1):
        super().__init__(message)
        self.shard_ids = shard_ids
        self.step_id = step_id


@dataclass
class StepTiming:
    """Router-side timing of the last step (seconds), for benchmarks and /metrics."""
    total_s: float = 0.0
    dense_s: float = 0.0          # begin / attention / gating / shared expert / combine math / head
    wait_s: float = 0.0           # blocked in transport.combine (experts + wire not hidden by overlap)
    num_tokens: int = 0
    num_micro_batches: int = 1
    num_cut_sequences: int = 0    # prefills cut inside the sequence over micro-batches (StepBatch.plan)


# ---- engine <-> ingress ---------------------------------------------------------------------------
# Owner: the Engine engineer. The ingress calls EngineDeployment.generate(GenerateRequest) as a Serve
# streaming call; it yields Admitted | Rejected first, then TokenEvents (the last has finish_reason).

from actors.sampling import SamplingParams, TokenLogprob  # noqa: E402  (torch-only module, no cycle)


@dataclass(frozen=True)
class GenerateRequest:
    """Ingress -> Engine: one completion (one choice) to generate."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cache_salt: str = ""          # isolates tenants in the KV cache
    arrival_time: float = 0.0     # time.time() at the ingress


@dataclass(frozen=True)
class Admitted:
    """Engine -> ingress, first event of an accepted request."""
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int        # prompt tokens served by the KV cache (not recomputed)
    cache_tier: str | None = None  # tier that served the resume checkpoint ("device", "redis", "disk")


@dataclass(frozen=True)
class Rejected:
    """Engine -> ingress, first and only event of a refused request. status: 429 queue full,
    400 invalid (prompt too long, bad sampling params, test hook off), 503 engine unavailable."""
    request_id: str
    status: int
    message: str


@dataclass
class TokenEvent:
    """Engine -> ingress: tokens sampled since the request's previous event (the engine coalesces
    when the consumer is slower than the steps)."""
    request_id: str
    token_ids: list[int]
    text: str                                   # text delta, stop strings already cut
    num_output_tokens: int                      # generated so far, this event included
    logprobs: list[TokenLogprob] | None = None  # one per token id when requested
    finish_reason: str | None = None            # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None        # stop string or stop token id that matched
    error: str | None = None                    # with finish_reason "error"

    def merge(self, later: "TokenEvent") -> "TokenEvent":
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = list(self.logprobs or []) + list(later.logprobs or [])
        return TokenEvent(self.request_id, list(self.token_ids) + list(later.token_ids), self.text + later.text,
                          later.num_output_tokens, logprobs, later.finish_reason, later.stop_reason,
                          later.error if later.error is not None else self.error)


@dataclass
class EngineStats:
    """Engine -> ingress (/metrics, tests, benchmarks): counters since the replica started."""
    num_running: int = 0
    num_waiting: int = 0
    is_healthy: bool = True
    cache: dict = field(default_factory=dict)   # KV service stats (per tier); {} without a cache
    num_steps: int = 0
    num_prompt_tokens: int = 0                  # prompt tokens of admitted requests
    num_cached_tokens: int = 0                  # of which served by the KV cache
    num_computed_tokens: int = 0                # tokens run through the model
    num_generated_tokens: int = 0
    num_requests: int = 0
    num_rejected: int = 0
    num_aborted: int = 0
    step_seconds: float = 0.0                   # time inside model steps (sampling included)
