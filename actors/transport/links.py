"""Same-node links of the data plane: a Unix domain stream socket between the router and each
expert shard that runs on the router's machine (CPU groups, i.e. gloo; never NCCL).

Owns: the sockets of one group generation: on the router a listener (only while the group is
built) and one accepted socket per linked shard; on a shard its one connected socket. The
torch.distributed group is still built for every generation: it carries the messages a link
does not (see `Wire.link_micro_batches`), and everything of a shard that has no link.

Why: on one machine a gloo message costs several loopback TCP writes (a send-ready notice, the
data, a recv-ready notice for the next message) and two thread hand-offs on each side (gloo's
event-loop thread reads the socket, then wakes the waiting thread). Measured on the 2-core CPU
VM of benchmarks/ep_cpu.py: a 2 KiB ping-pong between two processes takes ~180 us over gloo and
~22 us over a Unix socket, and with router + 2 shards on 2 cores the gloo path degrades much
more under load (its extra threads compete for the cores). A link read or write is one syscall
in the thread that needs the bytes.

Addressing: an abstract-namespace name (Linux), random per generation, sent in GroupSpec. A shard
on another machine, or in another network namespace, cannot connect: it joins without a link
(GroupJoined.is_linked False) and the router uses gloo for it. So the torch.distributed group
stays the cross-node path, and `launch(..., same_node_links=False)` turns links off altogether.

Flow control: link sends are synchronous (`sendall` in the caller's thread), so a link must never
hold more unread bytes than its socket buffer, or the router and a shard could block in sendall
on each other. At most one message per micro-batch is unread per direction (the router sends
(layer, m) only after combining (layer - 1, m)), so the micro-batches whose dispatch messages
together fit in `budget_bytes()` (half the effective SO_SNDBUF both ends get) use the link, the
others gloo (Wire.link_micro_batches: the same rule on both sides, from the StepPlan). Sockets
are blocking with kernel-side timeouts (SO_RCVTIMEO / SO_SNDTIMEO, the group timeout): a send or
receive that makes no progress for that long raises TimeoutError.

Failure: a dead peer closes its socket: the next read raises ConnectionError ("closed by peer")
at once, a write raises BrokenPipeError / ConnectionResetError; the caller maps both to a shard
failure exactly as for gloo errors.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import time

import torch

_HELLO = struct.Struct("<qq")          # shard -> router after connect: rank, generation
_REQUEST_SNDBUF = 4 << 20              # asked of both ends; the kernel caps it at wmem_max (x2)
_budget: int | None = None


def _set_sndbuf(sock: socket.socket) -> int:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _REQUEST_SNDBUF)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)   # effective (Linux doubles the request)


def is_supported() -> bool:
    return hasattr(socket, "AF_UNIX") and os.uname().sysname == "Linux"   # abstract namespace: Linux


def budget_bytes() -> int:
    """Bytes a link may hold unread per direction: half the effective send buffer of a socket of
    this machine (headroom for the kernel's per-buffer overhead)."""
    global _budget
    if _budget is None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _budget = _set_sndbuf(a) // 2
        finally:
            a.close()
            b.close()
    return _budget


def as_bytes(t: torch.Tensor) -> memoryview:
    """Writable flat byte view of a contiguous CPU tensor (shares its memory)."""
    if not t.is_contiguous():
        raise ValueError("same-node link: tensors must be contiguous")
    try:
        return memoryview(t.numpy()).cast("B")
    except (TypeError, RuntimeError):   # no numpy dtype (bfloat16), or a tensor that requires grad
        return memoryview(t.detach().view(torch.uint8).numpy()).cast("B")


def _set_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Blocking socket with kernel-side timeouts (SO_RCVTIMEO / SO_SNDTIMEO): one syscall per read
    or write (a Python-level timeout would poll() before each)."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(timeout_s), int((timeout_s % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class LinkRecv:
    """A posted receive of exactly len(view) bytes; wait() reads the link up to it (FIFO)."""

    __slots__ = ("link", "view", "done")

    def __init__(self, link: "Link", view: memoryview):
        self.link, self.view, self.done = link, view, False

    def wait(self) -> bool:
        while not self.done:
            self.link.read_next()
        return True


class Link:
    """One connected socket. send(): synchronous; post(): queue a receive of a known size, read in
    posting order when a wait() needs it; read_exact(): read now (the shard's dispatch messages)."""

    def __init__(self, sock: socket.socket, timeout_s: float):
        _set_timeouts(sock, timeout_s)
        self.sock, self.timeout_s = sock, timeout_s
        self._posted: collections.deque[LinkRecv] = collections.deque()

    def send(self, data) -> None:
        try:
            self.sock.sendall(data, socket.MSG_NOSIGNAL)
        except BlockingIOError as e:   # SO_SNDTIMEO ran out
            raise TimeoutError(f"same-node link: send made no progress within {self.timeout_s:g} s "
                               "(peer hung or dead)") from e

    def post(self, view: memoryview) -> LinkRecv:
        r = LinkRecv(self, view)
        self._posted.append(r)
        return r

    def read_next(self) -> None:
        r = self._posted[0]
        self.read_exact(r.view)
        self._posted.popleft()
        r.done = True

    def read_exact(self, view: memoryview) -> None:
        sock, got, n = self.sock, 0, len(view)
        try:
            while got < n:
                k = sock.recv_into(view[got:] if got else view, n - got, socket.MSG_WAITALL)
                if not k:
                    raise ConnectionError("same-node link: connection closed by peer (the peer process "
                                          "exited or closed the group)")
                got += k
        except BlockingIOError as e:   # SO_RCVTIMEO ran out
            raise TimeoutError(f"same-node link: no data within {self.timeout_s:g} s (peer hung or dead)") from e

    def set_timeout(self, timeout_s: float) -> None:
        _set_timeouts(self.sock, timeout_s)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._posted.clear()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes a peer blocked on this socket at once
        except OSError:
            pass
        self.sock.close()


class Listener:
    """Router side of one generation's links: bind, then accept() the shards that joined with one."""

    def __init__(self, generation: int):
        self.generation = generation
        self.name = f"dsv4-ep-{os.getpid()}-g{generation}-{os.urandom(8).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind("\0" + self.name)
        self.sock.listen(128)

    def accept(self, ranks: list[int], budget: int, timeout_s: float) -> dict[int, Link]:
        """Links of `ranks` (the shards that reported a connected link), keyed by rank."""
        links: dict[int, Link] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(links) < len(ranks):
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                conn, _ = self.sock.accept()
                hello = bytearray(_HELLO.size)
                try:
                    Link(conn, max(0.01, deadline - time.monotonic())).read_exact(memoryview(hello))
                except (OSError, ConnectionError, TimeoutError):
                    conn.close()
                    continue
                rank, generation = _HELLO.unpack(hello)
                if generation != self.generation or rank not in ranks or rank in links:
                    conn.close()
                    continue
                if _set_sndbuf(conn) < 2 * budget:
                    conn.close()
                    raise RuntimeError(f"same-node link to rank {rank}: send buffer below the agreed budget")
                links[rank] = Link(conn, timeout_s)
        except BaseException:
            for link in links.values():
                link.close()
            raise
        return links

    def close(self) -> None:
        self.sock.close()


def connect(name: str, rank: int, generation: int, budget: int, timeout_s: float) -> Link | None:
    """Shard side: the link to the router's listener, or None when it cannot be had (another
    machine or network namespace, a socket buffer below the budget): then gloo carries everything."""
    if not name or budget <= 0 or not is_supported():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(timeout_s, 5.0))
        sock.connect("\0" + name)
        if _set_sndbuf(sock) < 2 * budget:
            sock.close()
            return None
        sock.sendall(_HELLO.pack(rank, generation))
    except OSError:
        sock.close()
        return None
    return Link(sock, timeout_s)
