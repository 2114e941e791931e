"""The sweep ledger: OUTPUT_ROOT/sweeps/NAME/sweep.json records the grid, its tasks and every submission of them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from utp_dist.errors import UserError
from utp_dist.store import atomic
from utp_dist.store.run_dir import MAX_VERSIONS, RunDir, find_runs, versions
from utp_dist.sweep.grid import Grid

LEDGER = "sweep.json"
CONFIGS = "configs"
SWEEPS = "sweeps"


def sweeps_dir(output_root: str | os.PathLike) -> Path:
    """OUTPUT_ROOT/sweeps: one folder per sweep, next to the runs' logs/ and checkpoints/."""
    return Path(output_root) / SWEEPS


def create_sweep(grid: Grid, executor: str, profile: str | None, resources: dict) -> Path:
    """Claim OUTPUT_ROOT/sweeps/NAME (or NAME-v1, ...) atomically, write each task's resolved config and the ledger."""
    folder = _claim(grid.tasks[0].config.output.root, grid.name, grid.path)
    tasks = []
    for task in grid.tasks:
        config = folder / CONFIGS / f"{task.index:03d}_{task.name}.yaml"
        config.write_text(task.config.to_yaml(), encoding="utf-8")
        tasks.append(
            {
                "index": task.index,
                "name": task.name,
                "config": str(config),
                "config_hash": task.config.fingerprint(),
                "swept": task.swept,
                "output_root": task.config.output.root,
                "monitor": [task.config.train.monitor_metric, task.config.train.monitor_mode],
                "jobs": [],
            }
        )
    write(
        folder,
        {
            "name": folder.name,
            "grid_file": str(grid.path.resolve()),
            "grid": grid.raw,
            "executor": executor,
            "profile": profile,
            "resources": resources,
            "created": time.time(),
            "tasks": tasks,
            "submissions": [],
        },
    )
    return folder


def create_search(search, output_root: str, executor: str, profile: str | None, resources: dict) -> Path:
    """Claim OUTPUT_ROOT/sweeps/NAME (or NAME-vN) for a search; its tasks are the workers, its trials come later."""
    from utp_dist.sweep.search import stored

    folder = _claim(output_root, search.name, search.path)
    workers = [{"index": i, "name": f"worker-{i}", "jobs": []} for i in range(search.parallel)]
    write(
        folder,
        {
            "name": folder.name,
            "search_file": str(search.path.resolve()),
            "search": stored(search),
            "executor": executor,
            "profile": profile,
            "resources": resources,
            "created": time.time(),
            "tasks": workers,
            "submissions": [],
        },
    )
    return folder


def _claim(output_root: str, name: str, path: Path) -> Path:
    """Create OUTPUT_ROOT/sweeps/NAME (or NAME-v1, ...) atomically, with its configs/ folder."""
    root = sweeps_dir(output_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output.root: cannot create '{root}': {err.strerror}") from None
    for candidate in versions(name):
        folder = root / candidate
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise UserError(f"{path}: {MAX_VERSIONS:,} sweeps named '{name}' exist in '{root}'; set another name: in the file")
    (folder / CONFIGS).mkdir()
    return folder


def read(folder: str | os.PathLike) -> dict:
    """The ledger of SWEEP_DIR; a one-line error when the folder is not a sweep."""
    path = Path(folder) / LEDGER
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file was given instead of a folder
        raise UserError(
            f"{folder}: no {LEDGER} here; give a sweep folder made by `python -m utp_dist.submit GRID.yaml` (OUTPUT_ROOT/sweeps/NAME)"
        ) from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the ledger: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not a valid ledger ({err.msg} at line {err.lineno})") from None


def write(folder: Path, ledger: dict) -> None:
    """Replace the ledger atomically, so a crash never leaves half a file."""
    atomic.write_text(folder / LEDGER, json.dumps(ledger, indent=2, default=str))


def record_submission(folder: Path, ledger: dict, executor: str, job_ids: dict[int, str]) -> None:
    """Append one submission (which tasks, which job handles) and point each task at its newest job."""
    ledger["submissions"].append({"time": time.time(), "executor": executor, "tasks": {str(i): job for i, job in job_ids.items()}})
    for index, job in job_ids.items():
        ledger["tasks"][index]["jobs"].append(job)
    write(folder, ledger)


def find_run(output_root: str, name: str, config_hash: str, within: tuple[Path, ...] = ()) -> RunDir | None:
    """The newest run NAME (or NAME-vN) trained from this exact config, if any (inside `within`, when given: find_runs)."""
    found = [run for run in find_runs(output_root, name, within=within) if run.config_hash() == config_hash]
    return max(found, key=lambda run: run.logs.stat().st_mtime) if found else None


def completed_run(output_root: str, name: str, config_hash: str) -> RunDir | None:
    """A finished run of this exact resolved config (summary.json with the same config_hash), if any."""
    return next((run for run in find_runs(output_root, name) if (run.read_summary() or {}).get("config_hash") == config_hash), None)


def unreadable_summaries(output_root: str, name: str, config_hash: str) -> list[Path]:
    """summary.json files of runs trained from this exact config that cannot be read (so they do not count as completed)."""
    return [
        run.summary_file
        for run in find_runs(output_root, name)
        if run.summary_file.exists() and run.read_summary() is None and run.config_hash() == config_hash
    ]
