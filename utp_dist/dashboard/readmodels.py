"""What a page or a GET shows, read from the index and the run and sweep folders: run detail, curves, comparisons,
sweep boards, and the names a list shows next to ids. Nothing here changes a row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from utp_dist import states
from utp_dist.config import ConfigError, flatten, from_dict
from utp_dist.dashboard import files, jobqueue, sources, study_view
from utp_dist.dashboard.db import Agent, ConfigRow, Job, Project, Run, Sweep
from utp_dist.dashboard.services import get_run
from utp_dist.errors import UserError
from utp_dist.store import runfiles
from utp_dist.store.run_dir import RunDir


def names(session: Session) -> tuple[dict[int, str], dict[int, str]]:
    """({project id: name}, {sweep id: name}): what a list of runs shows next to their ids."""
    projects = dict(session.execute(select(Project.id, Project.name)).all())
    return projects, dict(session.execute(select(Sweep.id, Sweep.name)).all())


def run_folder(run: Run, roots: tuple[Path, ...]) -> RunDir | None:
    """The run's folder once it has one, read only where it resolves inside the output roots (an agent reports any path)."""
    return RunDir(run.root, run.dataset, run.name, within=roots) if run.root and run.dataset and run.name else None


def run_detail(session: Session, run: Run, roots: tuple[Path, ...]) -> dict:
    """The run row plus what its folder says: resolved config, progress, summary, figures, logs, best export, sweep task, jobs."""
    folder = run_folder(run, roots)
    config, summary, found, paths, task, logs = None, None, {}, {}, None, []
    if folder is not None and folder.exists():
        config = folder.read_config()
        summary = folder.read_summary()
        found = runfiles.progress(folder, config)
        figures = runfiles.figures(folder)
        task = run_task(session, run, folder)
        best = runfiles.best_export(folder)
        logs = [{"name": p.name, "url": files.url_of(roots, p)} for p in runfiles.log_files(folder, task["logs"] if task else [])]
        paths = {
            "logs": str(folder.logs),
            "checkpoints": str(folder.checkpoints),
            "best_export": str(best) if best else None,
            "confusion_matrix_url": files.url_of(roots, figures["confusion_matrix"]),
            "roc_url": files.url_of(roots, figures["roc"]),
        }
    elif run.config_id is not None:
        row = session.get(ConfigRow, run.config_id)
        config = from_dict(row.config, row.name).to_dict() if row is not None else None
    log_path, log_tail = run_log(session, run, folder, task)
    paths.update(log=str(log_path) if log_path else None, log_url=files.url_of(roots, log_path))
    # what an agent last reported stands in until the run folder can be read here
    reported = {"epoch": run.epoch, "step": run.step, "best_metric": run.best_metric, "best": run.best, "img_per_s": run.img_per_s}
    epochs = ((config or {}).get("train") or {}).get("epochs")
    progress = {**reported, "epochs": epochs, "restarts": run.restarts, **{k: v for k, v in found.items() if v is not None}}
    progress["log_tail"] = log_tail
    if task is not None:
        task = {k: v for k, v in task.items() if k != "logs"} | {"sweep_id": run.sweep_id}
    jobs = list(session.scalars(select(Job).where(Job.run_id == run.id).order_by(Job.id)))
    return {
        "run": run,
        "config": config,
        "summary": summary,
        "progress": progress,
        "paths": paths,
        "jobs": jobs,
        "task": task,
        "logs": logs,
    }


def run_page(session: Session, run: Run, roots: tuple[Path, ...]) -> dict:
    """The run page: run_detail, plus the agent that holds it, the config it was queued from, the actions its job allows,
    and its curves (the charts' data travels in the page: one fetch refreshes all of it)."""
    detail = run_detail(session, run, roots)
    job = detail["jobs"][-1] if detail["jobs"] else None
    return {
        **detail,
        "agent": session.get(Agent, run.agent_id) if run.agent_id else None,
        "config_row": session.get(ConfigRow, run.config_id) if run.config_id else None,
        "actions": [action for action, moves in jobqueue.ACTIONS.items() if job is not None and job.state in moves],
        "series": run_series(run, roots),
    }


def run_task(session: Session, run: Run, folder: RunDir) -> dict | None:
    """The sweep task that trained the run (the indexer linked its sweep), with its log files."""
    sweep = session.get(Sweep, run.sweep_id) if run.sweep_id else None
    return sources.task_of_run(folder, [Path(sweep.folder)]) if sweep else None


