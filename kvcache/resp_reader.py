"""MGET replies read straight off the socket: each value byte is copied once, from the kernel
into warm pooled memory (memory.py), instead of redis-py's three copies into fresh memory.

Owns: one dedicated connection of the Redis tier (a redis-py `Connection` built with the
client's own settings, so URL, auth, db, TLS and timeouts are redis-py's), used for the tier's
reads only (`RedisTier.get_many`), and guarded by a lock.

Why: redis-py's RESP2 parser reads a bulk string by ``recv`` into new bytes, ``BytesIO.write``,
``BytesIO.read`` and a ``[:-2]`` slice, about 1 GB/s here; the restore of a long context from
Redis was bound by it (measured: 12.9 MB in ~7-16 ms against ~3 ms for ``recv_into``).

Protocol (RESP2 and RESP3): the reply to ``MGET k1 .. kn`` is ``*n\\r\\n`` then per key either
``$<len>\\r\\n<len bytes>\\r\\n`` or a null (``$-1\\r\\n``, RESP3 ``_\\r\\n``); an error reply is
``-<message>\\r\\n``. Values of at least `MIN_ARENA_VALUE_BYTES` are read into an *arena*: a
pooled buffer (`memory.POOL`) carved into consecutive 64-byte aligned values, given out as
read-only memoryviews that keep the arena busy until the last of them dies; smaller values are
bytes. Anything unexpected on the wire raises `redis.exceptions.InvalidResponse` and drops the
connection (its state is unknown); socket failures raise `OSError` / redis errors as redis-py
would, so the tier's outage handling is unchanged. The next call reconnects, and so does a
call that finds its idle connection closed by the server (a restart, an idle timeout).
"""

from __future__ import annotations

import select
import threading
from collections.abc import Sequence

import numpy as np
import redis

from kvcache import memory

MIN_ARENA_VALUE_BYTES = 64 << 10
ARENA_BYTES = 32 << 20      # at least this much per arena: one for a typical restore
_ARENA_ALIGN = 64
_RECV_BYTES = 2 * MIN_ARENA_VALUE_BYTES  # headers and small values go through a buffer this size


