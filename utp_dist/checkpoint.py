"""Best and per-epoch weights: atomic writes, best tracking that survives restarts, a pipeline-ready export."""

from __future__ import annotations

import json
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

hf_logging.disable_progress_bar()  # save_pretrained's shard bar would break the training progress bar

BEST_LINK = "best"
META = "_best_meta.json"


class Checkpointer:
    """Keeps the best model (by monitor_metric) as a save_pretrained folder, and per-epoch weights if asked."""

    def __init__(self, folder: Path, metric: str, mode: str, per_epoch: bool):
        self.folder, self.metric, self.mode, self.per_epoch = folder, metric, mode, per_epoch
        self.best = self._read_meta()

    @property
    def best_dir(self) -> Path:
        """The exported best model (a symlink swapped atomically to its newest version)."""
        return self.folder / BEST_LINK

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
        tmp_link = self.folder / f".{BEST_LINK}.tmp"
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


class NullCheckpointer(Checkpointer):
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


STATE_DIR = "state"
COMPLETE = "COMPLETE"
FINISHED = "FINISHED"


class TrainingStates:
    """Complete training states in RUN/state/step-NNNNNNNN: every rank writes into a temporary folder, then it is
    flushed, marked complete and renamed; older states are deleted only after that."""

    def __init__(self, run_dir: Path, accelerator, keep_last: int):
        self.folder, self.accelerator, self.keep_last = run_dir / STATE_DIR, accelerator, keep_last
        if accelerator.is_main_process and self.folder.is_dir():
            for stale in self.folder.glob(".tmp-step-*"):  # a save that a crash cut short; never complete
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, model: torch.nn.Module, shared: dict, per_rank: dict, identity: dict) -> Path:
        """Save the model and `shared` state dicts (main process), `per_rank` ones and RNG states (every rank), atomically."""
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
            (tmp / "identity.json").write_text(json.dumps(identity, indent=1, default=str))
            time.sleep(float(os.environ.get("UTP_DIST_TEST_SLOW_SAVE", "0")))  # test hook: widen the crash window
        acc.wait_for_everyone()
        if main:
            _fsync_tree(tmp)  # every rank's files are on disk before COMPLETE says so
            atomic.write_text(tmp / COMPLETE, str(step), fsync=True)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in complete_states(self.folder)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path, model: torch.nn.Module, shared: dict, per_rank: dict) -> None:
        """Load a state saved by save(): safetensors for weights, weights_only pickles for the rest (no code runs)."""
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
            atomic.write_text(self.folder.parent / FINISHED, "finished\n", fsync=True)


def complete_states(folder: Path) -> list[Path]:
    """Complete states in a state folder, oldest first (by the step in their name, which save() wrote)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / COMPLETE).is_file())


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
