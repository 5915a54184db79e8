"""ExpertShard: a Ray actor holding routed experts of every MoE layer and computing their share.

Owns: one ExpertBank (the experts in ShardSpec.expert_ids, read from the checkpoint and nothing
else: the loader reads only those experts' tensors, memory-mapped, and the reader is dropped after
loading so no other bytes stay mapped) and this process's membership of the router's
torch.distributed group (one generation at a time), with its same-node link to the router when
it has one (actors/transport/links.py). On a GPU (ShardSpec.cuda_graphs) also the bank's
ExpertGraphs: a micro-batch that comes over NCCL to an every-token shard (GroupSpec.is_every_token)
with at most max_graph_rows tokens is received straight into a graph's static input and computed
by one replay per layer (model_shards/expert_graphs.py); other messages run the bank eagerly.

Calls (all typed, actors/messages.py):
    ready() / info() -> ShardInfo     health + identity; runs in its own thread ("control"), so it
                                      answers while a step runs; after a restart it answers only
                                      once __init__ has reloaded the experts
    join_group(GroupSpec) -> GroupJoined   leave the old generation, join the new one (and connect
                                      the router's same-node link when GroupSpec names one)
    run_step(StepPlan) -> StepReport  collective transport: the step's only Ray call; loops on the
                                      group (and link) for layers x micro-batches messages
    compute(LayerRequest) -> LayerResult   Ray transport: one layer's share per call
    debug_fail_computes(n)            test hook: the next n expert computations raise
Helpers for the router side: wait_ready() (retries while Ray restarts an actor), shards_alive().
Restarts: Ray restarts the actor (max_restarts) with the same ShardSpec, so a restart reloads
the same experts; the router then rebuilds the group.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
import warnings

import psutil
import ray
import torch

from model_shards import ModelConfig
from model_shards.checkpoint import CheckpointReader
from model_shards.expert_graphs import ExpertGraphs
from model_shards.loading import load_experts

from .messages import (GroupJoined, GroupSpec, LayerRequest, LayerResult, ShardError, ShardInfo, ShardSpec, StepPlan,
                       StepReport)
from .shard_step import run_plan
from .transport import links
from .transport.group import Group
from .transport.wire import Wire


def wait_ready(shards: list, timeout_s: float) -> list[ShardInfo]:
    """ShardInfo of every shard once all answer ready(). A restarting actor refuses calls
    (ActorUnavailableError) until its __init__ (expert reload) is done, so this retries until
    timeout_s; then ShardError names the shards that did not come back."""
    deadline = time.monotonic() + timeout_s
    infos: list[ShardInfo | None] = [None] * len(shards)
    last_error: dict[int, str] = {}
    while True:
        todo = [k for k, i in enumerate(infos) if i is None]
        if not todo:
            return infos
        refs = {k: shards[k].ready.remote() for k in todo}
        for k, ref in refs.items():
            try:
                infos[k] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                last_error[k] = str(e).splitlines()[0]
        if any(i is None for i in infos):
            if time.monotonic() >= deadline:
                bad = [k for k, i in enumerate(infos) if i is None]
                raise ShardError(f"expert shard(s) {bad} not ready within {timeout_s:.0f} s: "
                                 + "; ".join(f"{k}: {last_error.get(k, '?')}" for k in bad), tuple(bad))
            time.sleep(0.2)


def shards_alive(shards: list, timeout_s: float = 2.0) -> bool:
    """True unless a shard is dead for good (restarts exhausted) or hung. A shard that Ray is
    restarting counts as alive: the next step waits for it (a health check that failed here
    would make Serve restart the whole Engine replica for a fault the runner recovers from)."""
    refs = [s.ready.remote() for s in shards]
    for ref in refs:
        try:
            ray.get(ref, timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            continue
        except Exception:
            return False
    return True


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _device(spec: ShardSpec) -> torch.device:
    if spec.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"shard {spec.shard_id}: device {spec.device!r} requested but this actor sees no GPU")
        return torch.device("cuda", torch.cuda.current_device())  # the GPU Ray assigned (CUDA_VISIBLE_DEVICES)
    return torch.device("cpu")


@ray.remote(concurrency_groups={"control": 1})
class ExpertShard:
    def __init__(self, spec: ShardSpec):
        torch.set_num_threads(max(1, spec.num_threads))
        self.spec = spec
        self.device = _device(spec)
        self.dtype = getattr(torch, spec.dtype)
        self.cfg = ModelConfig.from_json(spec.checkpoint_dir)
        gc.collect()
        self.rss_before = _rss()
        t0 = time.perf_counter()
        reader = CheckpointReader(spec.checkpoint_dir)
        self.bank = load_experts(self.cfg, reader, list(spec.expert_ids), self.dtype, self.device).eval()
        del reader  # unmaps the checkpoint files
        gc.collect()
        self.load_s = time.perf_counter() - t0
        self.rss_after = _rss()
        self.group: Group | None = None
        self.link: links.Link | None = None
        self.wire: Wire | None = None
        self.graphs: ExpertGraphs | None = None   # every-token decode steps over NCCL
        if self.device.type == "cuda" and spec.cuda_graphs:
            # the wire layout depends on the model alone, so the graphs outlive every group generation;
            # their routing compiles now (ready() waits for it), not inside the first step
            layout = Wire(None, "nccl", self.device, self.dtype, self.cfg.hidden_size, self.cfg.num_experts_per_tok,
                          is_every_token=True)
            self.graphs = ExpertGraphs(self.bank, layout.message_numel, layout.unpack_message, self.dtype,
                                       self.device, spec.max_graph_rows)
            self.graphs.warm_up()
        self._num_faults = 0
        with warnings.catch_warnings():  # the property reads a deprecated field internally (Ray 2.60)
            warnings.simplefilter("ignore")
            self.is_restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()

    # ---- control -----------------------------------------------------------------------------
    @ray.method(concurrency_group="control")
    def ready(self) -> ShardInfo:
        return ShardInfo(self.spec.shard_id, os.getpid(), self.node_id, self.node_ip, tuple(self.bank.expert_ids),
                         str(self.device), self.bank.num_bytes, self.rss_before, self.rss_after, self.load_s,
                         self.is_restarted, -1 if self.group is None else self.group.generation)

    @ray.method(concurrency_group="control")
    def info(self) -> ShardInfo:
        return self.ready()

    @ray.method(concurrency_group="control")
    def rss(self) -> int:
        return _rss()

    @ray.method(concurrency_group="control")
    def debug_fail_computes(self, count: int) -> None:
        """Test hook: the next `count` expert computations raise (a bug / OOM stand-in)."""
        self._num_faults = count

    def _check_faults(self) -> None:
        if self._num_faults > 0:
            self._num_faults -= 1
            raise RuntimeError(f"injected fault in expert shard {self.spec.shard_id} (debug_fail_computes)")

    def join_group(self, spec: GroupSpec) -> GroupJoined:
        self._leave_group()
        # A shard's wait for the next dispatch includes the router's compute and its waits on the
        # other shards (each bounded by spec.timeout_s), so the shard side gets a longer bound: the
        # router, not a bystander shard, is the one to time out on a hung peer.
        timeout_s = 2 * spec.timeout_s + 10
        self.group = Group(dataclasses.replace(spec, timeout_s=timeout_s), self.node_ip, self.device)
        if spec.backend == "gloo" and self.device.type == "cpu":   # the router is reachable by a Unix socket?
            self.link = links.connect(spec.link_name, spec.rank, spec.generation, spec.link_budget, timeout_s)
        self.wire = Wire(self.group.pg, spec.backend, self.device, self.dtype, self.cfg.hidden_size,
                         self.cfg.num_experts_per_tok, spec.link_budget if self.link is not None else 0,
                         spec.is_every_token)
        return GroupJoined(spec.generation, self.link is not None)

    def _leave_group(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.group is not None:
            self.group.close()
            self.group, self.wire = None, None

    # ---- collective transport ----------------------------------------------------------------
    def run_step(self, plan: StepPlan) -> StepReport:
        """The plan's messages on this generation's group (shard_step.run_plan)."""
        if self.group is None or plan.generation != self.group.generation:
            raise RuntimeError(f"shard {self.spec.shard_id} is in group generation "
                               f"{None if self.group is None else self.group.generation}, the step expects "
                               f"{plan.generation} (the router rebuilds the group)")
        return run_plan(plan, self.spec.shard_id, self.bank, self.wire, self.link, self.graphs, self._check_faults)

    # ---- Ray transport -----------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, req: LayerRequest) -> LayerResult:
        t0 = time.perf_counter()
        self._check_faults()
        out = self.bank(req.layer_id, req.x.to(self.device), req.expert_ids.to(self.device), req.weights.to(self.device))
        return LayerResult(out.cpu(), time.perf_counter() - t0)
