"""Saving a run: the Checkpointer (complete training states, atomic, with their cadence) and BestModel (the best
weights as a pipeline-ready export, and per-epoch weights if asked)."""

from __future__ import annotations

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

from utp_dist import atomic
from utp_dist.config import CheckpointConfig
from utp_dist.preemption import Stopped, StopRequest
from utp_dist.runs import COMPLETE, RunDir, complete_states

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
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        _fsync_tree(tmp)
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
        atomic.write_text(self.folder / META, json.dumps(self.best, indent=2), fsync=True)

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


class Checkpointer:
    """Complete training states in RUN/state/step-NNNNNNNN, and when to save them (steps, minutes, epoch ends, signals).

    Every rank writes into a temporary folder, which is then flushed, marked complete and renamed; older states are
    deleted only after that.
    """

    def __init__(self, run: RunDir, accelerator, cfg: CheckpointConfig, stop: StopRequest, agree_every: int, callbacks):
        self.run, self.folder, self.accelerator, self.cfg, self.stop = run, run.state_dir, accelerator, cfg, stop
        self.agree_every, self.callbacks = agree_every, callbacks
        self.objects: tuple[torch.nn.Module, dict, dict, dict] | None = None
        self.last_save = time.time()
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
        model, shared, per_rank, identity = self.objects
        p = self.progress
        step, where = p.step, {"step": p.step, "epoch": p.epoch, "position": p.position}
        acc, main = self.accelerator, self.accelerator.is_main_process
        tmp, final = self.folder / f".tmp-step-{step:08d}", self.folder / f"step-{step:08d}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank_state = {"rng": rng_state(), **{name: obj.state_dict() for name, obj in per_rank.items()}}
        torch.save(rank_state, tmp / f"rank{acc.process_index}.pt")
        if main:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save({name: obj.state_dict() for name, obj in shared.items()}, tmp / "trainer.pt")
            (tmp / IDENTITY).write_text(json.dumps({**identity, **where}, indent=1, default=str))
        self.callbacks.on_state_written(tmp)
        acc.wait_for_everyone()
        if main:
            _fsync_tree(tmp)  # every rank's files are on disk before COMPLETE says so
            atomic.write_text(tmp / COMPLETE, str(step), fsync=True)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in complete_states(self.folder)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_save = time.time()
        self.callbacks.on_save(final)
        log.info("saved training state %s", final)
        return final

    def load(self, path: Path) -> None:
        """Load a state saved by save(): safetensors for weights, weights_only pickles for the rest (no code runs)."""
        model, shared, per_rank, _ = self.objects
        load_model(model, str(path / "model.safetensors"))
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        for name, obj in shared.items():
            if name in state:
                obj.load_state_dict(state[name])
        own = path / f"rank{self.accelerator.process_index}.pt"
        # a rank that did not exist when the state was saved (more processes, epoch boundary) takes rank 0's RNG
        rank_state = torch.load(own if own.exists() else path / "rank0.pt", map_location="cpu", weights_only=True)
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
