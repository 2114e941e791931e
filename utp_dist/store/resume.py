"""Which run a start continues or claims: find a saved state, check it may be continued, or create a new run folder."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from utp_dist.config import MAY_CHANGE_ON_RESUME, Config, flatten, under
from utp_dist.errors import UserError
from utp_dist.store import handshake
from utp_dist.store.checkpoint import damage, read_identity
from utp_dist.store.lock import RunLock
from utp_dist.store.run_dir import COMPLETE, STATE_DIR, RunDir, base_name, complete_states, find_runs
from utp_dist.version import __version__

log = logging.getLogger(__name__)


class ResumeError(UserError):
    """A saved state that cannot be continued as asked."""


@dataclass
class OpenedRun:
    """The run this start writes to, the state it continues (None for a new run), the identity its states record,
    and the run's lock (held by the main process, None on the others)."""

    run: RunDir
    state: Path | None
    identity: dict
    lock: RunLock | None


def open_run(cfg: Config, accelerator, splits, total_steps: int) -> OpenedRun:
    """Continue a saved state or claim a new run folder, locked for this process; the main process decides and every
    rank gets its answer (or its error: no rank is left waiting in a collective)."""
    main = accelerator.is_main_process
    micro_batch = cfg.data.batch_size * accelerator.num_processes
    images = sum(len(v) for v in splits.samples.values())
    data_hash = hashlib.sha256(json.dumps(splits.fingerprint()).encode()).hexdigest()[:16]
    current = identity(cfg, data_hash, images, micro_batch)
    decided, lock = None, None
    if main:
        try:
            state, run, lock = _claim(cfg, splits.name)
            decided = (state, run, None)
        except UserError as err:
            decided = (None, None, err)
    state, run, error = broadcast_object_list([decided], from_process=0)[0]
    if error is not None:
        raise error
    if state is not None:
        saved = read_identity(state)
        try:
            check(state, saved, current, cfg.checkpoint.allow_changes, mid_epoch=saved["position"] > 0)
            _check_left_to_train(run, saved, cfg, total_steps)
        except ResumeError:
            if lock is not None:
                lock.release()
            raise
        if main and run.is_finished():
            run.finished_marker.unlink()  # continuing with more epochs: until it ends again, resume=auto may pick it up
    return OpenedRun(run, state, current, lock)


def _check_left_to_train(run: RunDir, saved: dict, cfg: Config, total_steps: int) -> None:
    """A finished run continues only when train.epochs or train.max_steps leave something to train."""
    if run.is_finished() and (saved["epoch"] >= cfg.train.epochs or saved["step"] >= total_steps):
        raise ResumeError(
            f"checkpoint.resume: run '{run.name}' has nothing left to train (it finished {saved['epoch']} epochs, "
            f"{saved['step']} steps); raise train.epochs or train.max_steps to continue it"
        )


def _claim(cfg: Config, dataset: str) -> tuple[Path | None, RunDir, RunLock]:
    """(state to continue or None, the run, its lock): the run is locked before its states are checked and used."""
    found = find_state(cfg, dataset)
    if found is not None:
        run = RunDir.of_state(found)
        lock = RunLock(run).acquire()
        state = found if cfg.checkpoint.resume != "auto" else newest_sound_state(run)
        if state is not None:
            handshake.claimed(run)
            return state, run, lock
        lock.release()  # every state of that run is damaged: train anew
    run = RunDir.create(cfg.output.root, dataset, base_name(cfg))
    lock = RunLock(run).acquire()
    handshake.claimed(run)
    return None, run, lock


def find_state(cfg: Config, dataset: str) -> Path | None:
    """The state to continue per checkpoint.resume (auto | never | PATH), or None for a new run; an explicit PATH to a
    damaged state is a one-line error."""
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
        state = path
    else:
        states = complete_states(path / STATE_DIR) or complete_states(path)
        if not states:
            raise ResumeError(
                f"checkpoint.resume: no complete training state in '{mode}'; give a run's checkpoint folder or one of its state/step-* folders"
            )
        state = states[-1]
    problem = damage(state)
    if problem:
        raise ResumeError(f"checkpoint.resume: {problem}; the state is damaged, give an earlier one (a state/step-* folder)")
    return state


def newest_sound_state(run: RunDir) -> Path | None:
    """The run's newest undamaged state; newer damaged ones are moved aside (state/damaged-step-N) with a warning."""
    for state in reversed(run.states()):
        problem = damage(state)
        if problem is None:
            return state
        aside = state.with_name(f"damaged-{state.name}")
        log.warning("%s; the state is damaged: moved to %s, continuing from the one before", problem, aside)
        shutil.rmtree(aside, ignore_errors=True)
        state.rename(aside)
    return None


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
    # a key added to utp_dist after the state was written took its default then, whatever it is called
    defaults = json.loads(json.dumps(flatten(Config().to_dict()), default=str))
    for key in sorted(set(saved["config"]) | set(current["config"])):
        if under(key, MAY_CHANGE_ON_RESUME):
            continue
        old, new = saved["config"].get(key, defaults.get(key, "<absent>")), current["config"].get(key, "<absent>")
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
