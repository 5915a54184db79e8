"""launch(): start a router + expert-shard model instance; the handle implements ModelRunner.

Owns: the model instance's lifetime: the placement group, the ExpertShard actors, the router
(in the caller's process) and its transports; `shutdown()` releases all of them.

    from actors.launch import launch
    runner = launch(checkpoint_dir, num_expert_shards=2, micro_batches=2, transport="collective")
    logits = runner.forward(input_ids)            # [B, S] -> [B, S, vocab], fresh sequences
    state = runner.new_state()                     # ModelRunner API (what the Engine calls)
    outs = runner.step([state], [ids])             # per sequence: logits of the last token [vocab]
    runner.is_healthy(); runner.shutdown()

Where the router runs: in the process that calls launch(). In serving that is the Engine's Serve
replica, itself a Ray actor (give it num_gpus=1 on a GPU cluster): the Engine owns the sequence
states (SequenceState objects it can export to the KV service) and steps them with no extra hop,
which is DESIGN §1's "Engine = router". In tests it is the pytest process. The shards are Ray
actors in a placement group (one bundle each). Uses the Ray cluster the caller is connected to;
calls ray.init() only when none is.

Arguments:
    num_expert_shards    N shard actors; experts split into contiguous uneven ranges unless
    expert_assignment    (a list of N expert-id lists: any partition of range(n_routed_experts))
    micro_batches        M: split each step's sequences into M micro-batches and pipeline them
                         (ping-pong overlap, see actors/router.py); 1 = off. Settable later.
    transport            "collective" (torch.distributed: gloo on CPU, NCCL on GPU; one Ray call
                         per step per shard) or "ray" (one Ray call per layer per shard). Both
                         work on the same shards: `runner.use_transport(name)` switches.
    placement_strategy   PACK / SPREAD / STRICT_PACK / STRICT_SPREAD for the shards' bundles
    shard_resources      per-shard extra bundle resources, e.g. [{"node_a": 1}, {"node_b": 1}]
    dtype, device        weights dtype; the router's device (default: cuda if this process sees a
                         GPU, then each shard gets one GPU and the group uses NCCL; else cpu/gloo)
    collective_timeout_s bound on one collective wait: a hung shard fails the step after this
    same_node_links      CPU (gloo) only: shards on this machine also get a Unix-socket link that
                         carries the decode-sized messages (actors/transport/links.py); False: the
                         torch.distributed group carries everything (as across machines)
    max_restarts         Ray restarts of a dead shard (it reloads its experts)
Failure: a shard that dies during a step makes that step raise ShardError (milliseconds for a
dead process; collective_timeout_s for a hung one); the next step waits for the restart and
rebuilds the group, then succeeds.
"""

from __future__ import annotations

import os

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model_shards import ModelConfig, SequenceState
from model_shards.checkpoint import CheckpointReader
from model_shards.loading import load_dense
from model_shards.model import checkpoint_fingerprint

from .messages import ShardInfo, ShardSpec, StepTiming
from .placement import Placement, check_assignment, node_ip, owner_table, place_shards, split_experts
from .router import Router
from .shard import ExpertShard, shards_alive, wait_ready
from .transport.collective import CollectiveTransport
from .transport.ray_calls import RayTransport

TRANSPORTS = ("collective", "ray")


class EPRunner:
    """Handle of one router + shards model instance (ModelRunner + forward + shutdown)."""

    def __init__(self, config: ModelConfig, fingerprint: str, router: Router, shards: list, infos: list[ShardInfo],
                 placement: Placement, transports: dict, assignment: list[list[int]]):
        self.config = config
        self.fingerprint = fingerprint
        self.router = router
        self.shards = shards
        self.infos = infos
        self.placement = placement
        self.transports = transports
        self.assignment = assignment
        self._is_shut_down = False

    # ---- ModelRunner -------------------------------------------------------------------------
    def new_state(self) -> SequenceState:
        return self.router.new_state()

    def step(self, states: list[SequenceState], token_ids: list[torch.Tensor],
             all_logits: bool = False) -> list[torch.Tensor]:
        self._check_open()
        return self.router.step(states, token_ids, all_logits)

    def is_healthy(self) -> bool:
        return not self._is_shut_down and shards_alive(self.shards)

    def shutdown(self) -> None:
        if self._is_shut_down:
            return
        self._is_shut_down = True
        for t in self.transports.values():
            t.close()
        for s in self.shards:
            try:
                ray.kill(s, no_restart=True)
            except Exception:
                pass
        self.placement.remove()

    # ---- extras ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Whole sequences from position 0: [B, S] -> logits [B, S, vocab] (equivalence checks)."""
        self._check_open()
        return self.router.forward(input_ids)

    @property
    def micro_batches(self) -> int:
        return self.router.micro_batches

    @micro_batches.setter
    def micro_batches(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"micro_batches must be >= 1, got {value}")
        self.router.micro_batches = value

    @property
    def transport(self) -> str:
        return self.router.transport.name

    def use_transport(self, name: str) -> None:
        if name not in self.transports:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {name!r}")
        new = self.transports[name]
        if name == "collective" and self.router.transport is not new:
            new.is_broken = True   # shards may have restarted under the other transport: reconnect all
        self.router.set_transport(new)

    @property
    def last_timing(self) -> StepTiming:
        return self.router.last_timing

    def shard_infos(self, timeout_s: float = 60.0) -> list[ShardInfo]:
        """Fresh ShardInfo of every shard (pid, node, rss, ...)."""
        return wait_ready(self.shards, timeout_s)

    def _check_open(self) -> None:
        if self._is_shut_down:
            raise RuntimeError("this model instance was shut down")

    def __enter__(self) -> "EPRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _ensure_ray() -> None:
    if ray.is_initialized():
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}})


