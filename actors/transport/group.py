"""One generation of the data-plane process group: TCPStore + a gloo / NCCL backend object.

Owns: the store and the backend of one generation (router: the store master, rank 0; shard k:
rank k + 1). The backend objects are built directly (`ProcessGroupGloo(store, rank, size, ...)`)
instead of through `dist.init_process_group`, so there is no process-global default group: a
router can rebuild its group, or one process can host several routers (tests do), without the
global state getting in the way. A rebuild makes a new generation with a new store port and a
new key prefix; the old objects are dropped.
"""

from __future__ import annotations

import datetime
import os

import torch
from torch.distributed import PrefixStore, TCPStore

from ..messages import GroupSpec


def open_master_store(host: str, timeout_s: float) -> TCPStore:
    """The router's store on a free port of its node (port 0: the OS picks, no bind race)."""
    return TCPStore(host, 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


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
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
            from torch.distributed import ProcessGroupNCCL
            torch.cuda.set_device(device)
            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = ProcessGroupNCCL(prefixed, spec.rank, spec.world_size, opts)
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