class _Arena:
    """Consecutive aligned slices of pooled buffers; a new buffer when one is full."""

    def __init__(self):
        self._buffer: np.ndarray | None = None  # uint8 view of a pooled tensor
        self._used = 0

    def take(self, num_bytes: int) -> np.ndarray:
        start = -(-self._used // _ARENA_ALIGN) * _ARENA_ALIGN
        if self._buffer is None or start + num_bytes > len(self._buffer):
            self._buffer = memory.POOL.take(max(ARENA_BYTES, num_bytes)).numpy()
            start = 0
        self._used = start + num_bytes
        return self._buffer[start:start + num_bytes]

    def release(self) -> None:
        """Forget the buffer (the values given out keep it busy; the pool takes it back after)."""
        self._buffer, self._used = None, 0


class MGetReader:
    """`mget(keys)` over a dedicated connection built like `client`'s."""

    def __init__(self, client: redis.Redis):
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        self._connection_kwargs = dict(pool.connection_kwargs)
        self._connection = None
        self._lock = threading.Lock()
        self._buffer = bytearray(_RECV_BYTES)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # unread bytes of `_buffer`

    def mget(self, key_groups: Sequence[Sequence[bytes]]) -> list[memoryview | bytes | None]:
        """The values of every key, one MGET per group, pipelined; None where a key is absent."""
        with self._lock:
            sock = self._socket()
            try:
                sock.sendall(b"".join(_mget_command(keys) for keys in key_groups))
                arena = _Arena()
                values = []
                for keys in key_groups:
                    values += self._read_reply(sock, len(keys), arena)
                arena.release()
                return values
            except BaseException:
                self._disconnect()
                raise

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    # -- connection -----------------------------------------------------------------------------

    def _socket(self):
        if self._connection is not None and _is_stale(getattr(self._connection, "_sock", None)):
            self._disconnect()  # closed by the server (a restart, an idle timeout): connect again
        if self._connection is None:
            connection = self._connection_class(**self._connection_kwargs)
            connection.connect()  # handshake (AUTH, SELECT, HELLO) through redis-py
            self._connection = connection
            self._start = self._end = 0
        sock = getattr(self._connection, "_sock", None)
        if sock is None:
            self._disconnect()
            raise redis.exceptions.ConnectionError("Redis connection has no socket")
        return sock

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._start = self._end = 0
        if connection is not None:
            try:
                connection.disconnect()
            except Exception:
                pass

    # -- reply parsing --------------------------------------------------------------------------

    def _read_reply(self, sock, num_keys: int, arena: _Arena) -> list:
        line = self._line(sock)
        if line[:1] == b"-":
            raise redis.exceptions.ResponseError(line[1:].decode(errors="replace"))
        if line[:1] not in (b"*",) or _int(line) != num_keys:
            raise redis.exceptions.InvalidResponse(f"MGET of {num_keys} keys answered {line[:32]!r}")
        return [self._value(sock, arena) for _ in range(num_keys)]

    def _value(self, sock, arena: _Arena):
        line = self._line(sock)
        if line == b"_" or line == b"$-1":
            return None
        if line[:1] != b"$" or (length := _int(line)) < 0:
            raise redis.exceptions.InvalidResponse(f"unexpected MGET element {line[:32]!r}")
        if length < MIN_ARENA_VALUE_BYTES:
            self._fill(sock, length + 2)
            value = bytes(self._view[self._start:self._start + length])
        else:  # what is buffered, then straight from the socket into the arena
            target = arena.take(length)
            out = memoryview(target)
            num_copied = min(length, self._end - self._start)
            out[:num_copied] = self._view[self._start:self._start + num_copied]
            self._start += num_copied
            while num_copied < length:
                num_read = sock.recv_into(out[num_copied:], length - num_copied)
                if not num_read:
                    raise redis.exceptions.ConnectionError("Redis closed the connection")
                num_copied += num_read
            self._fill(sock, 2)
            value = out.toreadonly()
            length = 0
        if self._view[self._start + length:self._start + length + 2] != b"\r\n":
            raise redis.exceptions.InvalidResponse("bulk string not terminated by CRLF")
        self._start += length + 2
        return value

    def _line(self, sock) -> bytes:
        """The next CRLF-terminated line (without the CRLF)."""
        while True:
            end = self._buffer.find(b"\r\n", self._start, self._end)
            if end >= 0:
                line = bytes(self._view[self._start:end])
                self._start = end + 2
                return line
            if self._end - self._start >= _RECV_BYTES - 2:
                raise redis.exceptions.InvalidResponse("reply line too long")
            self._fill(sock, self._end - self._start + 1)

    def _fill(self, sock, num_bytes: int) -> None:
        """Make at least `num_bytes` unread bytes available in `_buffer` (small reads only)."""
        if self._end - self._start >= num_bytes:
            return
        if num_bytes > _RECV_BYTES:
            raise redis.exceptions.InvalidResponse("value too large for the line buffer")
        if self._start:  # move what is unread to the front
            num_unread = self._end - self._start
            self._view[:num_unread] = self._view[self._start:self._end]
            self._start, self._end = 0, num_unread
        while self._end - self._start < num_bytes:
            num_read = sock.recv_into(self._view[self._end:])
            if not num_read:
                raise redis.exceptions.ConnectionError("Redis closed the connection")
            self._end += num_read


def _is_stale(sock) -> bool:
    """Whether an idle connection's socket has something to read: between replies only an EOF
    or an error can be there."""
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _int(line: bytes) -> int:
    try:
        return int(line[1:])
    except ValueError:
        raise redis.exceptions.InvalidResponse(f"not a length: {line[:32]!r}") from None


def _mget_command(keys: Sequence[bytes]) -> bytes:
    parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
    parts += [b"$%d\r\n%s\r\n" % (len(key), key) for key in keys]
    return b"".join(parts)
