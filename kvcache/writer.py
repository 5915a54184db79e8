"""Background writer: runs lower-tier writes off the caller's thread.

Owns: one daemon thread, its FIFO task queue and the count of bytes waiting in it. `submit`
never blocks: when more than `max_pending_bytes` are waiting, the task is dropped (counted in
`num_dropped`) — a cache write may be lost, a decode step is never delayed. A task that raises
is logged and counted; the thread keeps running.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundWriter:
    def __init__(self, *, max_pending_bytes: int = 1 << 30, name: str = "kvcache-writer"):
        self.max_pending_bytes = max_pending_bytes
        self._tasks: deque[tuple[Callable[[], None], int]] = deque()
        self._cond = threading.Condition()
        self._num_pending_bytes = 0
        self._is_busy = False
        self._is_closed = False
        self.num_done = 0
        self.num_dropped = 0
        self.num_failed = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def num_pending_bytes(self) -> int:
        return self._num_pending_bytes

    def submit(self, task: Callable[[], None], num_bytes: int = 0) -> bool:
        """Queue `task`; False (and dropped) if closed or the queue holds too many bytes."""
        with self._cond:
            if self._is_closed or (
                self._tasks and self._num_pending_bytes + num_bytes > self.max_pending_bytes
            ):
                self.num_dropped += 1
                return False
            self._tasks.append((task, num_bytes))
            self._num_pending_bytes += num_bytes
            self._cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued task has run; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._tasks and not self._is_busy, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what is queued, then stop the thread."""
        with self._cond:
            self._is_closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._tasks or self._is_closed)
                if not self._tasks:
                    return
                task, num_bytes = self._tasks.popleft()
                self._is_busy = True
            try:
                task()
            except Exception:
                self.num_failed += 1
                log.exception("kvcache background write failed")
            finally:
                with self._cond:
                    self._is_busy = False
                    self._num_pending_bytes -= num_bytes
                    self.num_done += 1
                    self._cond.notify_all()
