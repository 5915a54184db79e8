"""Host-RAM tier: record bytes in Redis (``redis://`` URL), shared by every router of a cluster.

Owns: the Redis client, this process's exact LRU view of the keys it wrote or read under its key
prefix (with their sizes, for the byte budget), and the up/down state of the connection.

Reads are pipelined MGETs over a connection of their own, parsed by resp_reader.py (values
land in pooled memory, read-only memoryviews; small ones are bytes), writes pipelined MSETs, evictions pipelined GET+DEL (so an evicted
value can move down a tier). The budget covers the keys this process knows about; a Redis shared
by several routers should also run with ``maxmemory`` + ``allkeys-lru`` as a backstop.

Redis being unreachable never fails a call: the first failure logs ONE warning and marks the
tier down; while down every read misses and every write is dropped without touching the
network; a probe thread PINGs every `retry_interval_s`, and on success the tier is used again
(after dropping keys that did not survive the outage from the LRU view).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcache.lru import ByteLRU
from kvcache.resp_reader import MGetReader
from kvcache.tier import Tier

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def make_client(url: str, *, socket_timeout_s: float = 2.0) -> redis.Redis:
    """The redis-py client a `RedisTier` talks through (benchmarks build their raw baseline
    with it too, so both sides read through the same client settings)."""
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0),
    )


def _nbytes(value) -> int:
    return memoryview(value).nbytes


def _chunks(seq: Sequence, size: int):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


class RedisTier(Tier):
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        budget_bytes: int,
        prefix: str = "dsv4kv:",
        retry_interval_s: float = 5.0,
        socket_timeout_s: float = 2.0,
        max_batch_keys: int = 256,
        max_batch_bytes: int = 64 << 20,
    ):
        self.prefix = prefix
        self.retry_interval_s = retry_interval_s
        self.max_batch_keys = max_batch_keys
        self.max_batch_bytes = max_batch_bytes
        self._client = make_client(url, socket_timeout_s=socket_timeout_s)
        self._reader = MGetReader(self._client)  # reads: one copy per byte (resp_reader.py)
        kwargs = self._client.connection_pool.connection_kwargs
        self.address = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self._lru = ByteLRU(budget_bytes)
        self._lock = threading.RLock()
        self._is_down = False
        self._is_closed = threading.Event()
        self._is_error_warned = False
        self.num_outages = 0

    # -- availability ------------------------------------------------------------------------

    def is_available(self) -> bool:
        return not self._is_down

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            if self._is_down or self._is_closed.is_set():
                return
            self._is_down = True
            self.num_outages += 1
            threading.Thread(target=self._probe_until_back, name="kvcache-redis-probe", daemon=True).start()
        log.warning(
            "Redis tier at %s unreachable (%s: %s); continuing with the other tiers, "
            "retrying every %.1f s", self.address, type(exc).__name__, exc, self.retry_interval_s,
        )

    def _probe_until_back(self) -> None:
        """Probe thread of one outage: PING every `retry_interval_s` until Redis answers."""
        while not self._is_closed.wait(self.retry_interval_s):
            try:
                self._client.ping()
                self._forget_lost_keys()
                self._reader.close()  # its connection died with the outage
            except REDIS_ERRORS:
                continue
            with self._lock:
                self._is_down = False
            log.info("Redis tier at %s is reachable again; using it", self.address)
            return

    def _forget_lost_keys(self) -> None:
        """After an outage: drop keys that did not survive it from the LRU view."""
        keys = self.lru_keys()
        found = self._exists(keys)
        with self._lock:
            for key, is_found in zip(keys, found):
                if not is_found:
                    self._lru.remove(key)

    # -- operations ---------------------------------------------------------------------------

    def _run(self, operation, default, what: str):
        """`operation()`, or `default` if Redis is down or fails (never raises)."""
        if not self.is_available():
            return default
        try:
            result = operation()
        except REDIS_ERRORS as exc:
            self._mark_down(exc)
            return default
        except redis.exceptions.RedisError as exc:  # e.g. OOM on write: a full tier drops it
            if not self._is_error_warned:
                log.warning("Redis tier at %s: %s failed (%s)", self.address, what, exc)
                self._is_error_warned = True
            return default
        self._is_error_warned = False
        return result

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.prefix + key)
        return [bool(n) for n in pipe.execute()] if keys else []

    def _mget(self, keys: Sequence[str]) -> list[memoryview | bytes | None]:
        groups = [[(self.prefix + key).encode() for key in chunk] for chunk in _chunks(list(keys), self.max_batch_keys)]
        return self._reader.mget(groups)

    def _mset(self, items: Sequence[tuple[str, object]]) -> bool:
        pipe = self._client.pipeline(transaction=False)
        batch, batch_bytes = {}, 0
        for key, value in items:
            batch[self.prefix + key] = value if isinstance(value, bytes) else memoryview(value)
            batch_bytes += _nbytes(value)
            if len(batch) >= self.max_batch_keys or batch_bytes >= self.max_batch_bytes:
                pipe.mset(batch)
                batch, batch_bytes = {}, 0
        if batch:
            pipe.mset(batch)
        pipe.execute()
        return True

    def _take(self, keys: Sequence[str], is_collecting: bool) -> list:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            if is_collecting:
                pipe.get(self.prefix + key)
            pipe.delete(self.prefix + key)
        results = pipe.execute()
        return results[0::2] if is_collecting else []

    def get_many(self, keys: Sequence[str]) -> list[memoryview | bytes | None]:
        values = self._run(lambda: self._mget(keys), None, "read") if keys else None
        if values is None:
            return [None] * len(keys)
        with self._lock:
            for key, value in zip(keys, values):
                if value is None:
                    self._lru.remove(key)
                elif not self._lru.touch(key):
                    self._lru.add(key, len(value))
        return values

    def put_many(self, items: Sequence[tuple[str, object]], *, is_collecting_evicted: bool = False
                 ) -> list[tuple[str, bytes]]:
        items = [(key, value) for key, value in items if self._lru.fits(_nbytes(value))]
        if not items or not self._run(lambda: self._mset(items), False, "write"):
            return []
        with self._lock:
            for key, value in items:
                self._lru.add(key, _nbytes(value))
            victims = self._lru.pop_over_budget()
        if not victims:
            return []
        values = self._run(lambda: self._take(victims, is_collecting_evicted), [], "evict")
        return [(key, value) for key, value in zip(victims, values) if value is not None]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        found = self._run(lambda: self._exists(keys), None, "exists") if keys else None
        return found if found is not None else [False] * len(keys)

    def delete_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._lru.remove(key)
        if keys:
            self._run(lambda: self._client.delete(*[self.prefix + key for key in keys]), 0, "delete")

    def close(self) -> None:
        self._is_closed.set()
        self._reader.close()
        self._client.close()
