"""Saving a run: the Checkpointer (complete training states, atomic, with their cadence) and BestModel (the best
weights as a pipeline-ready export, and per-epoch weights if asked)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from transformers.utils import logging as hf_logging

from utp_dist.config import CheckpointConfig
from utp_dist.data.loaders import worker_death
from utp_dist.errors import UserError, first_line
from utp_dist.preemption import Stopped, StopRequest
from utp_dist.store import atomic
from utp_dist.store.run_dir import COMPLETE, RunDir, complete_states

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # save_pretrained's shard bar would break the training progress bar

META = "_best_meta.json"


class BestModel:
    """Keeps the best model (by monitor_metric) as a save_pretrained folder, and per-epoch weights if asked."""

    def __init__(self, run: RunDir, metric: str, mode: str, per_epoch: bool):
        self.folder, self.best_dir = run.checkpoints, run.best
        self.metric, self.mode, self.per_epoch = metric, mode, per_epoch
        self.best = self._read_meta()

    def is_better(self, value: float) -> bool:
        """Whether `value` beats the best so far (NaN never does)."""
        if value != value:
            return False
        if self.best is None:
            return True
        return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

    def update(self, model, processor, metrics: dict[str, float], epoch: int, step: int) -> bool:
        """After an evaluation: export the model if it is the best so far, and the epoch's weights if asked."""
        value = metrics[self.metric]
        improved = self.is_better(value)
        if improved:
            self.best = {"metric": self.metric, "mode": self.mode, "value": value, "epoch": epoch, "step": step}
            self._export(model, processor, f"best-step{step:08d}")
            self._swap_link(f"best-step{step:08d}")
            self._write_meta()
        if self.per_epoch:
            self._export(model, processor, f"epoch{epoch:03d}")
        return improved

    def state_dict(self) -> dict:
        """Best-so-far metadata, saved in every training state."""
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        """Restore the best-so-far metadata of a training state."""
        self.best = state["best"]

    def load_best(self, model: torch.nn.Module) -> None:
        """Load the best weights into `model` through from_pretrained (safetensors: loading runs no code)."""
        # from_pretrained, not a raw state dict: transformers may rename keys between memory and disk
        best = type(model).from_pretrained(self.best_dir.resolve(), use_safetensors=True)
        model.load_state_dict(best.state_dict(), strict=True)

    def _export(self, model, processor, name: str) -> None:
        target = self.folder / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.folder))
        error = _attempt(
            lambda: (model.save_pretrained(tmp, safe_serialization=True), processor.save_pretrained(tmp), _fsync_tree(tmp)), tmp
        )
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous best export stays as it was
            raise write_error(error, self.folder, sum(p.numel() * p.element_size() for p in model.parameters()))
        if target.exists():  # e.g. the same epoch saved again after a restart
            shutil.rmtree(target)
        os.rename(tmp, target)

    def _swap_link(self, name: str) -> None:
        # a symlink replaced with os.replace is never missing or half-written, even after a crash
        old = os.readlink(self.best_dir) if self.best_dir.is_symlink() else None
        tmp_link = self.folder / f".{self.best_dir.name}.tmp"
        tmp_link.unlink(missing_ok=True)
        os.symlink(name, tmp_link)
        os.replace(tmp_link, self.best_dir)
        if old and old != name:
            shutil.rmtree(self.folder / old, ignore_errors=True)

    def _write_meta(self) -> None:
        atomic.write_json(self.folder / META, self.best, fsync=True)

    def _read_meta(self) -> dict | None:
        try:
            return json.loads((self.folder / META).read_text())
        except (OSError, ValueError):
            return None


class NullBestModel(BestModel):
    """The checkpointer of every process but the main one: tracks the best, writes nothing."""

    def _export(self, *args, **kwargs) -> None:
        pass

    def _swap_link(self, *args, **kwargs) -> None:
        pass

    def _write_meta(self) -> None:
        pass


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _seal(folder: Path) -> dict[str, list]:
    """fsync every file of a state and return {name: [size, sha256]}, read in one pass."""
    return {path.name: [path.stat().st_size, _sha256(path, fsync=True)] for path in sorted(folder.iterdir())}


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


class DiskFull(UserError):
    """The file system of the output root is full; what was saved before stays intact."""


def write_error(error: OSError, folder: Path, need: int) -> UserError:
    """The one-line error for a failed write into `folder`; a full disk says how much is needed and how much is free."""
    if error.errno != errno.ENOSPC:
        return UserError(f"cannot write {error.filename or folder}: {error.strerror}")
    free = shutil.disk_usage(folder).free
    return DiskFull(
        f"no space left on device writing {error.filename or folder} (this needs about {need / 2**20:.1f} MiB, "
        f"{free / 2**20:.1f} MiB are free there); free some space and run the same command again: the newest complete "
        "training state continues the run"
    )


