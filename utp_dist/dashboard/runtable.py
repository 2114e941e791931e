"""The run table: every run with any config key or metric as a column, sorted and filtered in the database.

A run's config keys (flattened: optim.lr) and metrics (val_* of its best evaluation, test_* of its best weights,
duration) live in the narrow run_values table, filled by the indexer; a filter expression (filterlang.py) and the
sort keys become SQL over its (key, num) and (key, text) indexes, so a page of 10,000 runs never reads every row
in Python.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, insert, not_, or_, select
from sqlalchemy.orm import Session, aliased

from utp_dist.config import Config, flatten
from utp_dist.dashboard import filterlang, services
from utp_dist.dashboard.db import Project, Run, RunTag, RunValue, Sweep
from utp_dist.dashboard.services import Invalid, NotFound
from utp_dist.states import ACTIVE
from utp_dist.store.run_dir import RunDir, inside

KEY_LENGTH, TEXT_LENGTH = 200, 500
MAX_SORT_KEYS, MAX_COLUMNS = 4, 40
MAX_EXPORT = 50_000  # rows in one CSV answer
DURATION = "duration"
# the built-in columns: what the runs table itself holds (plus the project's and sweep's names)
BUILTIN: dict[str, Any] = {
    "id": Run.id,
    "state": Run.state,
    "name": func.coalesce(Run.display_name, Run.name),
    "run_name": Run.name,
    "dataset": Run.dataset,
    "source": Run.source,
    "project": select(Project.name).where(Project.id == Run.project_id).scalar_subquery(),
    "sweep": select(Sweep.name).where(Sweep.id == Run.sweep_id).scalar_subquery(),
    "created": Run.created,
    "epoch": Run.epoch,
    "step": Run.step,
    "best_metric": Run.best_metric,
    "best": Run.best,
    "img_per_s": Run.img_per_s,
    "attempts": Run.attempts,
    "restarts": Run.restarts,
}
TEXT_COLUMNS = {"state", "name", "run_name", "dataset", "source", "project", "sweep", "best_metric"}
# what the table shows before the user adds columns: monitored metric with its name, test acc@1, duration
DEFAULT_COLUMNS = ("id", "state", "name", "project", "sweep", "created", DURATION, "best_metric", "best", "test_acc@1")
CONFIG_KEYS = frozenset(flatten(Config().to_dict()))


# --- what the indexer stores


def values_of(folder: RunDir, config: dict | None, summary: dict | None, mtime: float | None, started: float) -> dict[str, Any]:
    """A run's filterable values: its config keys, val_* of its best evaluation, test_* and its duration."""
    values: dict[str, Any] = dict(flatten(config)) if isinstance(config, dict) else {}
    summary = summary or {}
    best = summary.get("best") if isinstance(summary.get("best"), dict) else {}
    train = (config or {}).get("train") if isinstance((config or {}).get("train"), dict) else {}
    metric = best.get("metric") or train.get("monitor_metric") or "val_acc@1"
    mode = best.get("mode") or train.get("monitor_mode") or "max"
    evaluations = [line for line in folder.read_metrics() if line.get("split") == "val"]
    scored = [line for line in evaluations if _finite(line.get(metric)) is not None]
    if scored:
        pick = max if mode == "max" else min
        chosen = pick(reversed(scored), key=lambda line: line[metric])  # the first of equal values, as the trainer keeps it
    else:
        chosen = evaluations[-1] if evaluations else {}
    values.update({k: v for k, v in chosen.items() if k.startswith("val_") and _finite(v) is not None})
    test = summary.get("test") if isinstance(summary.get("test"), dict) else {}
    values.update({k: v for k, v in test.items() if k.startswith("test_") and _finite(v) is not None})
    wall = _finite(summary.get("wall_time_s"))
    values[DURATION] = wall if wall is not None else (max(mtime - started, 0.0) if mtime is not None else None)
    return values


def store_values(session: Session, values: dict[int, dict[str, Any]]) -> None:
    """Replace the stored values of these runs (run id -> values) in two statements."""
    if not values:
        return
    session.execute(delete(RunValue).where(RunValue.run_id.in_(list(values))))
    rows = [{"run_id": run_id, "key": key[:KEY_LENGTH], **cell(value)} for run_id, run in values.items() for key, value in run.items()]
    rows = [row for row in rows if row["num"] is not None or row["text"] is not None]
    if rows:
        session.execute(insert(RunValue), rows)


