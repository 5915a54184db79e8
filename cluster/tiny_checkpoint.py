"""The embedded tiny checkpoint: generated on first use into a cache directory.

Owns: the cache directory layout `<cache>/tiny-seed0-v1/` (config.json + safetensors). The
checkpoint is deterministic (preset `tiny`, seed 0), so every node and replica that generates
it gets the same bytes and the same model fingerprint. Generation writes into a temporary
directory and renames it into place, so concurrent replicas never see a half-written
checkpoint. Random weights: it shows the system, not a language model.
"""

from __future__ import annotations

import os
import shutil
import tempfile

NAME = "tiny-seed0-v1"


def default_cache_dir() -> str:
    base = os.environ.get("DSV4_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsv4-serve")
    return base


def ensure_tiny_checkpoint(cache_dir: str | None = None) -> str:
    """Path of the tiny checkpoint under `cache_dir` (default: $DSV4_CACHE_DIR or
    ~/.cache/dsv4-serve), generating it if it is not there yet."""
    root = cache_dir or default_cache_dir()
    path = os.path.join(root, NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    from model_shards.random_checkpoint import generate

    tmp = tempfile.mkdtemp(prefix=f".{NAME}-", dir=root)
    try:
        generate(tmp, "tiny", "hf", "none", seed=0)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race: theirs is identical
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
