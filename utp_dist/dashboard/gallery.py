"""The run page's predictions: the sample of the newest validation as gallery tiles, and a per-class table."""

from __future__ import annotations

import math
from pathlib import Path

from utp_dist.dashboard import files
from utp_dist.store import runfiles
from utp_dist.store.run_dir import RunDir


def gallery(folder: RunDir | None, roots: tuple[Path, ...]) -> dict:
    """{"tiles": [...], "classes", "epoch", "per_class": [...], "per_class_split"}; empty lists before the first evaluation.

    Every value comes from a file a run wrote: indices and numbers are checked, so a hand-edited file shows less, never an error.
    """
    empty = {"tiles": [], "classes": [], "epoch": None, "per_class": [], "per_class_split": None}
    if folder is None or not folder.exists():
        return empty
    latest, table = runfiles.predictions(folder)
    if latest is None:
        return empty
    classes = [str(c) for c in latest["classes"]]
    tiles = []
    for sample in latest.get("samples") or []:
        try:
            label, predicted, confidence = classes[sample["label"]], classes[sample["predicted"]], float(sample["confidence"])
            url = files.url_of(roots, folder.predictions / str(sample["image"]))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if url is not None:
            tiles.append({"url": url, "label": label, "predicted": predicted, "confidence": confidence, "wrong": label != predicted})
    rows = []
    for row in (table or {}).get("per_class") or []:
        if isinstance(row, dict):
            rows.append({k: _number(row.get(k)) for k in ("precision", "recall", "f1", "support")} | {"class": str(row.get("class"))})
    split = (table or {}).get("split")
    return {"tiles": tiles, "classes": classes, "epoch": latest.get("epoch"), "per_class": rows, "per_class_split": split}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None