def assign_projects(session: Session, values: dict[Run, dict[str, Any]]) -> None:
    """Put each run found on disk without a project into the one its config names (output.project), else the one named
    after its data set, made on first use: runs from the CLI, Slurm and local grids are listed like queued ones."""
    wanted = {}
    for row, found in values.items():
        if row.project_id is None and row.source == "disk":
            name = found.get("output.project") or row.dataset
            if isinstance(name, str) and name.strip():
                wanted[row] = name.strip()[:200]
    if not wanted:
        return
    projects = {p.name: p for p in session.scalars(select(Project).where(Project.name.in_(set(wanted.values()))))}
    for row, name in wanted.items():
        if name not in projects:
            projects[name] = Project(name=name, description=AUTO_PROJECT)
            session.add(projects[name])
        row.project = projects[name]


AUTO_PROJECT = "runs found under the output roots (output.project, or their data set)"


def cell(value: Any) -> dict[str, Any]:
    """{"num", "text"} of one value: numbers and booleans are numbers (true = 1), everything is also text as shown."""
    if isinstance(value, bool):
        return {"num": float(value), "text": "true" if value else "false"}
    if isinstance(value, (int, float)):
        number = _finite(value)
        return {"num": number, "text": None if number is None else str(value)[:TEXT_LENGTH]}
    if value is None:
        return {"num": None, "text": None}
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {"num": None, "text": text[:TEXT_LENGTH]}


def shown(num: float | None, text: str | None) -> Any:
    """A stored value as the table shows it: the number, true/false, or the text."""
    if text in ("true", "false") and num in (0.0, 1.0):
        return text == "true"
    if num is not None and num.is_integer() and text is not None and text.lstrip("-").isdigit():
        return int(num)  # an integer key (train.seed, data.batch_size) stays one
    return num if num is not None else text


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and abs(value) < 1e300 else None


# --- the query


@dataclass
class Table:
    """One page of the run table: its rows (Run objects with their tags and values) and the columns shown."""

    runs: list[Run]
    total: int
    columns: list[str]
    values: dict[int, dict[str, Any]] = field(default_factory=dict)
    tags: dict[int, list[str]] = field(default_factory=dict)
    names: dict[int, tuple[str | None, str | None]] = field(default_factory=dict)  # run id -> (project, sweep)


