"""The agent's GPU inventory from nvidia-smi (index, name, memory), narrowed by --gpus."""

from __future__ import annotations

import subprocess

from utp_dist.errors import UserError

QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]


def detected() -> list[dict]:
    """Every GPU nvidia-smi lists ([] on a machine without one or without the driver)."""
    try:
        out = subprocess.run(QUERY, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    found = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            memory = int(float(parts[2])) if parts[2].replace(".", "", 1).isdigit() else 0
            found.append({"index": int(parts[0]), "name": parts[1], "memory_mb": memory})
    return found


def inventory(spec: str) -> list[dict]:
    """The GPUs this agent offers: `auto` (all nvidia-smi lists), `none` (a CPU agent), or indices like `0,1`."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    if spec == "auto":
        return detected()
    try:
        wanted = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(f"--gpus {spec!r}: use auto, none, or comma-separated GPU indices such as 0,1") from None
    known = {gpu["index"]: gpu for gpu in detected()}
    return [known.get(index, {"index": index, "name": "", "memory_mb": 0}) for index in wanted]
