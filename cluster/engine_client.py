"""How the ingress reaches Engine replicas: over Serve handles, or in process.

Owns: the handles (or Engine objects) only. Both pools expose the same three calls, so the
HTTP layer and the benchmark's "Engine called directly" path share all the code above them:
    generate(replica, GenerateRequest) -> async iterator of Admitted | Rejected | TokenEvent
    stats(replica) -> EngineStats
    is_healthy(replica) -> bool
Leaving `generate`'s iteration early cancels the call, which aborts the sequence in the Engine.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol

from actors.messages import EngineStats, GenerateRequest


class EnginePool(Protocol):
    num_replicas: int

    def generate(self, replica: int, request: GenerateRequest) -> AsyncIterator: ...

    async def stats(self, replica: int) -> EngineStats: ...

    async def is_healthy(self, replica: int) -> bool: ...


class ServeEnginePool:
    """Engine deployments reached through Serve DeploymentHandles (one handle per replica
    deployment, so the ingress decides which replica serves a request)."""

    def __init__(self, handles: list, timeout_s: float = 5.0):
        self.handles = list(handles)
        self.num_replicas = len(self.handles)
        self.timeout_s = timeout_s
        self._streaming = [h.options(stream=True) for h in self.handles]

    async def generate(self, replica: int, request: GenerateRequest):
        gen = self._streaming[replica].generate.remote(request)
        is_done = False
        try:
            async for event in gen:
                yield event
            is_done = True
        finally:
            if not is_done:
                gen.cancel()

    async def stats(self, replica: int) -> EngineStats:
        return await asyncio.wait_for(self.handles[replica].stats.remote(), self.timeout_s)

    async def is_healthy(self, replica: int) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handles[replica].is_healthy.remote(), self.timeout_s))
        except Exception:
            return False


class LocalEnginePool:
    """Engines in this process (benchmarks, direct tests)."""

    def __init__(self, engines: list):
        self.engines = list(engines)
        self.num_replicas = len(self.engines)

    async def generate(self, replica: int, request: GenerateRequest):
        agen = self.engines[replica].generate(request)
        try:
            async for event in agen:
                yield event
        finally:
            await agen.aclose()

    async def stats(self, replica: int) -> EngineStats:
        return self.engines[replica].stats()

    async def is_healthy(self, replica: int) -> bool:
        return self.engines[replica].is_healthy()
