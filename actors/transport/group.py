"""One generation of the data-plane process group: TCPStore + a gloo / NCCL backend object.

Owns: the store and the backend of one generation (router: the store master, rank 0; shard k:
rank k + 1). The backend objects are built directly (`ProcessGroupGloo(store, rank, size, ...)`)
instead of through `dist.init_process_group`, so there is no process-global default group: a
router can rebuild its group, or one process can host several routers (tests do), without the
global state getting in the way. A rebuild makes a new generation with a new store port and a
new key prefix; the old objects are dropped.

NCCL waits: the backend runs with TORCH_NCCL_BLOCKING_WAIT=1 (wait() blocks the host, bounded by
the group timeout, and no watchdog can tear the process down), but its wait() polls completion in
1 ms sleeps, and the data plane waits ~3 times per layer and micro-batch on its critical path
(router combine, shard count + rows), so each wait could cost up to a millisecond of latency. So
`pg` is wrapped (NcclP2P): send / recv return works whose wait() first polls is_completed()
(spinning briefly, then ~20 us sleeps) up to the group timeout, and only then calls the real
wait() (completed by then: it returns at once and raises any NCCL error). gloo is used as is.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
from torch.distributed import PrefixStore, TCPStore

from ..messages import GroupSpec


def open_master_store(host: str, timeout_s: float) -> TCPStore:
    """The router's store on a free port of its node (port 0: the OS picks, no bind race)."""
    return TCPStore(host, 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class PolledWork:
    """A backend Work whose wait() polls is_completed() at microsecond granularity, bounded by
    timeout_s (TimeoutError), then calls the backend's wait() (raises the backend's own error)."""

    __slots__ = ("work", "timeout_s")
    SPINS = 200          # tight polls before sleeping (~0.5 ms): a decode step's waits are short

    def __init__(self, work, timeout_s: float):
        self.work, self.timeout_s = work, timeout_s

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> bool:
        work = self.work
        if not work.is_completed():
            deadline = time.monotonic() + self.timeout_s
            spins = 0
            while not work.is_completed():
                spins += 1
                if spins > self.SPINS:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"NCCL send/recv did not complete within {self.timeout_s:g} s "
                                           "(peer hung or dead)")
                    time.sleep(2e-5)
        return work.wait()


class NcclP2P:
    """The point-to-point surface of a ProcessGroupNCCL (send / recv / abort) with PolledWork."""

    def __init__(self, backend, timeout_s: float):
        self.backend, self.timeout_s = backend, timeout_s

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> PolledWork:
        return PolledWork(self.backend.send(tensors, dst, tag), self.timeout_s)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> PolledWork:
        return PolledWork(self.backend.recv(tensors, src, tag), self.timeout_s)

    def abort(self) -> None:
        self.backend.abort()


class Group:
    """A process group of one generation. `pg` exposes send / recv returning Work objects."""

    def __init__(self, spec: GroupSpec, my_ip: str, device: torch.device, store: TCPStore | None = None):
        self.spec = spec
        self.device = device
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if store is None:  # a shard: connect to the router's store
            store = TCPStore(spec.master_addr, spec.master_port, None, False, timeout)
        self._store = store
        prefixed = PrefixStore(f"dsv4-ep/g{spec.generation}", store)
        if spec.backend == "gloo":
            from torch.distributed import ProcessGroupGloo
            opts = ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [ProcessGroupGloo.create_device(hostname=my_ip)]
            self.pg = ProcessGroupGloo(prefixed, spec.rank, spec.world_size, opts)
        elif spec.backend == "nccl":
            # Bounded waits instead of hangs, and no process teardown on a peer's death: the
            # router (an Engine replica) must survive a shard failure. Read at construction.
            # Blocking wait turns the async error handling off (torch logs that it uses only the
            # blocking wait); should the environment turn blocking wait off, 2 (CleanUpOnly: abort
            # the communicators, keep the process) is the handling that keeps the router alive;
            # 3, torch's default, is SkipCleanUp, which tears the process down.
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            from torch.distributed import ProcessGroupNCCL
            torch.cuda.set_device(device)
            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = NcclP2P(ProcessGroupNCCL(prefixed, spec.rank, spec.world_size, opts), spec.timeout_s)
        else:
            raise ValueError(f"backend must be gloo or nccl, got {spec.backend!r}")

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def generation(self) -> int:
        return self.spec.generation

    def close(self) -> None:
        """Drop the backend; NCCL communicators are aborted so blocked peers error out."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None and self.spec.backend == "nccl":
            try:
                pg.abort()
            except Exception:
                pass
        self._store = None
