"""The run table page (/web/runs): any config key or metric as a column, sorting, filters, tags, CSV, and the clone editor.

The table is rendered by the server from the same query as GET /api/v1/runs (runtable.py); the page's script
(static/runtable.js) only keeps the user's columns in localStorage and checks a clone's edits as they are typed.
Writes are forms with the CSRF token, as on every other page.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from utp_dist import states
from utp_dist.dashboard import clone, runtable, services
from utp_dist.dashboard.deps import MAX_PAGE, SessionDep, SettingsDep
from utp_dist.dashboard.pages import PostedForm, back, csrf_refused, error_page, render, templates
from utp_dist.dashboard.schemas import MAX_INT

router = APIRouter(prefix="/web", include_in_schema=False)
PAGE_SIZE = 50


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours} h {rest // 60:02d} min"
    return f"{rest // 60} min {rest % 60:02d} s" if rest >= 60 else f"{rest} s"


templates.env.filters["duration"] = _duration


@router.get("/runs")
def runs_table(
    request: Request,
    session: SessionDep,
    page: int = Query(1, ge=1, le=MAX_INT),
    size: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE),
    state: str = Query("", max_length=20),
    q: str = Query("", max_length=200),
    where: str = Query("", max_length=2000),
    sort: str = Query("", max_length=1000),
    columns: str = Query("", max_length=9000),
    tag: str = Query("", max_length=64),
    archived: bool = False,
    project: int | None = Query(None, ge=1, le=MAX_INT),
    sweep: int | None = Query(None, ge=1, le=MAX_INT),
):
    """Every run, queued here or found under the roots, as a table sorted and filtered in the database."""
    query = {"q": q, "state": state, "where": where, "sort": sort, "columns": columns, "tag": tag, "project": project, "sweep": sweep}
    query = {k: v for k, v in query.items() if v} | ({"archived": "true"} if archived else {})
    problem, table = None, None
    try:
        table = runtable.table(
            session,
            where=where,
            sort=sort,
            columns=columns,
            tags=[tag] if tag else (),
            states=[state] if state else (),
            name=q,
            project_id=project,
            sweep_id=sweep,
            archived=archived,
            limit=size,
            offset=(page - 1) * size,
        )
    except services.Invalid as err:
        problem = str(err)
    if table is None:  # the filter is shown with its error, above the table of every run
        table = runtable.table(session, tags=(), limit=size, project_id=project, sweep_id=sweep, archived=archived)
    rows = [{"run": run, "cells": runtable.cells(table, run), "tags": table.tags.get(run.id, [])} for run in table.runs]
    extra = table.columns[len(runtable.DEFAULT_COLUMNS) :]
    return render(
        request,
        "runtable.html",
        status_code=422 if problem else 200,
        table=table,
        rows=rows,
        extra=extra,
        query=query,
        page=page,
        size=size,
        problem=problem,
        sort_links={c: _sort_link(query, sort, c) for c in table.columns},
        sorted_by=sort,
        page_link=lambda n: "?" + urlencode(query | {"page": n, "size": size}),
        tag_link=lambda name: "?" + urlencode({k: v for k, v in query.items() if k != "tag"} | ({"tag": name} if name else {})),
        csv_link="/api/v1/runs?" + urlencode(_api_query(query) | {"format": "csv", "limit": runtable.MAX_EXPORT}),
        tags=runtable.tag_names(session),
        picker=runtable.column_names(session),
        states=list(states.RUN),
        indexing=request.app.state.indexer.status,
    )


def _sort_link(query: dict, current: str, column: str) -> str:
    """The header link: sort by this column, descending first for numbers; a second click turns the order round."""
    descending = "-" + column
    target = column if current == descending else descending
    return "?" + urlencode(query | {"sort": target})


def _api_query(query: dict) -> dict:
    """The page's filters as GET /api/v1/runs names them."""
    renamed = {"q": "name", "project": "project_id", "sweep": "sweep_id"}
    return {renamed.get(k, k): v for k, v in query.items()}


