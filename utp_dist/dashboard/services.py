"""The rows the API and the pages both change: generic helpers, then projects, configs, runs, agents and GPUs, sweeps.

A job's state changes are the queue's (jobqueue.py); what a page or GET shows is read in readmodels.py."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from utp_dist import states
from utp_dist.config import Config, ConfigError, from_dict, parse_yaml
from utp_dist.dashboard.db import Agent, ConfigRow, Gpu, Job, Project, Run, Sweep
from utp_dist.errors import one_line
from utp_dist.registry import check_references


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


def latest_job(session: Session, run: Run) -> Job | None:
    """The run's newest queue entry, None for a run found on disk."""
    return session.scalar(select(Job).where(Job.run_id == run.id).order_by(Job.id.desc()).limit(1))


def delete_run(session: Session, run_id: int) -> None:
    """Forget a run that is not active (its folder on disk stays; the indexer finds it again)."""
    run = get_run(session, run_id)
    job = latest_job(session, run)
    if job is not None and job.state in states.ACTIVE:
        raise Conflict(f"run {run_id} is {job.state}: cancel it first", job.state)
    session.delete(run)
    session.commit()


# --- agents and GPUs


def list_agents(session: Session, limit: int = 100, offset: int = 0, archived: bool = False) -> tuple[list[Agent], int]:
    """Agents with their GPUs, oldest first (the archived ones only when asked)."""
    query = select(Agent).where(Agent.archived.is_(archived)).options(selectinload(Agent.gpus)).order_by(Agent.id)
    return page(session, query, limit, offset)


def create_agent(session: Session, name: str, host: str = "") -> Agent:
    """Register an agent (409 when the name is taken)."""
    return add(session, Agent(name=name, host=host), f"an agent named '{name}' already exists")


def update_agent(session: Session, agent_id: int, host: str | None, drain: bool | None, archived: bool | None = None) -> Agent:
    """Change an agent's host, drain it (it finishes what it runs and claims nothing new), or archive it (as drained, and
    off the agents page's default list)."""
    return patch(session, Agent, agent_id, "agent", host=host, drain=drain, archived=archived)


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
