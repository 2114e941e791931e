"""The output tree: run naming, race-free creation, and RunDir, the one owner of every path inside a run folder.

A run named NAME on data set DATASET lives in two folders under OUTPUT_ROOT, so that `tensorboard --logdir
OUTPUT_ROOT/logs` sees every run and checkpoints can sit on another quota:

    logs/DATASET/NAME/          config.yaml, progress.json, metrics.jsonl, system.jsonl, summary.json, figures/, evaluations/,
                                predictions/, TensorBoard events
    checkpoints/DATASET/NAME/   best -> best-stepNNNNNNNN/ (save_pretrained export), state/step-NNNNNNNN/, FINISHED
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

from utp_dist.config import Config, from_dict
from utp_dist.errors import UserError

LOGS, CHECKPOINTS = "logs", "checkpoints"
CONFIG, METRICS, SUMMARY, FIGURES, EVALUATIONS = "config.yaml", "metrics.jsonl", "summary.json", "figures", "evaluations"
PREDICTIONS = "predictions"
PROGRESS, SYSTEM = "progress.json", "system"
BEST, STATE_DIR, COMPLETE, FINISHED, LOCK = "best", "state", "COMPLETE", "FINISHED", "LOCK"
MAX_VERSIONS = 10_000


class RunDir:
    """One run's folders under an output root, and the tolerant readers of what the run wrote there.

    Paths: `logs` and `checkpoints` (the two folders), `config_file`, `metrics_file`, `summary_file`, `figures` and
    `evaluations` (reports of `python -m utp_dist.evaluate`), `predictions`, `system_file()` and `progress_file` in logs; `best` (the export), `state_dir` (training
    states), `finished_marker` and `lock_file` in checkpoints.
    """

    def __init__(self, root: str | os.PathLike, dataset: str, name: str, within: tuple[Path, ...] = ()):
        self.root, self.dataset, self.name = Path(root), dataset, name
        # the folders its files must resolve into to be read (the dashboard's output roots); empty: anywhere (the CLI's
        # own runs). A symlink planted in a served root (logs/x -> /etc) then shows nothing from outside it.
        self.within = within
        self.logs, self.checkpoints = self.root / LOGS / dataset / name, self.root / CHECKPOINTS / dataset / name
        self.config_file, self.metrics_file, self.summary_file, self.figures = (self.logs / f for f in (CONFIG, METRICS, SUMMARY, FIGURES))
        self.evaluations, self.progress_file = self.logs / EVALUATIONS, self.logs / PROGRESS
        self.predictions = self.logs / PREDICTIONS  # per-evaluation sample predictions and per-class tables, thumbnails
        self.best, self.state_dir, self.finished_marker, self.lock_file = (self.checkpoints / f for f in (BEST, STATE_DIR, FINISHED, LOCK))

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r}, {self.dataset!r}, {self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and (self.root, self.dataset, self.name) == (other.root, other.dataset, other.name)

    def __hash__(self) -> int:
        return hash((self.root, self.dataset, self.name))

    def allows(self, path: Path) -> bool:
        """Whether `path` may be read: always, unless the run is confined `within` folders and `path` resolves out of them."""
        return not self.within or inside(path, self.within) is not None

    def read_text(self, path: Path) -> str:
        """The text of one of the run's files; OSError when it cannot be read or leads out of `within`."""
        if not self.allows(path):
            raise PermissionError(f"{path.name}: leads outside the output roots")
        return path.read_text(encoding="utf-8")

    def is_finished(self) -> bool:
        """Whether the run trained to its end."""
        return self.finished_marker.exists() and self.allows(self.finished_marker)

    def states(self) -> list[Path]:
        """Complete training states, oldest first."""
        return [state for state in complete_states(self.state_dir) if self.allows(state)]

    def read_config(self) -> dict | None:
        """The raw config mapping the run saved, None if missing or unreadable."""
        try:
            raw = yaml.safe_load(self.read_text(self.config_file))
        except (OSError, yaml.YAMLError):
            return None
        return raw if isinstance(raw, dict) else None

    def config_hash(self) -> str | None:
        """The fingerprint of the run's config, None if it cannot be read."""
        raw = self.read_config()
        try:
            return from_dict(raw, str(self.config_file)).fingerprint() if raw is not None else None
        except UserError:
            return None

    def read_summary(self) -> dict | None:
        """summary.json, None while the run has not finished or when it is unreadable."""
        try:
            summary = json.loads(self.read_text(self.summary_file))
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def read_progress(self) -> dict:
        """progress.json: where training stood at its latest log point ({} before the first one, or when unreadable)."""
        try:
            position = json.loads(self.read_text(self.progress_file))
        except (OSError, ValueError):
            return {}
        return position if isinstance(position, dict) and isinstance(position.get("step"), int) else {}

    def read_metrics(self) -> list[dict]:
        """Every well-formed line of metrics.jsonl (one a kill -9 cut short, or any malformed line, is left out)."""
        return [record for _, record in self.metrics_lines()]

    def metrics_lines(self) -> list[tuple[str, dict]]:
        """(raw line, record) of every well-formed metrics.jsonl line: an evaluation with its split, epoch and step."""
        return [(line, record) for line, record in self._jsonl(self.metrics_file) if isinstance(record.get("split"), str)]

    def system_file(self, node: int = 0) -> Path:
        """The system metrics (GPU, CPU, RAM samples) of one node: system.jsonl for the first, system-nodeN.jsonl for others."""
        return self.logs / (f"{SYSTEM}.jsonl" if node == 0 else f"{SYSTEM}-node{node}.jsonl")

    def read_system(self, node: int = 0) -> list[dict]:
        """Every well-formed sample of a node's system file, oldest first."""
        return [record for _, record in self._jsonl(self.system_file(node))]

    def _jsonl(self, path: Path) -> list[tuple[str, dict]]:
        """(raw line, record) of every line of a JSON-lines file that is an object with an integer step."""
        try:
            text = self.read_text(path)
        except OSError:
            return []
        lines = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill -9 in the middle of writing it
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                lines.append((line, record))
        return lines

    def exists(self) -> bool:
        """Whether the run's log folder exists (and, for a confined run, lies inside `within`)."""
        return self.logs.is_dir() and self.allows(self.logs)

    def describe(self) -> dict:
        """The run's paths, as summary.json records them."""
        return {"logs": str(self.logs), "checkpoints": str(self.checkpoints), "best_model": str(self.best)}

    @classmethod
    def of_state(cls, state: Path) -> RunDir:
        """The run a training state belongs to, located from where the state is (so a moved or copied run stays itself)."""
        run = state.resolve().parent.parent  # OUTPUT_ROOT/checkpoints/DATASET/NAME/state/step-N
        return cls(run.parent.parent.parent, run.parent.name, run.name)

    @classmethod
    def of_checkpoints(cls, folder: Path) -> RunDir | None:
        """The run whose checkpoint folder is `folder` (OUTPUT_ROOT/checkpoints/DATASET/NAME), None when `folder` is not
        inside a checkpoints/ tree."""
        folder = folder.resolve()
        return cls(folder.parent.parent.parent, folder.parent.name, folder.name) if folder.parent.parent.name == CHECKPOINTS else None

    @classmethod
    def of_logs(cls, logs: Path) -> RunDir:
        """The run whose log folder is `logs` (OUTPUT_ROOT/logs/DATASET/NAME)."""
        return cls(logs.parent.parent.parent, logs.parent.name, logs.name)

    @classmethod
    def create(cls, root: str | os.PathLike, dataset: str, name: str) -> RunDir:
        """Claim NAME (or NAME-v1, -v2, ...) with atomic mkdirs, so concurrent starts never share a run folder."""
        first = cls(root, dataset, name)
        try:
            first.logs.parent.mkdir(parents=True, exist_ok=True)
            first.checkpoints.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"output.root: cannot create '{first.logs.parent}': {err.strerror}") from None
        for candidate in versions(name):
            run = cls(root, dataset, candidate)
            try:
                run.logs.mkdir()
            except FileExistsError:
                continue
            try:
                run.checkpoints.mkdir()
            except FileExistsError:  # checkpoints without logs: leave them alone and take the next name
                run.logs.rmdir()
                continue
            return run
        raise UserError(
            f"output.run_name: {MAX_VERSIONS:,} runs named '{name}' already exist in '{first.logs.parent}'; choose another name"
        )

    def discard_if_unused(self) -> None:
        """Remove a run that failed before its first evaluation, state or export, so its name is free again (no -v1)."""
        if self.metrics_file.exists() or self.states() or self.best.exists():
            return  # it holds results: never delete what a run wrote
        shutil.rmtree(self.logs, ignore_errors=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)


