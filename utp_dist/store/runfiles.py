"""The one reader of what a run's folder says: progress, best, curves, figures, log tail, best export, and whether a
process trains it now. The CLI (`submit status`, through the sweep status), the agent and the dashboard all ask here.

Every file is read through RunDir; the dashboard's RunDirs are confined to the output roots (RunDir.within), and
every file read here passes `run.allows`.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import threading
from pathlib import Path

from utp_dist import states
from utp_dist.store.lock import RunLock
from utp_dist.store.run_dir import LOGS, RunDir

LOG_SUFFIXES = (".log", ".out", ".err")
TRAIN_TAGS = ("train/loss", "train/acc")
_curves_cache: dict[str, tuple[float, dict]] = {}
_curves_lock = threading.Lock()


def newest_mtime(run: RunDir) -> float | None:
    """The newest modification time among the run's log files and its FINISHED marker (None: no folder): what changes
    when the run wrote something new, for a reader that caches what it read."""
    try:
        times = [entry.stat().st_mtime for entry in _scan(run.logs) if entry.is_file()]
        times.append(run.logs.stat().st_mtime)
    except OSError:
        return None
    if run.finished_marker.exists():
        times.append(run.finished_marker.stat().st_mtime)
    return max(times)


def _scan(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return list(entries)


def holds_runs(root: str | os.PathLike) -> bool:
    """Whether an output root is there now (an unmounted share is not): its run folders' parent exists."""
    return (Path(root) / LOGS).is_dir()


def alive(run: RunDir) -> bool:
    """Whether a process trains the run now: one holds its run lock (the kernel drops it when that process dies, on
    whichever host, so a killed run is not alive however recently it wrote)."""
    return run.allows(run.lock_file) and RunLock(run).holder() is not None


def disk_state(run: RunDir) -> str:
    """What the folder says: succeeded (FINISHED), running (its lock is held), stopped (resumable states), else unknown."""
    finished = run.is_finished()
    return states.from_disk(finished, not finished and alive(run), bool(run.states()))


def finished_at(run: RunDir) -> float | None:
    """When the run last trained to its end (its FINISHED marker's time), None when it has not."""
    try:
        return run.finished_marker.stat().st_mtime if run.is_finished() else None
    except OSError:
        return None


def summary_at(run: RunDir) -> float | None:
    """When the run last wrote its summary (at the end of a training), None when it has none."""
    try:
        return run.summary_file.stat().st_mtime if run.allows(run.summary_file) else None
    except OSError:
        return None


def progress(run: RunDir, config: dict | None = None, monitor: tuple[str, str] | None = None) -> dict:
    """Epoch (0-based, as stored), step, totals, best so far, img/s, restarts, MFU, data wait and test metrics.

    A finished run's summary.json is final; while it trains, progress.json (rewritten at every log point) is ahead
    of the last evaluation in metrics.jsonl, so the step moves within an epoch and not only at evaluations. The best
    is of the metric the summary names, else `monitor` (metric, mode), else the config's train.monitor_*.
    """
    summary = run.read_summary() or {}
    lines = run.read_metrics()
    val = [line for line in lines if line.get("split") == "val"]
    train = (config or {}).get("train", {}) if isinstance(config, dict) else {}
    asked = monitor or (train.get("monitor_metric"), train.get("monitor_mode"))
    metric = (summary.get("best") or {}).get("metric") or asked[0] or "val_acc@1"
    mode = (summary.get("best") or {}).get("mode") or asked[1] or "max"
    values = [line[metric] for line in val if _number(line.get(metric))]
    best = _finite((summary.get("best") or {}).get("value"))
    if best is None and values:
        best = max(values) if mode == "max" else min(values)
    last = val[-1] if val else {}
    position = {} if summary else run.read_progress()
    if position.get("step", -1) < last.get("step", -1):  # a resumed run before its first log point: the state it continues
        position = {}
    return {
        "epoch": _count(summary.get("last_epoch", position.get("epoch", last.get("epoch")))),
        "epochs": _count(train.get("epochs")),
        "step": _count(summary.get("steps", position.get("step", last.get("step")))),
        "total_steps": _count(summary.get("steps", position.get("total_steps"))),
        "best_metric": str(metric)[:64],  # the column's width: a hand-edited summary must not stop the indexer
        "best": best,
        "img_per_s": _finite(summary.get("train_img_per_s", position.get("img_per_s") or last.get("train_img_per_s"))),
        "restarts": _count(summary.get("restarts", 0)),
        "mfu": _finite(summary.get("mfu")),
        "data_wait": _finite(summary.get("data_wait_fraction")),
        "device": summary.get("device"),
        "world_size": summary.get("world_size"),
        "wall_time_s": summary.get("wall_time_s"),
        "test": {k: v for k, v in (summary.get("test") or _last_test(lines)).items() if _number(v)},
    }


