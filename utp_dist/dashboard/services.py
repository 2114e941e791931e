"""What the API and the pages both do: projects, configs, queueing, state changes, agents, runs and sweeps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from utp_dist.config import Config, ConfigError, flatten, from_dict, parse_yaml
from utp_dist.dashboard import files, sources, states
from utp_dist.dashboard.db import Agent, ConfigRow, Gpu, Job, Project, Run, Sweep, now
from utp_dist.errors import UserError, one_line
from utp_dist.registry import check_references
from utp_dist.store import runfiles
from utp_dist.store.run_dir import RunDir


class NotFound(Exception):
    """An unknown id (HTTP 404)."""


class Conflict(Exception):
    """A state change the current state does not allow, or a name taken (HTTP 409); `state` is the current state."""

    def __init__(self, message: str, state: str | None = None):
        super().__init__(message)
        self.state = state


class Invalid(Exception):
    """A payload that cannot be used as written (HTTP 422), with the one line the CLI would print."""


def page(session: Session, query, limit: int, offset: int) -> tuple[list, int]:
    """One page of a select() and the total count of its rows."""
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    return list(session.scalars(query.limit(limit).offset(offset))), total


def found(session: Session, model, ident: int, what: str):
    """The row with this id, or NotFound naming what was looked for."""
    row = session.get(model, ident)
    if row is None:
        raise NotFound(f"no {what} with id {ident}")
    return row


def add(session: Session, row, taken: str):
    """Insert a row; 409 naming what is taken when a unique name or index is already used."""
    session.add(row)
    commit(session, taken)
    return row


def patch(session: Session, model, ident: int, what: str, taken: str = "", **changes):
    """Set the fields given (None = leave as is) on the row with this id."""
    row = found(session, model, ident, what)
    for key, value in changes.items():
        if value is not None:
            setattr(row, key, value)
    commit(session, taken or f"that {what} already exists")
    return row


def remove(session: Session, model, ident: int, what: str) -> None:
    """Delete the row with this id (404 when there is none)."""
    session.delete(found(session, model, ident, what))
    session.commit()


def commit(session: Session, taken: str) -> None:
    """Commit; a unique constraint broken by a concurrent or repeated create is a 409 naming what is taken."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(taken) from None


# --- projects


def list_projects(session: Session, limit: int = 100, offset: int = 0, archived: bool = False) -> tuple[list[Project], int]:
    """Projects, oldest first (the archived ones only when asked)."""
    return page(session, select(Project).where(Project.archived.is_(archived)).order_by(Project.id), limit, offset)


def create_project(session: Session, name: str, description: str = "") -> Project:
    """A new project (409 when the name is taken)."""
    return add(session, Project(name=name.strip(), description=description), f"a project named '{name}' already exists")


def update_project(session: Session, project_id: int, name: str | None, description: str | None) -> Project:
    """Rename a project or change its description."""
    name = name.strip() if name is not None else None
    return patch(session, Project, project_id, "project", f"a project named '{name}' already exists", name=name, description=description)


def delete_project(session: Session, project_id: int) -> None:
    """Delete a project and its configs; its runs stay, without a project."""
    remove(session, Project, project_id, "project")


# --- configs


def validate_config(name: str, config: dict | None, text: str | None, allow_import: tuple[str, ...] = ()) -> tuple[dict, Config]:
    """The raw sections and the validated Config from a mapping or config-file text, by the CLI's own code and messages.

    Unlike the CLI's, it may name only registered names and import paths under `allow_import` (the operator's
    --allow-import): a stored config is run by agents, so it must not name arbitrary code.
    """
    if (config is None) == (text is None):
        raise Invalid("give the config either as 'config' (its sections as a mapping) or as 'yaml' (the text of a config file)")
    try:
        raw = parse_yaml(text, name) if text is not None else config
        cfg = from_dict(raw, name)
        check_references(cfg, allow_import)
        return raw, cfg
    except ConfigError as err:
        raise Invalid(one_line(err)) from None