def run_log(session: Session, run: Run, folder: RunDir | None, task: dict | None = None) -> tuple[Path | None, str]:
    """(the log shown, its tail): a run queued here shows its current attempt as its agent reports it (earlier attempts'
    output is in its log folder), any other run the newest log of its folder or sweep task."""
    if run.source == "queue" and run.log_tail:
        return None, run.log_tail
    if folder is None or not folder.exists():
        return None, run.log_tail or ""
    task = task if task is not None else run_task(session, run, folder)
    return runfiles.log_tail(folder, task["logs"] if task else [])


def run_series(run: Run, roots: tuple[Path, ...]) -> dict:
    """The run's curves for the charts: train loss/accuracy per step, every val metric per epoch, system samples per step."""
    folder = run_folder(run, roots)
    if folder is None or not folder.exists():
        return {"train": {}, "val": {}, "system": {}}
    curves = {"train": runfiles.train_curves(folder), "val": runfiles.val_curves(folder), "system": runfiles.system_curves(folder)}
    return runfiles.with_axes(curves)


# keys in which every queued run differs from any other by construction: showing them would hide the real differences
DIFFERENT_BY_CONSTRUCTION = ("output.run_name", "checkpoint.resume")


def compare(session: Session, run_ids: list[int], roots: tuple[Path, ...]) -> dict:
    """Runs side by side: their curves, and only the config keys whose values differ between them (and are not
    DIFFERENT_BY_CONSTRUCTION: those are listed as "hidden")."""
    runs = [get_run(session, i) for i in run_ids]
    flat = []
    for run in runs:
        folder = run_folder(run, roots)
        raw = folder.read_config() if folder is not None else None
        if raw is None and run.config_id is not None:
            row = session.get(ConfigRow, run.config_id)
            raw = row.config if row is not None else None
        try:
            flat.append(flatten(from_dict(raw or {}, run.name or str(run.id)).to_dict()) if raw is not None else {})
        except ConfigError:
            flat.append(flatten(raw))
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    return {
        "runs": runs,
        "series": [run_series(run, roots) for run in runs],
        "differences": [{"key": k, "values": [f.get(k) for f in flat]} for k in differing if k not in DIFFERENT_BY_CONSTRUCTION],
        "hidden": [k for k in differing if k in DIFFERENT_BY_CONSTRUCTION],
    }


# --- sweeps


def runs_by_logs(session: Session, logs: list[str | None]) -> dict[str, int]:
    """Run ids by log folder (as the sweep status rows name a task's run), for links from the board to run pages."""
    folders = [RunDir.of_logs(Path(path).resolve()) for path in logs if path]
    out = {}
    for folder in folders:
        ident = session.scalar(select(Run.id).where(Run.root == str(folder.root), Run.dataset == folder.dataset, Run.name == folder.name))
        if ident is not None:
            out[str(folder.logs)] = ident
    return out


def sweep_board(sweep: Sweep, roots: tuple[Path, ...], own: Callable[[str], bool]) -> dict:
    """The board of a sweep: task rows as `submit status` has them, the leaderboard, and mean ± std over seeds; for a
    search, its workers and the study view (trials, curves, importances).

    `own`: whether a server URL is this dashboard's; a ledger whose runs are queued elsewhere is not read further.
    """
    folder = Path(sweep.folder)
    board = {"rows": [], "leaderboard_columns": [], "leaderboard": [], "seed_groups": [], "study": None, "error": None}
    try:
        ledger = sources.read_ledger(folder)
        sources.check_servers(folder, ledger, own)
        board["rows"] = [{**row, "kind": states.kind(row["state"])} for row in sources.task_rows(folder, ledger, roots)]
        if study_view.is_search(ledger):  # its tasks are workers; its trials are the study view
            board["study"] = study_view.study_board(folder, ledger, roots)
        else:
            board["leaderboard_columns"], board["leaderboard"] = sources.leaderboard(folder, ledger, roots)
            board["seed_groups"] = sources.seed_groups(ledger, board["leaderboard"])
    except UserError as err:  # e.g. sacct unreachable: show the line, keep the page
        board["error"] = sources.describe_error(err)
    return board


def sweep_page(session: Session, sweep: Sweep, roots: tuple[Path, ...], own: Callable[[str], bool]) -> dict:
    """The sweep page: its board, what "Resubmit failed" would submit (failed tasks, or a search's failed trials and
    ended workers), and the run pages its rows (a search's trials) link to."""
    board = sweep_board(sweep, roots, own)
    trials = (board["study"] or {}).get("trials", [])
    failed = [row for row in board["rows"] if row["state"] in states.RESUBMITTABLE] + [t for t in trials if t["state"] == states.FAILED]
    logs = [row.get("logs") for row in board["rows"]] + [t["logs"] for t in trials]
    return {"sweep": sweep, **board, "failed": failed, "runs": runs_by_logs(session, logs)}