def _attempt(write, folder: Path) -> OSError | None:
    """Run a write into `folder`; its error as an OSError, returned rather than raised, so every rank can be told
    before anyone stops."""
    try:
        write()
    except OSError as err:
        return err
    except Exception as err:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        if worker_death(err):  # torch reports a dead DataLoader worker wherever the main process is: not a write error
            raise
        full = "No space left" in str(err) or shutil.disk_usage(folder).free < 2**20
        return OSError(errno.ENOSPC if full else errno.EIO, first_line(err), str(folder))
    return None


class DamagedState(UserError):
    """A training state whose files are not as they were saved."""


def damage(state: Path) -> str | None:
    """What is wrong with a complete state ('FILE: reason'), None when every file is as saved."""
    try:
        sealed = json.loads((state / COMPLETE).read_text())
    except (OSError, ValueError):
        sealed = None
    try:
        json.loads((state / IDENTITY).read_text())
    except (OSError, ValueError) as err:
        return f"{state / IDENTITY}: unreadable ({type(err).__name__})"
    files = sealed.get("files", {}) if isinstance(sealed, dict) else {}  # states of 0.2 have no file list
    for name, (size, sha256) in files.items():
        path = state / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, saved with {size} (truncated?)"
        if _sha256(path) != sha256:
            return f"{path}: its content changed since it was saved"
    return None


@contextlib.contextmanager
def _naming_the_file(path: Path):
    """Turn any failure to read `path` into one line naming it (torch's own text would even suggest weights_only=False)."""
    try:
        yield
    except Exception as err:  # unpickling, safetensors and OS errors alike: the state is unusable either way
        raise DamagedState(
            f"{path}: cannot be loaded ({type(err).__name__}); the training state is damaged, resume from an earlier one"
        ) from None