def create_config(
    session: Session, project_id: int, name: str, config: dict | None = None, text: str | None = None, allow_import: tuple[str, ...] = ()
) -> ConfigRow:
    """Validate, then store a config with the fingerprint of its resolved form (409 when the project has one of that name)."""
    found(session, Project, project_id, "project")
    if session.scalar(select(ConfigRow.id).where(ConfigRow.project_id == project_id, ConfigRow.name == name)) is not None:
        raise Conflict(f"project {project_id} already has a config named '{name}': choose another name")
    raw, cfg = validate_config(name, config, text, allow_import)
    row = ConfigRow(project_id=project_id, name=name, config=raw, config_hash=cfg.fingerprint())
    session.add(row)
    session.commit()
    return row


def list_configs(
    session: Session, project_id: int, limit: int = 100, offset: int = 0, name: str | None = None, archived: bool = False
) -> tuple[list[ConfigRow], int]:
    """A project's configs, oldest first (only the one called `name`, when given; the archived ones only when asked)."""
    found(session, Project, project_id, "project")
    query = select(ConfigRow).where(ConfigRow.project_id == project_id, ConfigRow.archived.is_(archived)).order_by(ConfigRow.id)
    return page(session, query.where(ConfigRow.name == name) if name is not None else query, limit, offset)


def delete_config(session: Session, config_id: int) -> None:
    """Delete a config; runs queued from it stay."""
    remove(session, ConfigRow, config_id, "config")


# --- runs and their queue entries


def queue_run(session: Session, config_id: int, gpus: int = 0, priority: int = 0, max_attempts: int = 3) -> tuple[Run, Job]:
    """A run of this config and its queue entry, both queued (an agent claims it: issue 12)."""
    config = found(session, ConfigRow, config_id, "config")
    run = Run(project_id=config.project_id, config_id=config.id, source="queue", state=states.QUEUED, config_hash=config.config_hash)
    job = Job(run=run, state=states.QUEUED, gpus=gpus, priority=priority, max_attempts=max_attempts)
    session.add_all([run, job])
    session.commit()
    return run, job


def list_runs(
    session: Session,
    project_id: int | None = None,
    state: str | None = None,
    text: str | None = None,
    limit: int = 100,
    offset: int = 0,
    sweep_id: int | None = None,
) -> tuple[list[Run], int]:
    """Runs, newest first, from the database index only (no run folder is read here)."""
    query = select(Run).order_by(Run.created.desc(), Run.id.desc())
    if project_id is not None:
        query = query.where(Run.project_id == project_id)
    if sweep_id is not None:
        query = query.where(Run.sweep_id == sweep_id)
    if state:
        query = query.where(Run.state == state)
    if text:
        query = query.where(Run.name.contains(text) | Run.dataset.contains(text))
    return page(session, query, limit, offset)


def get_run(session: Session, run_id: int) -> Run:
    """The run with this id (404 otherwise)."""
    return found(session, Run, run_id, "run")


def run_folder(run: Run, roots: tuple[Path, ...]) -> RunDir | None:
    """The run's folder once it has one, read only where it resolves inside the output roots (an agent reports any path)."""
    return RunDir(run.root, run.dataset, run.name, within=roots) if run.root and run.dataset and run.name else None


def latest_job(session: Session, run: Run) -> Job | None:
    """The run's newest queue entry, None for a run found on disk."""
    return session.scalar(select(Job).where(Job.run_id == run.id).order_by(Job.id.desc()).limit(1))


def swap(session: Session, job: Job, new: str, run: dict | None = None, **values) -> bool:
    """Move a job from the (state, attempt) it was read with to `new`, and its run with it, as one compare-and-swap.

    False (nothing written) when another actor changed the job first; the one place every state change goes through,
    for users here and for agents (issue 12), whose attempt number is their fencing token. `run`: more run columns to set.
    """
    if not states.allowed(job.state, new):
        return False
    changed = {"state": new, "updated": now(), **values}
    swapped = session.execute(update(Job).where(Job.id == job.id, Job.state == job.state, Job.attempt == job.attempt).values(**changed))
    if not swapped.rowcount:
        session.rollback()
        return False
    session.execute(update(Run).where(Run.id == job.run_id).values(state=new, updated=now(), **(run or {})))
    session.commit()
    session.refresh(job)
    return True


