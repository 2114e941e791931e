"""What a run reports: TensorBoard, metrics.jsonl, summary.json, figures and the progress bar (main process only)."""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm.auto import tqdm

from utp_dist.config import DEFAULT_HPARAMS
from utp_dist.metrics import confusion_figure, confusion_markdown, roc_figure
from utp_dist.store import atomic
from utp_dist.store.run_dir import RunDir

if TYPE_CHECKING:
    from utp_dist.config import Config

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Where a run's reports go: TensorBoardTracker on the main process, NullTracker on every other one."""

    def write_config(self, cfg: Config) -> None:
        """The resolved config as config.yaml."""

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """A Markdown text in TensorBoard's Text tab."""

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars named like 'train/loss' at `step`."""

    def log_image(self, tag: str, image, step: int) -> None:
        """An HWC uint8 image in TensorBoard's Images tab."""

    def progress(self, steps: int, postfix: dict[str, str]) -> None:
        """Advance the progress bar."""

    def write_position(self, position: dict) -> None:
        """Where training stands (epoch, step, ...) as progress.json, rewritten at each log point."""

    def print(self, line: str) -> None:
        """A line on the console, above the progress bar."""

    def log_eval(self, split: str, values: dict, epoch: int, step: int, confusion, roc, classes: list[str], extra: dict) -> None:
        """One evaluation's scalars, figures and metrics.jsonl line."""

    def write_summary(self, summary: dict) -> None:
        """summary.json."""

    def close(self) -> None:
        """Flush and close."""


