"""Helpers shared by the benchmark scripts: machine description and RESULTS.md appends."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            names = out.stdout.strip().splitlines()
            gpu = f", {len(names)}x {names[0]}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB{gpu}"


def append_results(title: str, result: dict, notes: str = "") -> None:
    """Print the JSON result and append a dated section to benchmarks/RESULTS.md."""
    print(json.dumps(result, indent=2))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS, "a") as f:
        f.write(f"\n## {title} — {stamp}\n\nMachine: {machine()}\n\n")
        if notes:
            f.write(notes.strip() + "\n\n")
        f.write("```json\n" + json.dumps(result, indent=2) + "\n```\n")