def change_state(session: Session, run_id: int, action: str) -> Job:
    """Cancel or resume a run's job (409 with the current state when that state does not allow it, or another actor won)."""
    run = get_run(session, run_id)
    job = latest_job(session, run)
    if job is None:
        raise Conflict(f"run {run_id} was not queued here (found on disk as {run.state}): there is no job to {action}", run.state)
    target = states.ACTIONS[action].get(job.state)
    if target is None:
        raise Conflict(f"cannot {action} run {run_id}: its job is {job.state}", job.state)
    requeue = {"agent_id": None, "lease_expires": None, "reason": None} if target == states.QUEUED else {}
    if not swap(session, job, target, **requeue):
        current = session.scalar(select(Job.state).where(Job.id == job.id))
        raise Conflict(f"cannot {action} run {run_id}: its job changed to {current} meanwhile", current)
    return job


def delete_run(session: Session, run_id: int) -> None:
    """Forget a run that is not active (its folder on disk stays; the indexer finds it again)."""
    run = get_run(session, run_id)
    job = latest_job(session, run)
    if job is not None and job.state in states.ACTIVE:
        raise Conflict(f"run {run_id} is {job.state}: cancel it first", job.state)
    session.delete(run)
    session.commit()


# --- agents and GPUs


def list_agents(session: Session, limit: int = 100, offset: int = 0) -> tuple[list[Agent], int]:
    """Agents with their GPUs, oldest first."""
    return page(session, select(Agent).options(selectinload(Agent.gpus)).order_by(Agent.id), limit, offset)


def create_agent(session: Session, name: str, host: str = "") -> Agent:
    """Register an agent (409 when the name is taken)."""
    return add(session, Agent(name=name, host=host), f"an agent named '{name}' already exists")


def update_agent(session: Session, agent_id: int, host: str | None, drain: bool | None) -> Agent:
    """Change an agent's host, or drain it (it finishes what it runs and claims nothing new)."""
    return patch(session, Agent, agent_id, "agent", host=host, drain=drain)


def delete_agent(session: Session, agent_id: int) -> None:
    """Forget an agent and its GPUs."""
    remove(session, Agent, agent_id, "agent")


def add_gpu(session: Session, agent_id: int, index: int, name: str, memory_mb: int) -> Gpu:
    """Add a GPU to an agent's inventory (409 when that index is listed already)."""
    found(session, Agent, agent_id, "agent")
    return add(session, Gpu(agent_id=agent_id, index=index, name=name, memory_mb=memory_mb), f"agent {agent_id} already has a GPU {index}")


# --- sweeps


def list_sweeps(session: Session, limit: int = 100, offset: int = 0) -> tuple[list[Sweep], int]:
    """Sweeps, newest first."""
    return page(session, select(Sweep).order_by(Sweep.created.desc(), Sweep.id.desc()), limit, offset)


def get_sweep(session: Session, sweep_id: int) -> Sweep:
    """The sweep with this id (404 otherwise)."""
    return found(session, Sweep, sweep_id, "sweep")


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
    """The board of a sweep: task rows as `submit status` has them, the leaderboard, and mean ± std over seeds.

    `own`: whether a server URL is this dashboard's; a ledger whose runs are queued elsewhere is not read further.
    """
    folder = Path(sweep.folder)
    board = {"rows": [], "leaderboard_columns": [], "leaderboard": [], "seed_groups": [], "error": None}
    try:
        ledger = sources.read_ledger(folder)
        sources.check_servers(folder, ledger, own)
        board["rows"] = [{**row, "kind": sources.kind(row["state"])} for row in sources.task_rows(folder, ledger, roots)]
        board["leaderboard_columns"], board["leaderboard"] = sources.leaderboard(folder, ledger, roots)
        board["seed_groups"] = sources.seed_groups(ledger, board["leaderboard"])
    except UserError as err:  # e.g. sacct unreachable: show the line, keep the page
        board["error"] = sources.describe_error(err)
    return board


# --- what a run page and GET /api/v1/runs/{id} show


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
    """The run's curves for the charts: train loss/accuracy per step, every val metric per epoch."""
    folder = run_folder(run, roots)
    if folder is None or not folder.exists():
        return {"train": {}, "val": {}}
    return {"train": runfiles.train_curves(folder), "val": runfiles.val_curves(folder)}


def compare(session: Session, run_ids: list[int], roots: tuple[Path, ...]) -> dict:
    """Runs side by side: their curves, and only the config keys whose values differ between them."""
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
        "differences": [{"key": k, "values": [f.get(k) for f in flat]} for k in differing],
    }
