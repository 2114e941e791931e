"""Clone a run with edits: its config with some dotted keys changed, validated as the CLI validates, stored and queued."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from utp_dist.config import Config, flatten, set_dotted
from utp_dist.dashboard import jobqueue, readmodels, runtable, services
from utp_dist.dashboard.db import ConfigRow, Project

# what a run's saved config holds that its clone must not take over: its folder's name (the clone is named anew, so
# it never continues the original's folder) and the resume setting an agent chooses per attempt
NOT_CLONED = ("output.run_name", "checkpoint.resume")
DEFAULTS = flatten(Config().to_dict())


def base_config(session: Session, run_id: int, roots: tuple[Path, ...]) -> dict:
    """The config a run was trained with: its folder's config.yaml, else the stored config it was queued from."""
    run = services.get_run(session, run_id)
    folder = readmodels.run_folder(run, roots)
    raw = folder.read_config() if folder is not None and folder.exists() else None
    if raw is None and run.config_id is not None:
        row = session.get(ConfigRow, run.config_id)
        raw = copy.deepcopy(row.config) if row is not None else None
    if raw is None:
        raise services.Invalid(f"run {run_id} has no config to clone (no readable config.yaml, no stored config)")
    return raw


def clone(
    session: Session,
    run_id: int,
    overrides: dict[str, Any],
    roots: tuple[Path, ...],
    allow_import: tuple[str, ...],
    name: str | None = None,
    dry_run: bool = False,
    gpus: int = 0,
    priority: int = 0,
    max_attempts: int = 3,
) -> dict:
    """Validate the edited config (422 with the CLI's line); unless `dry_run`, store it as a config and queue a run of it.

    Returns {"changes": {key: [before, after]}, "config": resolved sections, and run_id, job_id, config_id, state once queued}.
    """
    raw = base_config(session, run_id, roots)
    before = flatten(raw)
    edited = copy.deepcopy(raw)
    for key in NOT_CLONED:
        if key not in overrides and _has(edited, key):
            set_dotted(edited, key, DEFAULTS[key])
    for key, value in overrides.items():
        set_dotted(edited, key.strip(), value)
    label = name or f"clone of run {run_id}"
    _, cfg = services.validate_config(label, edited, None, allow_import)
    after = flatten(edited)
    changes = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    answer = {"changes": changes, "config": cfg.to_dict(), "config_hash": cfg.fingerprint()}
    if dry_run:
        return answer
    run = services.get_run(session, run_id)
    project_id = run.project_id or _project(session, cfg.output.project or run.dataset or "clones")
    row = services.create_config(session, project_id, _free_name(session, project_id, label), edited, None, allow_import)
    queued, job = jobqueue.queue_run(session, row.id, gpus, priority, max_attempts)
    runtable.store_values(session, {queued.id: flatten(cfg.to_dict())})  # filterable while it waits in the queue
    session.commit()
    return answer | {"run_id": queued.id, "job_id": job.id, "config_id": row.id, "state": job.state}


def _has(raw: dict, key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _project(session: Session, name: str) -> int:
    found = session.scalar(select(Project.id).where(Project.name == name))
    return found if found is not None else services.create_project(session, name, runtable.AUTO_PROJECT).id


def _free_name(session: Session, project_id: int, name: str) -> str:
    """`name`, or `name (2)`, `name (3)`... the first one the project does not have yet."""
    taken = set(session.scalars(select(ConfigRow.name).where(ConfigRow.project_id == project_id, ConfigRow.name.startswith(name))))
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} ({n})"
    return candidate[:200]


def new_version(
    session: Session, config_id: int, config: dict | None, text: str | None, allow_import: tuple[str, ...], description: str | None
):
    """An edited config stored as NAME v2, v3... in the same project, validated as any config (the old one stays: runs
    queued from it keep the config they ran)."""
    old = services.found(session, ConfigRow, config_id, "config")
    stem = re.sub(r" v\d+$", "", old.name)
    version = 2 + len(
        list(session.scalars(select(ConfigRow.id).where(ConfigRow.project_id == old.project_id, ConfigRow.name.like(f"{stem} v%"))))
    )
    name = _free_name(session, old.project_id, f"{stem} v{version}"[:200])
    row = services.create_config(session, old.project_id, name, config, text, allow_import)
    row.description = old.description if description is None else description
    session.commit()
    return row