def split_list(text: str | None, what: str, limit: int) -> list[str]:
    """A comma-separated parameter as a list (422 past `limit` items or for a name too long)."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if len(items) > limit:
        raise Invalid(f"{what}: at most {limit} names, got {len(items)}")
    for item in items:
        if len(item) > KEY_LENGTH or not filterlang.NAME.fullmatch(item.lstrip("+-")):
            raise Invalid(f"{what}: {item[:60]!r} is not a column name (a config key such as optim.lr, a metric, or state, name...)")
    return items


def table(
    session: Session,
    *,
    where: str | None = None,
    sort: str | None = None,
    columns: str | None = None,
    tags: Iterable[str] = (),
    states: Iterable[str] = (),
    name: str | None = None,
    project_id: int | None = None,
    sweep_id: int | None = None,
    archived: bool = False,
    limit: int = 100,
    offset: int = 0,
) -> Table:
    """The runs matching every filter given, in the order asked (default: newest first), one page of them."""
    extra = [c for c in split_list(columns, "columns", MAX_COLUMNS) if c not in DEFAULT_COLUMNS]
    for column in extra:
        if column not in BUILTIN and not known_key(session, column):
            raise Invalid(f"columns: unknown column {column!r}: {HINT}")
    query = select(Run)
    conditions = [Run.archived.is_(True) if archived else Run.archived.is_(False)]
    if project_id is not None:
        conditions.append(Run.project_id == project_id)
    if sweep_id is not None:
        conditions.append(Run.sweep_id == sweep_id)
    states = [s for s in states if s]
    if states:
        conditions.append(Run.state.in_(states))
    for tag in (t for t in tags if t):
        conditions.append(Run.id.in_(select(RunTag.run_id).where(RunTag.tag == tag)))
    if name:
        pattern = f"%{_escape(name)}%"
        conditions.append(or_(*(c.ilike(pattern, escape="\\") for c in (Run.name, Run.display_name, Run.dataset))))
    if where:
        try:
            tree = filterlang.parse(where)
        except filterlang.FilterError as err:
            raise Invalid(f"where: {err}") from None
        if tree is not None:
            conditions.append(_compile(session, tree, where))
    query = query.where(and_(*conditions))
    total = session.scalar(select(func.count()).select_from(query.with_only_columns(Run.id).subquery())) or 0
    # the sort carries run ids only; the page's few rows are read whole afterwards
    ids = list(session.scalars(_sorted(session, query.with_only_columns(Run.id), sort).limit(limit).offset(offset)))
    by_id = {run.id: run for run in session.scalars(select(Run).where(Run.id.in_(ids)))} if ids else {}
    runs = [by_id[i] for i in ids if i in by_id]
    page = Table(runs, total, list(DEFAULT_COLUMNS) + extra)
    ids = [run.id for run in runs]
    if ids:
        wanted = [c for c in page.columns if c not in BUILTIN]
        for run_id, key, num, text in session.execute(
            select(RunValue.run_id, RunValue.key, RunValue.num, RunValue.text).where(RunValue.run_id.in_(ids), RunValue.key.in_(wanted))
        ):
            page.values.setdefault(run_id, {})[key] = shown(num, text)
        for run_id, tag in session.execute(select(RunTag.run_id, RunTag.tag).where(RunTag.run_id.in_(ids)).order_by(RunTag.tag)):
            page.tags.setdefault(run_id, []).append(tag)
        named = select(Run.id, Project.name, Sweep.name).outerjoin(Project, Project.id == Run.project_id)
        for run_id, project, sweep in session.execute(named.outerjoin(Sweep, Sweep.id == Run.sweep_id).where(Run.id.in_(ids))):
            page.names[run_id] = (project, sweep)
    return page


HINT = "use a config key (optim.lr), a metric (val_acc@1, test_acc@1, duration), tag, or one of " + ", ".join(BUILTIN)


def known_key(session: Session, key: str) -> bool:
    """Whether `key` is a config key or a value some run has (one index lookup)."""
    if key in CONFIG_KEYS or key == DURATION:
        return True
    return session.scalar(select(RunValue.run_id).where(RunValue.key == key).limit(1)) is not None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _compile(session: Session, tree, source: str):
    """The SQL condition of a parsed filter expression."""
    if isinstance(tree, filterlang.Comparison):
        return _comparison(session, tree)
    if tree[0] == "not":
        return not_(_compile(session, tree[1], source))
    parts = [_compile(session, part, source) for part in tree[1:]]
    return and_(*parts) if tree[0] == "and" else or_(*parts)


def _fail(message: str, at: filterlang.Comparison):
    raise Invalid(f"where: {filterlang.FilterError(message, at.position)}")


def _compare(column, op: str, value):
    if op == "~":
        return column.ilike(f"%{_escape(str(value))}%", escape="\\")
    return {
        "==": column == value,
        "!=": column != value,
        "<": column < value,
        "<=": column <= value,
        ">": column > value,
        ">=": column >= value,
    }[op]


def _comparison(session: Session, cmp: filterlang.Comparison):
    name, op, value = cmp.name, cmp.op, cmp.value
    if name == "tag":
        if op not in ("==", "!=", "~") or not isinstance(value, str):
            _fail("tag compares with ==, != or ~ and a quoted string", cmp)
        tagged = Run.id.in_(select(RunTag.run_id).where(_compare(RunTag.tag, "==" if op == "!=" else op, value)))
        return not_(tagged) if op == "!=" else tagged
    if name in BUILTIN:
        column, text = BUILTIN[name], name in TEXT_COLUMNS
        if value is None:
            return column.is_(None) if op == "==" else column.is_not(None) if op == "!=" else _fail("null compares with == or != only", cmp)
        if text != isinstance(value, str) or isinstance(value, bool):
            kind = "text: compare it with a quoted string" if text else "a number: compare it with a number"
            _fail(f"{name} is {kind}", cmp)
        if op == "~" and not text:
            _fail(f"~ (contains) needs a text column; {name} is a number", cmp)
        return _compare(column, op, value)
    if len(name) > KEY_LENGTH or not known_key(session, name):
        _fail(f"unknown column {name!r}: {HINT}", cmp)
    having = select(RunValue.run_id).where(RunValue.key == name)
    if value is None:
        if op not in ("==", "!="):
            _fail("null compares with == or != only", cmp)
        return not_(Run.id.in_(having)) if op == "==" else Run.id.in_(having)
    if isinstance(value, bool):
        if op not in ("==", "!="):
            _fail("true and false compare with == or != only", cmp)
        return Run.id.in_(having.where(_compare(RunValue.num, op, float(value))))
    if isinstance(value, str):
        return Run.id.in_(having.where(_compare(RunValue.text, op, value)))
    if op == "~":
        _fail("~ (contains) needs a quoted string", cmp)
    return Run.id.in_(having.where(_compare(RunValue.num, op, value)))


def _sorted(session: Session, query, sort: str | None):
    """`query` ordered by `sort` ("-val_acc@1,optim.lr": a leading - for descending), missing values last, newest first on ties."""
    order = []
    for item in split_list(sort, "sort", MAX_SORT_KEYS):
        descending, name = item.startswith("-"), item.lstrip("+-")
        if name in BUILTIN:
            columns = [BUILTIN[name]]
        elif name == "tag":
            raise Invalid("sort: runs cannot be sorted by tag; filter by it (tag=NAME)")
        elif known_key(session, name):
            value = aliased(RunValue)
            # one outer join per sort key: (run_id, key) is the primary key, so a run keeps exactly one row
            query = query.outerjoin(value, and_(value.run_id == Run.id, value.key == name))
            columns = [value.num, value.text]
        else:
            raise Invalid(f"sort: unknown column {name!r}: {HINT}")
        for column in columns:
            order += [column.is_(None), column.desc() if descending else column.asc()]
    return query.order_by(*order, Run.created.desc(), Run.id.desc())


# --- export


def cells(page: Table, run: Run) -> dict[str, Any]:
    """One row of the table as shown: each column's value."""
    project, sweep = page.names.get(run.id, (None, None))
    builtin = {
        "id": run.id,
        "state": run.state,
        "name": run.display_name or run.name,
        "run_name": run.name,
        "dataset": run.dataset,
        "source": run.source,
        "project": project,
        "sweep": sweep,
        "created": run.created,
        "epoch": run.epoch,
        "step": run.step,
        "best_metric": run.best_metric,
        "best": run.best,
        "img_per_s": run.img_per_s,
        "attempts": run.attempts,
        "restarts": run.restarts,
    }
    values = page.values.get(run.id, {})
    return {column: builtin[column] if column in builtin else values.get(column) for column in page.columns}


