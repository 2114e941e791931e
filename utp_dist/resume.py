"""Which run a start continues or claims: find a saved state, check it may be continued, or create a new run folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from utp_dist import __version__
from utp_dist.checkpoint import read_identity
from utp_dist.config import MAY_CHANGE_ON_RESUME, Config, flatten
from utp_dist.errors import UserError
from utp_dist.runs import COMPLETE, STATE_DIR, RunDir, base_name, complete_states, find_runs


class ResumeError(UserError):
    """A saved state that cannot be continued as asked."""


@dataclass
class OpenedRun:
    """The run this start writes to, the state it continues (None for a new run) and the identity its states record."""

    run: RunDir
    state: Path | None
    identity: dict


def open_run(cfg: Config, accelerator, splits) -> OpenedRun:
    """Continue a saved state or claim a new run folder; the main process decides and every rank gets its answer."""
    main = accelerator.is_main_process
    micro_batch = cfg.data.batch_size * accelerator.num_processes
    images = sum(len(v) for v in splits.samples.values())
    data_hash = hashlib.sha256(json.dumps(splits.fingerprint()).encode()).hexdigest()[:16]
    current = identity(cfg, data_hash, images, micro_batch)
    state = broadcast_object_list([find_state(cfg, splits.name) if main else None], from_process=0)[0]
    if state is not None:
        saved = read_identity(state)
        check(state, saved, current, cfg.checkpoint.allow_changes, mid_epoch=saved["position"] > 0)
        run = RunDir.of_state(state)
    else:
        run = broadcast_object_list([RunDir.create(cfg.output.root, splits.name, base_name(cfg)) if main else None], from_process=0)[0]
    return OpenedRun(run, state, current)


def find_state(cfg: Config, dataset: str) -> Path | None:
    """The state to continue per checkpoint.resume (auto | never | PATH), or None for a new run."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        newest = [
            states[-1] for run in find_runs(cfg.output.root, base_name(cfg), dataset) if not run.is_finished() and (states := run.states())
        ]
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


def identity(cfg: Config, data_hash: str, images: int, micro_batch: int) -> dict:
    """What a state records about the run that wrote it."""
    return {
        "config": json.loads(json.dumps(flatten(cfg.to_dict()), default=str)),
        "data_hash": data_hash,
        "images": images,
        "version": __version__,
        "micro_batch": micro_batch,
    }


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
