"""Best and per-epoch weights: atomic writes, best tracking that survives restarts, a pipeline-ready export."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

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
        _atomic_write(self.folder / META, json.dumps(self.best, indent=2))

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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
