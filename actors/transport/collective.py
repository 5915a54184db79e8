"""CollectiveTransport: router side of the torch.distributed data plane (gloo on CPU, NCCL on GPU).

Owns: the current group generation (store, backend, wire, and the same-node links of the shards
on this machine), the step's in-flight sends / recvs, and the shards' run_step references of the
step in flight. Per step, each shard gets ONE Ray call, `run_step(StepPlan)`; after that it loops
on the group (see actors/shard.py) while the router dispatches per (layer, micro-batch): one
message to every shard (header n + n rows; the packed message itself to a shard that most
tokens reach anyway, see dense_shards), and one recv of [n_s, hidden] posted at once from every
shard with n_s > 0. Group sends and recvs are asynchronous (gloo's transport threads / NCCL
streams move the bytes), so the router computes other micro-batches while the experts run;
combine() is where it waits.

Same-node links (CPU / gloo, actors/transport/links.py): a shard on this machine also connects a
Unix socket when it joins; the micro-batches whose messages fit the link budget
(Wire.link_micro_batches, decided per step from the StepPlan on both sides) then go over it:
the dispatch is written in place (it fits in the socket buffer), the combine is read when
combine() waits for it. Bigger micro-batches (prefill chunks), shards on other machines, and
everything with `same_node_links=False` use the group as before.

Failure: a dead shard closes its sockets, so the router's next wait on it raises within
milliseconds (gloo "Connection closed by peer", or the link's "closed by peer"); a hung one
raises after `timeout_s`. The router then sends ABORT to the other shards (over the way each
one's next message comes, so their run_step returns), marks the group broken and raises
ShardError. The next step's ensure_ready() closes the links (a shard still reading one sees EOF),
waits for the old run_step calls (killing a stuck shard, which Ray restarts), waits until every
shard answers ready() (a restarted one has reloaded its experts by then), and builds generation
g+1 on a new store port. A router-side exception inside a step takes the same path (ABORT,
rebuild), so the shards never wait on a step the router left. A shard whose compute raises keeps
the lockstep (answers NaN rows) and re-raises at the end of its plan; the router sees non-finite
logits and raises that error (step_error()).
"""

from __future__ import annotations

import dataclasses
import time

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from ..messages import GroupSpec, ShardError, StepPlan
from ..shard import wait_ready
from . import dense_shards, dispatch_rows, links
from .group import Group, open_master_store
from .wire import Wire


class _ShardFailed(Exception):
    def __init__(self, shard_id: int, cause: BaseException):
        super().__init__(f"shard {shard_id}: {cause}")
        self.shard_id, self.cause = shard_id, cause