def find_runs(
    root: str | os.PathLike, name: str | None = None, dataset: str | None = None, within: tuple[Path, ...] = ()
) -> Iterator[RunDir]:
    """Runs under an output root (every data set, or one), all of them or those named NAME / NAME-vN.

    `within`: the folders they must resolve into; a data set or run folder that is a symlink out of them is left out,
    and the runs found are confined to them (RunDir.within).
    """
    logs = Path(root) / LOGS
    if within and inside(logs, within) is None:
        return
    datasets = [logs / dataset] if dataset else (sorted(p for p in logs.iterdir() if p.is_dir()) if logs.is_dir() else [])
    for folder in datasets:
        if not folder.is_dir() or not _stays(folder, within):
            continue
        for run in sorted(folder.iterdir()):
            if run.is_dir() and (name is None or is_version_of(name, run.name)) and _stays(run, within):
                yield RunDir(root, folder.name, run.name, within)


def inside(path: str | os.PathLike, roots: tuple[Path, ...]) -> Path | None:
    """`path` with every symlink and '..' resolved, when that lies inside one of `roots`; None when it leads out.

    The one containment check of everything the dashboard reads or serves from the output roots.
    """
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL character, a name too long
        return None
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    return None


def _stays(entry: Path, within: tuple[Path, ...]) -> bool:
    """Whether a folder entry, whose parent was checked already, stays within `within` (only a symlink can lead out)."""
    return not within or not entry.is_symlink() or inside(entry, within) is not None


