"""Building small C sources into shared libraries, once per machine (cpu_kernels.py, byte_kernels.py).

Owns nothing but files in the kernel cache: $DSV4_KERNEL_CACHE (default
~/.cache/dsv4-serve/kernels). A library is built with the system C compiler ($CC, default ``cc``)
and kept there under ``<name>_<key>.so``, the key a hash of the source, the flags and the CPU's
feature flags (``-march=native`` code is only reused on a CPU with the same features). Builds are
atomic (compiled beside the final name, then renamed in), so concurrent processes may race.
Callers decide what a failed build means (they warn once and fall back to slower code).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Sequence


def cache_dir() -> str:
    return os.environ.get("DSV4_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv4-serve",
                                                                "kernels")


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for): a cached build is only reused on
    a CPU with the same features."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def build_shared_library(name: str, source: str, flags: Sequence[str], libs: Sequence[str] = ("-lm",)
                         ) -> ctypes.CDLL:
    """`source` compiled with ``$CC <flags> ... <libs>`` into the kernel cache (reused when
    already built there) and loaded. Raises OSError or subprocess.SubprocessError (with the
    compiler's stderr) when there is no compiler or the build fails; nothing half-built is kept
    under the final name."""
    key = hashlib.sha256("\0".join([source, *flags, cpu_flags()]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{name}_{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        staged = f"{path}.{os.getpid()}.tmp"    # built beside its final name, then renamed in
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, f"{name}.c")
            with open(src, "w") as f:
                f.write(source)
            cc = os.environ.get("CC", "cc")
            subprocess.run([cc, *flags, src, "-o", staged, *libs], check=True, capture_output=True, timeout=120)
        os.replace(staged, path)
    return ctypes.CDLL(path)


def build_or_warn(name: str, source: str, flags: Sequence[str], what: str, fallback: str) -> ctypes.CDLL | None:
    """`build_shared_library`, or None with one warning naming `what` is unavailable (the
    compiler's error) and what runs instead (`fallback`). Callers cache the result per process."""
    try:
        return build_shared_library(name, source, flags)
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[:300]
        warnings.warn(f"{what} unavailable ({type(e).__name__}: {e} {detail}); {fallback}")
        return None
