"""Files replaced whole: a reader, or a crash, sees the old content or the new one, never half of it."""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Write `text` to a temp file beside `path` (named per process, so concurrent writers never share it), then rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if fsync:  # durable before the rename: what the rename publishes survives a power cut
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