class TensorBoardTracker:
    """Writes every log of one run under its log folder."""

    def __init__(self, run: RunDir, total_steps: int, resume_step: int | None = None, bar_start: int = 0):
        self.run, self.log_dir, self.figures = run, run.logs, run.figures
        self.figures.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._drop_metrics_after(resume_step)
        # purge_step: TensorBoard drops what a killed segment logged after the state we resume from
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)
        self.bar = tqdm(total=total_steps, initial=min(bar_start, total_steps), desc="train", unit="step", dynamic_ncols=True)
        # drawing figures takes ~0.5 s per evaluation: one background thread keeps it off the training loop
        self.painter, self.paintings = ThreadPoolExecutor(max_workers=1, thread_name_prefix="figures"), []
        self._session_end = None  # the HParams session's end, written with the summary

    def write_config(self, cfg: Config) -> None:
        """The resolved config as config.yaml, and its hyper-parameters for TensorBoard's HParams dashboard."""
        self.run.config_file.write_text(cfg.to_yaml(), encoding="utf-8")
        self._session_end = self._write_hparams(cfg.to_dict())

    def _write_hparams(self, config: dict):
        """Write the HParams experiment and session start into this run's events (not add_hparams: it makes a sub-run);
        the dashboard's metric columns read the last value of the declared scalar tags. Returns the session end."""
        keys = config["output"].get("hparams") or DEFAULT_HPARAMS
        values = {key: _hparam_value(config, key) for key in keys}
        monitor = config["train"]["monitor_metric"]
        metrics = dict.fromkeys(
            ["val/loss", "val/acc@1", f"val/{monitor.removeprefix('val_')}", f"best/{monitor}", "test/loss", "test/acc@1"]
        )
        experiment, session_start, session_end = hparams(values, metrics)
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)
        return session_end

    def print(self, line: str) -> None:
        """A line on the console, above the progress bar (which tqdm redraws below it)."""
        self.bar.write(line)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """A Markdown text in TensorBoard's Text tab."""
        self.writer.add_text(tag, text, step)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars named like 'train/loss' at `step`."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image, step: int) -> None:
        """An HWC uint8 image in TensorBoard's Images tab."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def progress(self, steps: int, postfix: dict[str, str]) -> None:
        """Advance the progress bar by `steps` and show `postfix`."""
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(steps)

    def write_position(self, position: dict) -> None:
        """progress.json at each log point, so a dashboard or agent sees steps between evaluations; the scalars go out with it."""
        atomic.write_json(self.run.progress_file, {**position, "total_steps": self.bar.total, "time": time.time()}, indent=None)
        self.writer.flush()  # TensorBoard's own flush comes every 2 min: the train curve would lag that far behind

    def log_eval(self, split: str, values: dict, epoch: int, step: int, confusion, roc, classes: list[str], extra: dict) -> None:
        """One evaluation: scalars, confusion matrix (text + figure), ROC figure, and a metrics.jsonl line (+ `extra`)."""
        self.log_scalars({f"{split}/{k.removeprefix(split + '_')}": v for k, v in values.items()}, step)
        self.log_text(f"{split}/confusion_matrix", confusion_markdown(confusion, classes), step)
        name = f"{split}_epoch{epoch:03d}" if split == "val" else split
        auc = values.get(f"{split}_auroc_macro")
        self._figure(f"{split}/confusion_matrix", lambda: confusion_figure(confusion, classes, f"{split} epoch {epoch + 1}"), step, name)
        self._figure(f"{split}/roc_micro", lambda: roc_figure(*roc, auc, f"{split} ROC (micro)"), step, name)
        line = {"split": split, "epoch": epoch, "step": step, **values, **extra}
        with open(self.run.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(atomic.to_json(line) + "\n")  # an undefined metric (AUROC of a one-class split) is null
        self.writer.flush()

    def write_summary(self, summary: dict) -> None:
        """summary.json, written atomically; the best monitored value and the end of the HParams session to TensorBoard."""
        atomic.write_json(self.run.summary_file, summary)
        best = summary.get("best") or {}
        value = best.get("value")
        if "metric" in best and isinstance(value, (int, float)) and math.isfinite(value):  # no finite best: nothing to show
            self.writer.add_scalar(f"best/{best['metric']}", value, summary.get("steps", 0))
        if self._session_end is not None:
            self.writer.file_writer.add_summary(self._session_end)
        self.writer.flush()

    def close(self) -> None:
        """Finish the figures, flush and close the writer and the progress bar."""
        self.painter.shutdown(wait=True)
        for painting in self.paintings:
            if painting.exception() is not None:  # a figure is not worth failing a run for
                log.warning("could not draw a figure: %s", painting.exception())
        self.bar.close()
        self.writer.close()

    def _drop_metrics_after(self, step: int) -> None:
        """Keep metrics.jsonl lines up to `step` (the resumed state), so no evaluation appears twice."""
        if not self.run.metrics_file.exists():
            return
        # the test split is evaluated only after the last state, so it is always redone; malformed lines are dropped
        keep = [line + "\n" for line, record in self.run.metrics_lines() if record["step"] <= step and record["split"] != "test"]
        atomic.write_text(self.run.metrics_file, "".join(keep))

    def _figure(self, tag: str, draw, step: int, name: str) -> None:
        def paint() -> None:
            canvas = FigureCanvasAgg(draw())
            canvas.draw()  # rendered once, for both the PNG file and TensorBoard
            rgb = np.asarray(canvas.buffer_rgba())[..., :3]
            Image.fromarray(rgb).save(self.figures / f"{tag.split('/')[1]}_{name}.png")
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

        self.paintings.append(self.painter.submit(paint))


def _hparam_value(config: dict, key: str):
    """The value of dotted `key` as HParams takes it: bool, number or string (others as compact JSON)."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


class NullTracker:
    """The tracker of every process but the main one: every method the Tracker protocol declares does nothing."""

    def __getattr__(self, name: str):
        if name in TRACKER_METHODS:  # a method added to the protocol is a no-op here without a line of code
            return _nothing
        raise AttributeError(name)


TRACKER_METHODS = frozenset(name for name in vars(Tracker) if not name.startswith("_"))


def _nothing(*args, **kwargs) -> None:
    return None