def complete_states(folder: Path) -> list[Path]:
    """Complete states in a state folder, oldest first (by the step in their name, which the checkpointer wrote)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / COMPLETE).is_file())


def base_name(cfg: Config) -> str:
    """The run name before versioning: model_flavour__loss__pretrained-or-scratch[__suffix], file-system safe."""
    if cfg.output.run_name:
        return sanitize(cfg.output.run_name, "output.run_name")
    flavour = cfg.model.flavour.rstrip("/\\")
    if os.path.isdir(flavour):  # a local folder is named by its last component, not its whole path
        flavour = Path(flavour).name
    parts = [flavour.replace("/", "_"), cfg.train.loss, "pretrained" if cfg.model.pretrained else "scratch"]
    if cfg.output.suffix:
        parts.append(cfg.output.suffix)
    return sanitize("__".join(parts), "output.suffix")


def sanitize(name: str, key: str) -> str:
    """Keep letters, digits, '.', '_', '-' and '=' ; never a path or a hidden name."""
    clean = re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip(".-")
    if not clean:
        raise UserError(f"{key}: '{name}' leaves no usable run name; use letters, digits, '.', '_' or '-'")
    return clean[:200]


def versions(name: str):
    """NAME, NAME-v1, NAME-v2, ...: the names a new run (or sweep) tries in turn."""
    yield name
    yield from (f"{name}-v{version}" for version in range(1, MAX_VERSIONS))


def is_version_of(name: str, candidate: str) -> bool:
    """Whether `candidate` is NAME or NAME-vN (and not NAME-other)."""
    return re.fullmatch(rf"{re.escape(name)}(-v\d+)?", candidate) is not None