def to_csv(page: Table) -> str:
    """The page as CSV: exactly its columns, in order, plus the tags; times in UTC (ISO 8601)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*page.columns, "tags"])
    for run in page.runs:
        row = cells(page, run)
        row["created"] = datetime.datetime.fromtimestamp(run.created, datetime.timezone.utc).isoformat(timespec="seconds")
        writer.writerow([_csv_cell(row[c]) for c in page.columns] + [" ".join(page.tags.get(run.id, []))])
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value  # a spreadsheet would run a cell starting with = as a formula
    return value


def column_names(session: Session) -> dict[str, list[str]]:
    """What the column picker offers: the built-in columns, every config key and every metric some run has."""
    keys = set(session.scalars(select(RunValue.key).distinct()))
    metrics = sorted(k for k in keys if "." not in k)
    return {"builtin": list(BUILTIN), "config": sorted(CONFIG_KEYS | {k for k in keys if "." in k}), "metrics": metrics}


# --- what users add to runs: display names, notes, tags, the archived flag


def annotate(
    session: Session,
    run_id: int,
    *,
    display_name: str | None = None,
    notes: str | None = None,
    tags: list[str] | None = None,
    add_tags: Iterable[str] = (),
    remove_tags: Iterable[str] = (),
    archived: bool | None = None,
) -> Run:
    """Change what users add to a run (None leaves a field as it is; "" clears a display name or notes)."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if display_name is not None:
        run.display_name = display_name.strip() or None
    if notes is not None:
        run.notes = notes or None
    if archived is not None:
        run.archived = archived
    current = {t.tag for t in run.tags}
    wanted = (set(tags) if tags is not None else current) | set(add_tags)
    wanted -= set(remove_tags)
    run.tags = [t for t in run.tags if t.tag in wanted] + [RunTag(tag=tag) for tag in sorted(wanted - current)]
    session.commit()
    return run