class CollectiveTransport:
    name = "collective"

    def __init__(self, shards: list, owner: list[int], hidden: int, k: int, dtype: torch.dtype,
                 device: torch.device, backend: str, my_ip: str, timeout_s: float = 20.0,
                 restart_timeout_s: float = 120.0, same_node_links: bool = True):
        self.shards = shards
        self.num_shards = len(shards)
        self.owner = torch.tensor(owner, dtype=torch.int64, device=device)
        self.dense = dense_shards(list(owner), k, self.num_shards)   # shards sent every token
        self.hidden, self.k, self.dtype, self.device = hidden, k, dtype, device
        self.backend, self.my_ip = backend, my_ip
        self.timeout_s, self.restart_timeout_s = timeout_s, restart_timeout_s
        self.generation = 0
        self.group: Group | None = None
        self.wire: Wire | None = None
        # same-node links: CPU tensors over gloo only (an NCCL group keeps its tensors on the GPUs)
        self.use_links = same_node_links and backend == "gloo" and device.type == "cpu" and links.is_supported()
        self.links: dict[int, links.Link] = {}    # shard index -> link (this generation)
        self.link_budget: int | None = None       # bytes per link and direction; None: links.budget_bytes()
        self._step_links: list[list] = []         # per micro-batch of the step: link or None per shard
        self.is_broken = True             # no group yet: built by the first ensure_ready()
        self.num_rebuilds = 0
        self.last_rebuild_s = 0.0
        self.step_id = -1
        self.step_refs: list = []         # run_step refs of the step in flight / last step
        self._sends: list = []            # (work, tensor): tensors stay alive until sent
        self._num_sent = [0] * self.num_shards
        self._num_expected = 0
        self._suspects: set[int] = set()  # shards that failed the last step
        self._caps: tuple[int, ...] = ()  # the step's micro-batch token counts (StepPlan)

    # ---- group lifetime --------------------------------------------------------------------
    def ensure_ready(self) -> None:
        if self.is_broken:
            self._rebuild()

    def _rebuild(self) -> None:
        t0 = time.perf_counter()
        self._close_links()   # a shard still reading its link (a step left mid-way) sees EOF at once
        if self.step_refs:  # let the old generation's loops end; a stuck one is killed (Ray restarts it)
            for s in self._suspects:   # failed the last step (e.g. hung past the timeout): no second chance
                if not ray.wait([self.step_refs[s]], timeout=1.0)[0]:   # a dead one resolves fast
                    ray.kill(self.shards[s], no_restart=False)
            _, stuck = ray.wait(self.step_refs, num_returns=len(self.step_refs), timeout=self.timeout_s + 5)
            for s, ref in enumerate(self.step_refs):
                if ref in stuck and s not in self._suspects:
                    ray.kill(self.shards[s], no_restart=False)
        self._suspects = set()
        self.step_refs, self._sends = [], []
        self._close_group()
        wait_ready(self.shards, self.restart_timeout_s)   # a restarted shard has reloaded its experts
        self.generation += 1
        store = open_master_store(self.my_ip, self.timeout_s)
        listener = links.Listener(self.generation) if self.use_links else None
        budget = 0 if listener is None else links.budget_bytes() if self.link_budget is None else self.link_budget
        spec = GroupSpec(self.generation, self.my_ip, store.port, self.num_shards + 1, 0, self.backend, self.timeout_s,
                         listener.name if listener is not None else "", budget)
        joins = [s.join_group.remote(dataclasses.replace(spec, rank=i + 1, is_every_token=self.dense[i]))
                 for i, s in enumerate(self.shards)]
        try:
            self.group = Group(spec, self.my_ip, self.device, store)  # blocks until every shard connected
            joined = ray.get(joins, timeout=self.timeout_s)
            if listener is not None:   # the shards that connected the link have sent their hello by now
                linked = listener.accept([i + 1 for i, j in enumerate(joined) if j.is_linked], budget, self.timeout_s)
                self.links = {rank - 1: link for rank, link in linked.items()}
        except Exception as e:
            self._close_group()
            raise ShardError(f"cannot build the expert-parallel group (generation {self.generation}): {e}") from e
        finally:
            if listener is not None:
                listener.close()
        self.wire = Wire(self.group.pg, self.backend, self.device, self.dtype, self.hidden, self.k,
                         budget if self.links else 0)
        self.is_broken = False
        self.num_rebuilds += 1
        self.last_rebuild_s = time.perf_counter() - t0

    def _close_group(self) -> None:
        self._close_links()
        if self.group is not None:
            self.group.close()
        self.group, self.wire = None, None

    def _close_links(self) -> None:
        for link in self.links.values():
            link.close()
        self.links, self._step_links = {}, []

    @property
    def num_links(self) -> int:
        """Shards of this generation reached over a same-node link."""
        return len(self.links)

    # ---- one step --------------------------------------------------------------------------
    def begin_step(self, step_id: int, layer_ids: tuple[int, ...], micro_batch_tokens: tuple[int, ...]) -> None:
        self.step_id = step_id
        plan = StepPlan(step_id, self.generation, tuple(layer_ids), tuple(int(t) for t in micro_batch_tokens))
        self.step_refs = [s.run_step.remote(plan) for s in self.shards]   # the step's only Ray calls
        self._sends = []
        self._num_sent = [0] * self.num_shards
        self._num_expected = len(layer_ids) * len(micro_batch_tokens)
        caps = self._caps = plan.micro_batch_tokens
        on_link = self.wire.link_micro_batches(caps) if self.links else (False,) * len(caps)
        self._step_links = [[self.links.get(s) if is_linked else None for s in range(self.num_shards)]
                            for is_linked in on_link]

    def dispatch(self, layer_id, micro_batch_id, x, expert_ids, weights):
        """x [T, hidden], expert_ids / weights [T, k] -> pending combine (posted recvs)."""
        num_tokens = x.shape[0]
        if num_tokens != self._caps[micro_batch_id]:   # every-token shards expect exactly the plan's count
            raise ValueError(f"micro-batch {micro_batch_id} dispatches {num_tokens} tokens, "
                             f"its step plan says {self._caps[micro_batch_id]}")
        rows = dispatch_rows(expert_ids, self.owner, self.dense)             # None: every token
        msg = self.wire.pack(x, expert_ids, weights)                         # [header | T x (hidden + meta)]
        step_links = self._step_links[micro_batch_id]
        recvs = []
        for s, r in enumerate(rows):
            n = num_tokens if r is None else r.numel()
            link = step_links[s]
            try:
                self._sends += self.wire.send_dispatch(s + 1, msg, r, link)
                self._num_sent[s] += 1
                if n:
                    work, buf = self.wire.post_combine(s + 1, n, link)
                    recvs.append((s, r, work, buf))
            except Exception as e:
                raise _ShardFailed(s, e) from e
        return num_tokens, recvs

    def combine(self, pending) -> torch.Tensor:
        num_tokens, recvs = pending
        out = None
        for s, rows, work, buf in recvs:           # shard order: a fixed summation order
            try:
                work.wait()
            except Exception as e:
                raise _ShardFailed(s, e) from e
            if rows is None:                       # every token (zeros where none of its experts)
                out = buf if out is None else out.add_(buf)   # first: 0 + buf == buf
                continue
            if out is None:
                out = torch.zeros(num_tokens, self.hidden, dtype=self.dtype, device=self.device)
            out.index_add_(0, rows, buf)
        if out is None:  # no token routed anywhere (cannot happen with k >= 1, but keep the shape)
            out = torch.zeros(num_tokens, self.hidden, dtype=self.dtype, device=self.device)
        return out

    def end_step(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def abort_step(self, exc: BaseException) -> BaseException:
        """After any exception inside a step: stop the shards' loops, mark the group for rebuild,
        and return the exception to raise (ShardError when a shard failed)."""
        self.is_broken = True
        failed = {exc.shard_id} if isinstance(exc, _ShardFailed) else set()
        notes = []
        if self.step_refs:  # Ray's view: which run_step calls ended with an error (a dead actor)
            done, _ = ray.wait(self.step_refs, num_returns=len(self.step_refs), timeout=2.0 if failed else 0.0)
            for s, ref in enumerate(self.step_refs):
                if ref in done:
                    try:
                        ray.get(ref)
                    except RayActorError as e:      # the process died
                        failed.add(s)
                        notes.append(f"shard {s}: {str(e).splitlines()[0]}")
                    except RayTaskError as e:       # run_step raised (often a consequence, e.g. a timeout)
                        notes.append(f"shard {s} raised: {str(e.cause if hasattr(e, 'cause') else e).splitlines()[0]}")
        if self.wire is not None:  # ABORT to the live shards still expecting messages (not waited for),
            num_mb = max(1, len(self._step_links))   # on the way their next message comes (link or group)
            for s in range(self.num_shards):
                if s not in failed and self._num_sent[s] < self._num_expected:
                    m = self._num_sent[s] % num_mb
                    link = self._step_links[m][s] if self._step_links else None
                    rows = self._caps[m] if self.dense[s] and self._caps else None   # nccl: the expected size
                    try:
                        self._sends += self.wire.send_abort(s + 1, link, rows)
                    except Exception:
                        pass
        self._suspects = set(failed)
        if not failed and not isinstance(exc, _ShardFailed):
            return exc  # a router-side error; the group is rebuilt anyway, to be safe
        cause = exc.cause if isinstance(exc, _ShardFailed) else exc
        return ShardError(
            f"expert shard(s) {sorted(failed)} failed during step {self.step_id} "
            f"(collective transport, generation {self.generation}): {str(cause).splitlines()[0]}"
            + (f"; Ray: {'; '.join(notes)}" if notes else "")
            + ". The sequences of this step are invalid; the next step reconnects the restarted shard(s).",
            tuple(sorted(failed)), self.step_id)

    def step_error(self) -> BaseException | None:
        for s, ref in enumerate(self.step_refs):
            try:
                ray.get(ref, timeout=self.timeout_s)
            except Exception as e:
                self.is_broken = True
                return ShardError(f"expert shard {s} raised during step {self.step_id}: {e}", (s,), self.step_id)
        return None

    def step_reports(self, timeout_s: float = 30.0) -> list:
        """StepReport of every shard for the last step (waits for them; benchmarks / debugging)."""
        return ray.get(self.step_refs, timeout=timeout_s)

    def close(self) -> None:
        self._close_group()