def _last_test(lines: list[dict]) -> dict:
    """The test metrics of the last test evaluation in metrics.jsonl (before summary.json has them)."""
    test = [line for line in lines if line.get("split") == "test"]
    return {k: v for k, v in test[-1].items() if k.startswith("test_")} if test else {}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite(value) -> float | None:
    """A number as the database and JSON can hold it: a diverged run's NaN or a string in a hand-edited file is None."""
    return value if _number(value) else None


def _count(value) -> int | None:
    """An epoch, step or restart count that fits the database's integer columns, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else None


def val_curves(run: RunDir) -> dict[str, dict[str, list]]:
    """Every val metric per epoch from metrics.jsonl: {metric: {"x": epochs, "step": steps, "y": values}}."""
    curves: dict[str, dict[str, list]] = {}
    for line in run.read_metrics():
        if line.get("split") != "val":
            continue
        for key, value in line.items():
            if key.startswith("val_") and _number(value) and not key.endswith("images"):
                curve = curves.setdefault(key, {"x": [], "step": [], "y": []})
                curve["x"].append(line["epoch"])
                curve["step"].append(line["step"])
                curve["y"].append(value)
    return curves


def with_axes(series: dict[str, dict]) -> dict[str, dict]:
    """Give every curve of {"train", "val", "system"} the three x axes the charts offer, aligned point by point:
    "step", "epoch" (epochs done, fractional within an epoch: the end of epoch 1 is 1.0, where its validation sits)
    and "time" (seconds since the run's first logged point, from TensorBoard's wall times and the system samples).
    Returns a copy (the train curves come from a cache)."""
    series = copy.deepcopy(series)
    val = next(iter(series.get("val", {}).values()), None)
    ends = sorted(zip(val["step"], val["x"], strict=True)) if val else []  # (step, epoch) of each epoch's end
    points = {
        g: sorted(p for c in series.get(g, {}).values() for p in zip(c["x"], c["time"], strict=True) if _number(p[1]))
        for g in ("train", "system")
    }
    timed = points["train"] or points["system"]  # a validation's time is read off the train points (the system ones without)
    start = min((t for group in points.values() for _, t in group), default=None)
    for curve in series.get("val", {}).values():
        curve["epoch"] = [e + 1 for e in curve["x"]]
        curve["time"] = [_interpolate(timed, s) for s in curve["step"]]
    for group in ("train", "system"):
        for curve in series.get(group, {}).values():
            curve["step"] = list(curve["x"])
            curve["epoch"] = [_epoch_at(ends, s) for s in curve["x"]]
    for group in ("train", "val", "system"):
        for curve in series.get(group, {}).values():
            curve["time"] = [round(t - start, 2) if _number(t) and start is not None else None for t in curve["time"]]
    return series


def _epoch_at(ends: list[tuple[int, int]], step: int) -> float | None:
    """Epochs done at `step`, from the steps at which epochs ended (the last epoch's length carries on past them)."""
    if not ends:
        return None
    before_step, before_epoch = 0, 0
    for end_step, epoch in ends:
        if step <= end_step:
            return round(before_epoch + (step - before_step) / max(end_step - before_step, 1), 4)
        before_step, before_epoch = end_step, epoch + 1
    length = ends[-1][0] - (ends[-2][0] if len(ends) > 1 else 0)
    return round(before_epoch + (step - before_step) / max(length, 1), 4)


def _interpolate(points: list[tuple[int, float]], step: int) -> float | None:
    """The time at `step`, read off (step, time) points; None without any."""
    if not points:
        return None
    for (s0, t0), (s1, t1) in itertools.pairwise(points):
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    return points[0][1] if step < points[0][0] else points[-1][1]


def train_curves(run: RunDir) -> dict[str, dict[str, list]]:
    """Train loss and accuracy per logged step from the run's TensorBoard events (cached until the events change)."""
    events = sorted(run.logs.glob("events.out.tfevents.*")) if run.exists() else []
    if not events or not all(run.allows(p) for p in events):  # the reader takes the whole folder: none may lead out
        return {}
    stamp = max(p.stat().st_mtime for p in events) + len(events)
    key = str(run.logs)
    with _curves_lock:
        cached = _curves_cache.get(key)
        if cached and cached[0] == stamp:
            return cached[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 1, "tensors": 1, "histograms": 1, "compressedHistograms": 1, "audio": 1}
    accumulator = EventAccumulator(str(run.logs), size_guidance=guidance)
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    curves = {}
    for tag in TRAIN_TAGS:
        if tag in tags:
            points = {e.step: e for e in accumulator.Scalars(tag)}  # a resumed run rewrote some steps: the last wins
            steps = sorted(points)
            times = [points[s].wall_time for s in steps]
            curves[tag.replace("/", "_")] = {"x": steps, "time": times, "y": [points[s].value for s in steps]}
    with _curves_lock:
        _curves_cache[key] = (stamp, curves)
    return curves


def system_curves(run: RunDir) -> dict[str, dict[str, list]]:
    """The first node's system samples (system.jsonl): {"gpu0/util": {"x": steps, "epoch": [...], "time": [...], "y": values}, ...}.

    A series the run never sampled (a GPU series of a CPU run) is absent, not a line at zero.
    """
    curves: dict[str, dict[str, list]] = {}
    for sample in run.read_system():
        for key, value in sample.items():
            if key in ("time", "step", "epoch", "node") or not _number(value):
                continue
            curve = curves.setdefault(key, {"x": [], "epoch": [], "time": [], "y": []})
            curve["x"].append(sample["step"])
            curve["epoch"].append(sample.get("epoch"))
            curve["time"].append(sample.get("time"))
            curve["y"].append(value)
    return curves


def figures(run: RunDir) -> dict[str, Path | None]:
    """The newest confusion matrix and ROC PNGs: the test ones when the run has them, else the last val epoch's."""
    found = sorted(p for p in run.figures.glob("*.png") if run.allows(p)) if run.figures.is_dir() else []

    def pick(prefix: str) -> Path | None:
        test = [p for p in found if p.name == f"{prefix}_test.png"]
        val = [p for p in found if p.name.startswith(f"{prefix}_val_epoch")]
        return (test or val[-1:] or [None])[0]

    return {"confusion_matrix": pick("confusion_matrix"), "roc": pick("roc_micro")}


def log_tail(run: RunDir, extra: list[Path] = (), lines: int = 80, limit_bytes: int = 64_000) -> tuple[Path | None, str]:
    """The last lines of the newest log: in the run's log folder, or `extra` ones (its sweep task's); a CLI run has none."""
    found = log_files(run, extra)
    return (found[-1], tail(found[-1], lines, limit_bytes)) if found else (None, "")


def log_files(run: RunDir, extra: list[Path] = ()) -> list[Path]:
    """Every log of the run inside the roots, oldest first: its log folder's (an agent keeps each attempt's output there) and `extra` ones."""
    found = [p for p in [*run.logs.glob("*"), *extra] if p.suffix in LOG_SUFFIXES and p.is_file() and run.allows(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def tail(path: Path, lines: int = 80, limit_bytes: int = 64_000) -> str:
    """The last lines of a text file as a terminal would show them ('' when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - limit_bytes))  # only the end of a long log is read
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # a progress bar redraws its line with \r: keep what the terminal would show, the last redraw of each line
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines:]).rstrip()


def best_export(run: RunDir) -> Path | None:
    """Where the best model was exported (the `best` link resolved), if it was."""
    return run.best.resolve() if run.best.exists() and run.allows(run.best) else None


def predictions(run: RunDir) -> tuple[dict | None, dict | None]:
    """(the newest val evaluation's predictions record, the record whose per-class table goes next to the confusion
    matrix: the test one when the run has it, else that val one), as the trainer wrote them to RunDir.predictions."""
    folder = run.predictions
    found = sorted(p for p in folder.glob("val_epoch*.json") if run.allows(p)) if folder.is_dir() else []
    latest = _json(run, found[-1]) if found else None
    test = _json(run, folder / "test.json")
    return latest, test or latest


def _json(run: RunDir, path: Path) -> dict | None:
    try:
        record = json.loads(run.read_text(path))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("classes"), list) else None
