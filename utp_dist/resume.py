"""Which saved training state a run continues, and whether it may: config, data and version must match."""

from __future__ import annotations

import json
from pathlib import Path

from utp_dist.checkpoint import COMPLETE, FINISHED, STATE_DIR, complete_states
from utp_dist.config import MAY_CHANGE_ON_RESUME, Config, flatten
from utp_dist.errors import UserError
from utp_dist.runs import is_version_of

IDENTITY = "identity.json"


class ResumeError(UserError):
    """A saved state that cannot be continued as asked."""


def find_state(cfg: Config, dataset: str, base: str) -> Path | None:
    """The state to continue per checkpoint.resume (auto | never | PATH), or None for a new run."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        parent = Path(cfg.output.root) / "checkpoints" / dataset
        runs = [r for r in parent.iterdir() if is_version_of(base, r.name) and not (r / FINISHED).exists()] if parent.is_dir() else []
        newest = [states[-1] for r in runs if (states := complete_states(r / STATE_DIR))]
        return max(newest, key=lambda p: (p / COMPLETE).stat().st_mtime) if newest else None
    path = Path(mode).expanduser()
    if (path / COMPLETE).is_file():
        return path
    states = complete_states(path / STATE_DIR) or complete_states(path)
    if not states:
        raise ResumeError(
            f"checkpoint.resume: no complete training state in '{mode}'; give a run's checkpoint folder or one of its state/step-* folders"
        )
    return states[-1]


def identity(cfg: Config, data_hash: str, images: int, version: str, micro_batch: int, paths: dict) -> dict:
    """What a state records about the run that wrote it."""
    return {
        "config": json.loads(json.dumps(flatten(cfg.to_dict()), default=str)),
        "data_hash": data_hash,
        "images": images,
        "version": version,
        "micro_batch": micro_batch,
        "paths": paths,
    }


def read_identity(state: Path) -> dict:
    """The identity a state was saved with."""
    return json.loads((state / IDENTITY).read_text())


def check(state: Path, saved: dict, current: dict, allow_changes: bool, mid_epoch: bool) -> list[str]:
    """Refuse (one line, with the differences) to resume a state from another config, data set or version."""
    diffs = []
    for key in sorted(set(saved["config"]) | set(current["config"])):
        if any(key == m or key.startswith(m + ".") for m in MAY_CHANGE_ON_RESUME):
            continue
        old, new = saved["config"].get(key, "<absent>"), current["config"].get(key, "<absent>")
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    if saved["data_hash"] != current["data_hash"]:
        diffs.append(f"data: the image list after caps changed ({saved['images']} -> {current['images']} images)")
    if saved["version"] != current["version"]:
        diffs.append(f"utp_dist version: {saved['version']} -> {current['version']}")
    if diffs and not allow_changes:
        raise ResumeError(
            f"cannot resume '{state}', the run differs: {'; '.join(diffs)}. "
            "Set checkpoint.allow_changes=true to resume anyway, or checkpoint.resume=never for a new run"
        )
    if mid_epoch and saved["micro_batch"] != current["micro_batch"]:
        raise ResumeError(
            f"cannot resume '{state}' mid-epoch: it was saved with {saved['micro_batch']} images per global micro-batch "
            f"(batch_size x processes), this launch has {current['micro_batch']}, so the data order cannot be reproduced; "
            "launch the same number of processes, or resume from a state saved at an epoch end"
        )
    return diffs