def bulk_tag(session: Session, run_ids: list[int], add: Iterable[str], remove: Iterable[str]) -> int:
    """Add and remove tags on many runs in a few statements; returns how many of the runs exist."""
    ids = list(session.scalars(select(Run.id).where(Run.id.in_(set(run_ids)))))
    add, remove = set(add) - set(remove), set(remove)
    if ids and remove:
        session.execute(delete(RunTag).where(RunTag.run_id.in_(ids), RunTag.tag.in_(remove)))
    if ids and add:
        have = set(session.execute(select(RunTag.run_id, RunTag.tag).where(RunTag.run_id.in_(ids), RunTag.tag.in_(add))).tuples())
        rows = [{"run_id": i, "tag": tag} for i in ids for tag in sorted(add) if (i, tag) not in have]
        if rows:
            session.execute(insert(RunTag), rows)
    session.commit()
    return len(ids)


def tag_names(session: Session) -> list[tuple[str, int]]:
    """Every tag in use with how many runs carry it, most used first (the table's tag chips)."""
    rows = session.execute(select(RunTag.tag, func.count()).group_by(RunTag.tag).order_by(func.count().desc(), RunTag.tag).limit(200))
    return [(tag, count) for tag, count in rows]


# --- deleting a run, and its folders only when asked and confirmed


def folder_name(run: Run) -> str:
    """What a user types to confirm deleting a run's folders: its folder name (its id for a queued run with no folder yet)."""
    return run.name or str(run.id)


def delete_run(
    session: Session, run_id: int, roots: tuple[Path, ...], delete_files_too: bool = False, confirm: str | None = None
) -> list[str]:
    """Forget a run that is not active (409 otherwise); with `delete_files_too`, also remove its folders, which `confirm`
    (the run's folder name, typed again) must allow (422 otherwise, nothing deleted). The paths removed."""
    run = services.get_run(session, run_id)
    removed = []
    if delete_files_too:
        if confirm != folder_name(run):
            raise Invalid(f"delete_files: confirm with the run's folder name (confirm={folder_name(run)}); nothing was deleted")
        job = services.latest_job(session, run)
        if job is not None and job.state in ACTIVE:
            raise services.Conflict(f"run {run_id} is {job.state}: cancel it first", job.state)
        removed = delete_files(run, roots)
    services.delete_run(session, run_id)
    return removed


def delete_files(run: Run, roots: tuple[Path, ...]) -> list[str]:
    """Remove the run's logs and checkpoints folders; each must be exactly OUTPUT_ROOT/{logs,checkpoints}/DATASET/NAME
    inside one of the output roots, and no symbolic link (nothing outside the roots is ever removed). The paths removed."""
    if not (run.root and run.dataset and run.name):
        return []
    folder = RunDir(run.root, run.dataset, run.name)
    root = next((Path(r).resolve() for r in roots if Path(r).resolve() == Path(run.root).resolve()), None)
    if root is None:
        raise Invalid(f"run {run.id}'s folders are not under this dashboard's output roots: they are not deleted from here")
    checked = []
    for kind, path in (("logs", folder.logs), ("checkpoints", folder.checkpoints)):
        if not path.exists() and not path.is_symlink():
            continue
        resolved = inside(path, (root,))
        if path.is_symlink() or resolved is None or resolved.relative_to(root).parts != (kind, run.dataset, run.name):
            raise Invalid(f"{path} is a link or leads elsewhere: run {run.id}'s folders are not deleted from here")
        checked.append(resolved)
    for path in checked:
        shutil.rmtree(path)
    return [str(p) for p in checked]