@router.post("/runs/tags")
def tag_ticked(request: Request, session: SessionDep, form: PostedForm):
    """The bulk action of the table: add or remove one tag on the ticked runs."""
    if form is None:
        return csrf_refused(request)
    ids = [int(i) for i in form.getlist("ids") if str(i).isdigit() and 0 < int(i) <= MAX_INT]
    tag, action = str(form.get("tag") or "").strip(), form.get("action")
    if not ids or not tag or len(tag) > 64 or "," in tag or action not in ("add", "remove"):
        return error_page(request, 422, "tick at least one run and give a tag (at most 64 characters, no comma) to add or remove")
    runtable.bulk_tag(session, ids, [tag] if action == "add" else [], [tag] if action == "remove" else [])
    return back(_same_page(form.get("back")))


@router.post("/runs/{run_id}/annotate")
def annotate(request: Request, run_id: int, session: SessionDep, form: PostedForm):
    """The run page's form: display name, notes and tags (comma-separated), or archive/unarchive."""
    if form is None:
        return csrf_refused(request)
    services.get_run(session, _id(run_id))
    tags = [t.strip() for t in str(form.get("tags") or "").split(",") if t.strip()]
    if any(len(t) > 64 for t in tags) or len(tags) > 50 or len(str(form.get("display_name") or "")) > 255:
        return error_page(request, 422, "tags: at most 50, each at most 64 characters; a display name at most 255")
    archived = {"true": True, "false": False}.get(str(form.get("archived") or ""))
    runtable.annotate(
        session, run_id, display_name=str(form.get("display_name") or ""), notes=str(form.get("notes") or ""), tags=tags, archived=archived
    )
    return back(f"/web/runs/{run_id}")


def _same_page(target: Any) -> str:
    target = str(target or "")
    return target if target.startswith("/web/runs") and "//" not in target and "\\" not in target else "/web/runs"


def _id(run_id: int) -> int:
    if not 0 < run_id <= MAX_INT:
        raise services.NotFound(f"no run with id {run_id}")
    return run_id


# --- clone with edits


def overrides_of(text: str) -> dict[str, Any]:
    """`key=value` lines (values in YAML, as on the command line) as overrides; Invalid names the line that is not one."""
    found = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise services.Invalid(f"line {number}: '{line[:60]}' must look like section.key=value")
        try:
            found[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise services.Invalid(f"line {number}: the value of {key.strip()} is not valid YAML") from None
    if len(found) > 200:
        raise services.Invalid("at most 200 overrides")
    return found


@router.get("/runs/{run_id}/clone")
def clone_page(request: Request, run_id: int, session: SessionDep, settings: SettingsDep):
    """The clone editor: the run's config as it trained, and `key=value` lines that change it."""
    run = services.get_run(session, _id(run_id))
    base = clone.base_config(session, run_id, settings.roots)
    return render(request, "clone.html", run=run, base=yaml.safe_dump(base, sort_keys=False))


@router.get("/runs/{run_id}/clone/check")
def clone_check(run_id: int, session: SessionDep, settings: SettingsDep, overrides: str = Query("", max_length=20_000)):
    """What the editor asks as the user types: {"ok", "detail" (the CLI's line), "changes"}; nothing is stored."""
    try:
        answer = clone.clone(session, _id(run_id), overrides_of(overrides), settings.roots, settings.allow_import, dry_run=True)
    except services.Invalid as err:
        return JSONResponse({"ok": False, "detail": str(err), "changes": {}})
    return JSONResponse({"ok": True, "detail": "", "changes": answer["changes"]}, headers={"Cache-Control": "no-store"})


@router.post("/runs/{run_id}/clone")
def clone_queue(request: Request, run_id: int, session: SessionDep, settings: SettingsDep, form: PostedForm):
    """Queue the clone (the same checks as POST /api/v1/runs/{id}/clone)."""
    if form is None:
        return csrf_refused(request)
    try:
        numbers = {k: int(str(form.get(k) or default)) for k, default in (("priority", 0), ("max_attempts", 3), ("gpus", 0))}
    except ValueError:
        return error_page(request, 422, "priority, max attempts and GPUs are whole numbers")
    if not (-MAX_INT <= numbers["priority"] <= MAX_INT and 1 <= numbers["max_attempts"] <= 100 and 0 <= numbers["gpus"] <= 64):
        return error_page(request, 422, "priority must fit 32 bits, max attempts lie in 1..100, GPUs in 0..64")
    try:
        answer = clone.clone(
            session, _id(run_id), overrides_of(str(form.get("overrides") or "")), settings.roots, settings.allow_import, **numbers
        )
    except services.Invalid as err:
        return error_page(request, 422, str(err))
    return back(f"/web/runs/{answer['run_id']}")
