"""The one module that reads sweeps: ledger, per-task status, leaderboard and `submit resubmit --failed`.

The dashboard reads sweeps through here only, with the package's own sweep code (utp_dist/sweep/).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from utp_dist.config import ConfigError, load_config
from utp_dist.errors import UserError, first_line
from utp_dist.registry import check_references
from utp_dist.store.run_dir import RunDir, is_version_of
from utp_dist.sweep import executors as _executors
from utp_dist.sweep import ledger as _ledger
from utp_dist.sweep import status as _status
from utp_dist.sweep import submit as _submit
from utp_dist.sweep.task import TaskRecord

LEDGER = _ledger.LEDGER


def read_ledger(folder: Path) -> dict:
    """The sweep's ledger (UserError with one line when it is missing or broken)."""
    return _ledger.read(folder)


def check_servers(folder: Path, ledger: dict, own: Callable[[str], bool]) -> None:
    """Refuse a ledger whose runs are queued on another dashboard: the dashboard would send its own token there.

    A ledger is a file in an output root, which other users may write: the servers its job handles name are data, so
    this process contacts only itself (`own`: whether a URL is this dashboard), never a URL a file chose.
    """
    if ledger.get("executor") != "dashboard":
        return
    for task in ledger.get("tasks", []):
        for handle in task.get("jobs", []):
            server = str(handle).rpartition(_executors.RUN_PAGE)[0]
            if not own(server):
                raise UserError(
                    f"{folder.name}: its runs were queued on {server or 'an unnamed server'}, not on this dashboard; it is not "
                    "contacted from here (it would be sent this dashboard's token): see them there, or run "
                    f"python -m utp_dist.submit status {folder}"
                )


def check_sweep(folder: Path, own: Callable[[str], bool], allow_import: tuple[str, ...]) -> None:
    """What the dashboard checks before it launches a sweep's tasks again: its servers, and the code its configs name."""
    ledger = read_ledger(folder)
    check_servers(folder, ledger, own)
    if "search" in ledger:  # its workers train the trials' configs, and new trials drawn from its search block
        _check_search(folder, ledger, allow_import)
        return
    for task in ledger["tasks"]:
        try:
            check_references(load_config(task["config"]), allow_import)
        except (ConfigError, OSError, KeyError, TypeError) as err:
            raise UserError(f"{folder.name}: task {task.get('index', '?')}: {first_line(err)}") from None


def _check_search(folder: Path, ledger: dict, allow_import: tuple[str, ...]) -> None:
    from utp_dist.sweep.search import parse_search
    from utp_dist.sweep.study import CONFIGS

    try:
        if not isinstance(ledger.get("search"), dict):
            raise ConfigError("search must be a mapping")
        search = parse_search(Path(str(ledger.get("search_file", folder / "search.yaml"))), ledger["search"])
        check_references(search.config({p.key: p.extremes()[0] for p in search.space}, "probe"), allow_import)
    except (ConfigError, OSError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{folder.name}: its search: {first_line(err)}") from None
    for path in sorted((folder / CONFIGS).glob("trial-*.yaml")):
        try:
            check_references(load_config(path), allow_import)
        except (ConfigError, OSError, KeyError, TypeError) as err:
            raise UserError(f"{folder.name}: {path.stem}: {first_line(err)}") from None


def task_rows(folder: Path, ledger: dict, roots: tuple[Path, ...]) -> list[dict]:
    """One row per task, exactly what `submit status` prints (Slurm accounting or the local runner's records); runs are
    read only inside the output roots."""
    return _status.rows(folder, ledger, roots)


def leaderboard(folder: Path, ledger: dict, roots: tuple[Path, ...]) -> tuple[list[str], list[dict]]:
    """(columns, rows) of the package's leaderboard, ranked by the monitored metric (runs inside the output roots)."""
    return _status.leaderboard_rows(folder, ledger, roots)


def seed_groups(ledger: dict, board: list[dict]) -> list[dict]:
    """Mean ± std of the monitored metric over seeds, per combination of the other swept keys ([] when train.seed is not
    swept): the leaderboard's own groups, with the monitored metric's numbers on top."""
    grouping = _status.seed_grouping(ledger)
    if grouping is None:
        return []
    metric = grouping[1][0]
    return [{"keys": g["keys"], "metric": metric, **g[metric], "seeds": g[metric]["n"]} for g in _status.seed_groups(board, *grouping)]


def resubmit_failed(folder: Path, own: Callable[[str], bool], allow_import: tuple[str, ...]) -> tuple[int, str]:
    """`submit resubmit FOLDER --failed` by the sweep code itself: (0, the line it ends with) or (2, why it was refused).

    The sweep folder lies in an output root that others may write, so it is checked as a stored config is first: its
    runs must be queued here (`own`), and every task config may name only registered code (the dashboard's --allow-import).
    """
    try:
        check_sweep(folder, own, allow_import)
        return 0, _submit.resubmit_failed(folder)
    except UserError as err:
        return 2, first_line(err)


def task_of_run(run: RunDir, sweep_folders: list[Path]) -> dict | None:
    """The sweep task that trained this run (same output root, name and config fingerprint): job, host, pid, its log files."""
    config_hash = None
    for folder in sweep_folders:
        try:
            ledger = read_ledger(folder)
        except UserError:
            continue
        for task in ledger["tasks"]:
            if not is_version_of(task["name"], run.name) or Path(task["output_root"]).resolve() != run.root.resolve():
                continue
            config_hash = config_hash or run.config_hash()
            if task["config_hash"] != config_hash:
                continue
            index, job = task["index"], (task["jobs"][-1] if task["jobs"] else None)
            record = TaskRecord(folder, index).read()
            logs = [folder / _executors.LOCAL_LOGS / f"task-{index}.log"]
            if job and not job.startswith("pid:"):  # submitit names a Slurm task's logs JOBID_RANK_log.out/.err
                logs += [folder / _executors.SUBMITIT_DIR / f"{job}_0_log.{ext}" for ext in ("out", "err")]
            return {
                "sweep": str(folder),
                "task": index,
                "job": job,
                "host": record.get("host"),
                "pid": record.get("pid"),
                "attempts": record.get("attempts"),
                "logs": [p for p in logs if p.is_file()],
            }
    return None


def describe_error(err: UserError) -> str:
    """The one line a page shows for a sweep it cannot read."""
    return first_line(err)