class Checkpointer:
    """Complete training states in RUN/state/step-NNNNNNNN, and when to save them (steps, minutes, epoch ends, signals).

    Every rank writes into a temporary folder, which is then flushed, marked complete and renamed; older states are
    deleted only after that.
    """

    def __init__(self, run: RunDir, accelerator, cfg: CheckpointConfig, stop: StopRequest, agree_every: int, callbacks, healthy):
        self.run, self.folder, self.accelerator, self.cfg, self.stop = run, run.state_dir, accelerator, cfg, stop
        self.agree_every, self.callbacks = agree_every, callbacks
        self.healthy = healthy  # raises (on every rank together) before weights that trained on a NaN loss are saved
        self.objects: tuple[torch.nn.Module, dict, dict, dict] | None = None
        self.last_save, self.saved_step = time.time(), None
        if accelerator.is_main_process and self.folder.is_dir():
            for stale in self.folder.glob(".tmp-step-*"):  # a save that a crash cut short; never complete
                shutil.rmtree(stale, ignore_errors=True)

    def track(self, model: torch.nn.Module, progress, shared: dict, per_rank: dict, identity: dict) -> None:
        """What every state holds: the model, `shared` objects (main process), `per_rank` ones, and the run's identity;
        `progress` (step, epoch, position) says where the run stands."""
        self.progress, self.objects = progress, (model, shared, per_rank, identity)

    def maybe_save(self, epoch_end: bool = False, save_epoch: bool = False) -> None:
        """Save when due (steps, minutes, `save_epoch`) or asked by a signal, then raise Stopped for a signal.

        Under DDP one rank's signal or clock decides for all, so the ranks agree on the flags; to keep the device
        pipeline free of a host sync on every step, they agree only at log points, step saves and epoch ends, which
        every rank reaches at the same step.
        """
        step = self.progress.step
        due_by_steps = bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0
        due_by_time = bool(self.cfg.every_n_minutes) and time.time() - self.last_save >= 60 * self.cfg.every_n_minutes
        flags = [self.stop.requested, due_by_time]  # plain bools: a single process never waits for the device here
        if self.accelerator.num_processes > 1:
            if not (epoch_end or due_by_steps or step % self.agree_every == 0):
                return
            flags = self.accelerator.reduce(torch.tensor(flags, device=self.accelerator.device).int(), "max").tolist()
        stopping, due_by_time = bool(flags[0]), bool(flags[1])
        if save_epoch or due_by_steps or due_by_time or stopping:
            self.save()
        if stopping:
            raise Stopped(f"stopped by signal at step {step}; the saved state continues the run", self.stop.signum)

    def save(self) -> Path:
        """Save the model and shared state dicts (main process), per-rank ones and RNG states (every rank), atomically."""
        self.healthy()
        model, shared, per_rank, identity = self.objects
        p = self.progress
        step, where = p.step, {"step": p.step, "epoch": p.epoch, "position": p.position}
        acc, main = self.accelerator, self.accelerator.is_main_process
        tmp, final = self.folder / f".tmp-step-{step:08d}", self.folder / f"step-{step:08d}"
        error = None
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
            error = _attempt(lambda: tmp.mkdir(parents=True), self.folder)
        self._agree(error, tmp)
        rank_state = {"rng": rng_state(), **{name: obj.state_dict() for name, obj in per_rank.items()}}
        error = _attempt(lambda: torch.save(rank_state, tmp / f"rank{acc.process_index}.pt"), self.folder)
        if main and error is None:
            error = _attempt(lambda: self._write_shared(tmp, model, shared, {**identity, **where}), self.folder)
        self.callbacks.on_state_written(tmp)
        self._agree(error, tmp)
        if main:
            error = _attempt(lambda: self._commit(tmp, final, step), self.folder)
        self._agree(error, tmp)
        self.last_save, self.saved_step = time.time(), step
        self.callbacks.on_save(final)
        log.info("saved training state %s", final)
        return final

    def pause(self, reason: str) -> None:
        """Save (unless this step is saved already) and raise Stopped, as a stop signal does: the run continues from here."""
        if self.saved_step != self.progress.step:
            self.save()
        raise Stopped(f"{reason} at step {self.progress.step}; the saved state continues the run")

    def save_final(self) -> None:
        """The state at the very end of training, so a finished run can be continued exactly with more epochs."""
        if self.saved_step != self.progress.step:
            self.save()

    def _write_shared(self, tmp: Path, model: torch.nn.Module, shared: dict, identity: dict) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({name: obj.state_dict() for name, obj in shared.items()}, tmp / "trainer.pt")
        (tmp / IDENTITY).write_text(json.dumps(identity, indent=1, default=str))

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        # every rank's files are on disk before COMPLETE says so; their sizes and hashes let a resume tell a damaged state
        atomic.write_json(tmp / COMPLETE, {"step": step, "files": _seal(tmp)}, fsync=True)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in complete_states(self.folder)[: -self.cfg.keep_last]:  # only now: the new state is complete
            shutil.rmtree(old, ignore_errors=True)

    def _agree(self, error: OSError | None, tmp: Path) -> None:
        """A barrier that also tells every rank whether any rank failed to write, so that all stop together."""
        failed = error is not None
        if self.accelerator.num_processes > 1:
            failed = bool(self.accelerator.reduce(torch.tensor([int(failed)], device=self.accelerator.device), "max").item())
        if not failed:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # never complete; the previous state is untouched
        if error is None:
            raise UserError(f"another process could not write its part of the training state {tmp}; its error is above")
        states = self.run.states()
        raise write_error(error, self.folder, sum(f.stat().st_size for f in states[-1].iterdir()) if states else 0)

    def load(self, path: Path) -> None:
        """Load a state saved by save(): safetensors for weights, weights_only pickles for the rest (no code runs)."""
        model, shared, per_rank, _ = self.objects
        with _naming_the_file(path / "model.safetensors"):
            load_model(model, str(path / "model.safetensors"))
        with _naming_the_file(path / "trainer.pt"):
            state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        for name, obj in shared.items():
            if name in state:
                obj.load_state_dict(state[name])
        own = path / f"rank{self.accelerator.process_index}.pt"
        # a rank that did not exist when the state was saved (more processes, epoch boundary) takes rank 0's RNG
        rank_file = own if own.exists() else path / "rank0.pt"
        with _naming_the_file(rank_file):
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        set_rng_state(rank_state["rng"])
        if own.exists():
            for name, obj in per_rank.items():
                obj.load_state_dict(rank_state[name])

    def mark_finished(self) -> None:
        """Tell checkpoint.resume=auto that this run has nothing left to continue."""
        if self.accelerator.is_main_process:
            atomic.write_text(self.run.finished_marker, "finished\n", fsync=True)


IDENTITY = "identity.json"


def read_identity(state: Path) -> dict:
    """The identity a state was saved with (config, data hash, version, where in the run)."""
    return json.loads((state / IDENTITY).read_text())


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA RNG states, in types that weights_only loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