def launch(checkpoint_dir: str, num_expert_shards: int = 2, micro_batches: int = 1, transport: str = "collective",
           expert_assignment: list[list[int]] | None = None, placement_strategy: str = "PACK",
           dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
           shard_resources: list[dict] | None = None, cpus_per_shard: float = 1.0,
           collective_timeout_s: float = 20.0, restart_timeout_s: float = 120.0, max_restarts: int = 3,
           placement_timeout_s: float = 60.0, cuda_graphs: bool = True, max_graph_batch: int = 256,
           compiled_decode: bool = False, same_node_links: bool = True,
           shard_cuda_graphs: bool | None = None) -> EPRunner:
    """Start N ExpertShard actors and a router in this process; see the module docstring.
    `compiled_decode`: the router's decode steps run its layers as compiled regions
    (model_shards.regions; inside the graph segments on a GPU). `cuda_graphs` (GPUs): the router's
    decode steps replay graph segments, and the shards replay each layer's experts from graphs
    (ShardSpec.cuda_graphs); `shard_cuda_graphs` sets the shards' part alone (A/B runs)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    _ensure_ray()
    cfg = ModelConfig.from_json(checkpoint_dir)
    num_experts = cfg.n_routed_experts
    if expert_assignment is None:
        assignment = split_experts(num_experts, num_expert_shards)
    else:
        if len(expert_assignment) != num_expert_shards:
            raise ValueError(f"expert_assignment has {len(expert_assignment)} shards, num_expert_shards is "
                             f"{num_expert_shards}")
        assignment = check_assignment([list(a) for a in expert_assignment], num_experts)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_gpu = dev.type == "cuda"
    if is_gpu and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype_name = str(dtype).removeprefix("torch.")
    placement = place_shards(num_expert_shards, placement_strategy, cpus_per_shard, 1.0 if is_gpu else 0.0,
                             shard_resources, placement_timeout_s)
    shards = []
    try:
        for k, ids in enumerate(assignment):
            spec = ShardSpec(k, os.path.abspath(checkpoint_dir), tuple(ids), dtype_name, "cuda" if is_gpu else "cpu",
                             max(1, int(cpus_per_shard)),
                             cuda_graphs if shard_cuda_graphs is None else shard_cuda_graphs, max_graph_batch)
            shards.append(ExpertShard.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement.group, placement_group_bundle_index=k),
                num_cpus=cpus_per_shard, num_gpus=1 if is_gpu else 0, max_restarts=max_restarts,
                max_task_retries=0).remote(spec))
        dense = load_dense(cfg, CheckpointReader(checkpoint_dir), dtype, dev).eval()   # while the shards load
        infos = wait_ready(shards, restart_timeout_s)
    except BaseException:
        for s in shards:
            ray.kill(s, no_restart=True)
        placement.remove()
        raise
    owner = owner_table(assignment, num_experts)
    transports = {
        "collective": CollectiveTransport(shards, owner, cfg.hidden_size, cfg.num_experts_per_tok, dtype, dev,
                                          "nccl" if is_gpu else "gloo", node_ip(), collective_timeout_s,
                                          restart_timeout_s, same_node_links),
        "ray": RayTransport(shards, owner, cfg.hidden_size, dtype, dev, collective_timeout_s, restart_timeout_s),
    }
    graphs = None
    if is_gpu and cuda_graphs:   # the router's decode steps replay graph segments around the dispatches
        from model_shards.segment_graphs import SegmentGraphs
        graphs = SegmentGraphs(dense, max_batch=max_graph_batch)
    if compiled_decode:
        from model_shards.regions import DecodeRegions
        dense.regions = DecodeRegions()
        if graphs is not None:   # compile (and capture) the common decode shapes now, not on a request
            graphs.warm_up(micro_batches, cfg.index_topk + 1)
    dense.warm_up_prefill()   # (GPUs: prefill's compiled pieces, before the first prompt)
    router = Router(dense, transports[transport], micro_batches, graphs)
    runner = EPRunner(cfg, checkpoint_fingerprint(checkpoint_dir), router, shards, infos, placement, transports,
                      assignment)
    if transport == "collective":
        try:
            transports["collective"].ensure_ready()   # build the group now: the first step pays nothing
        except BaseException:
            runner.shutdown()
            raise
    return runner
