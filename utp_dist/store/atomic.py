"""Files replaced whole: a reader, or a crash, sees the old content or the new one, never half of it (JSON ones
without NaN)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def to_json(value, indent: int | None = None) -> str:
    """JSON text in which non-finite floats (NaN, inf) are null: JSON has no NaN, and readers choke on it."""
    return json.dumps(_finite(value), indent=indent, default=str, allow_nan=False)


def write_json(path: Path, value, indent: int | None = 2, fsync: bool = False) -> None:
    """Replace `path` with `value` as JSON (non-finite floats as null), atomically."""
    write_text(path, to_json(value, indent), fsync=fsync)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Write `text` to a temp file beside `path` (named per process, so concurrent writers never share it), then rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if fsync:  # durable before the rename: what the rename publishes survives a power cut
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
