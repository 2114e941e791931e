"""Server-rendered pages under /web: thin views over the same service functions as the API."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import yaml
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from utp_dist import states
from utp_dist.dashboard import gallery, jobqueue, readmodels, security, services, sources, tokens
from utp_dist.dashboard.db import Agent, Project
from utp_dist.dashboard.deps import SessionDep, SettingsDep
from utp_dist.dashboard.schemas import QueueIn, problem
from utp_dist.dashboard.settings import Settings

router = APIRouter(prefix="/web", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
PAGE_SIZE, MAX_PAGE = 50, 1000
MAX_COMPARED = 100  # runs on one compare page: each brings its curves along


def _number(value, digits: int = 4) -> str:
    """A metric for a table cell: 4 significant digits, '-' when missing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _ago(stamp: float | None) -> str:
    if not stamp:
        return "never"
    seconds = max(0, time.time() - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


templates.env.filters.update(num=_number, ago=_ago, kind=states.kind, tojson_compact=lambda v: json.dumps(v, default=str))


def render(request: Request, template: str, status_code: int = 200, headers: dict | None = None, **context) -> HTMLResponse:
    """A page, with the CSRF token every form posts back and whether the dashboard has logins (the header's logout button)."""
    context = {"csrf": request.state.csrf, "logins": request.app.state.settings.token is not None, **context}
    return templates.TemplateResponse(request, template, context, status_code=status_code, headers=headers)


def error_page(request: Request, status: int, detail: str) -> HTMLResponse:
    """An HTML page saying what went wrong, with the status code."""
    return render(request, "error.html", status_code=status, status=status, detail=detail)


async def posted(request: Request):
    """The posted form, or None when its CSRF token does not match this browser's cookie."""
    form = await request.form()
    return form if security.csrf_ok(request, form) else None


# The form is read on the event loop (reading the body is async); the handlers that take it are plain `def`, so their
# database work and subprocesses run in the threadpool and never hold up heartbeats or the reaper.
PostedForm = Annotated[FormData | None, Depends(posted)]


def csrf_refused(request: Request) -> HTMLResponse:
    """403 for a form whose CSRF token is missing or wrong."""
    return error_page(request, 403, "the form's CSRF token is missing or wrong: reload the page and submit again")


def back(url: str) -> RedirectResponse:
    """Redirect after a POST (303: the browser follows with a GET)."""
    return RedirectResponse(url, status_code=303)


# --- login and logout (a dashboard started with --no-token has neither)


def log_in(request: Request, settings: Settings, given: str | None, target: str) -> HTMLResponse | RedirectResponse:
    """Check a token from the login form or URL: the session cookie and the page asked for, else the form again (401; 429 while slowed)."""
    if settings.token is None:
        return back(target)
    right, wait = security.offered(request, settings, request.app.state.throttle, given)
    if wait > 0:
        headers = security.retry_after(wait)
        error = f"Too many wrong tokens: try again in {headers['Retry-After']} s."
        return render(request, "login.html", status_code=429, headers=headers, next=target, error=error)
    if not right:
        return render(request, "login.html", status_code=401, next=target, error="Wrong token.")
    return request.app.state.sessions.set(back(target))


@router.get("/login")
def login_form(request: Request, settings: SettingsDep, next: str = "/web/runs", token: str | None = None):
    """The login form; with ?token= (the URL the dashboard prints) it logs in at once and redirects, dropping the token from the URL."""
    target = security.safe_next(next)
    if token is not None:
        return log_in(request, settings, token, target)
    return render(request, "login.html", next=target, error=None)


@router.post("/login")
def login(request: Request, settings: SettingsDep, form: PostedForm):
    """Check the token and set the session cookie (signed and dated, never the token)."""
    if form is None:
        return csrf_refused(request)
    return log_in(request, settings, form.get("token"), security.safe_next(form.get("next")))


@router.post("/logout")
def logout(request: Request, form: PostedForm):
    """Forget this browser's login."""
    if form is None:
        return csrf_refused(request)
    response = back("/web/login")
    response.delete_cookie(security.SESSION_COOKIE, httponly=True, samesite="strict")
    return response


# --- projects and configs


def projects_view(
    request: Request, session: Session, error: str | None = None, status_code: int = 200, archived: bool = False
) -> HTMLResponse:
    """The projects page (the archived ones when asked), with an error from a failed create."""
    items, _ = services.list_projects(session, limit=500, archived=archived)
    return render(request, "projects.html", status_code=status_code, projects=items, error=error, archived=archived)


def create_from_form(request: Request, form: FormData | None, make, refused) -> HTMLResponse | RedirectResponse:
    """A create form: check its CSRF token, make the object (answering the URL to go to), or show the form again with the 409."""
    if form is None:
        return csrf_refused(request)
    try:
        return back(make(form))
    except services.Conflict as err:
        return refused(str(err))


@router.get("/projects")
def projects_page(request: Request, session: SessionDep, archived: bool = False):
    """Projects (`?archived=true`: the archived ones) and the form to create one."""
    return projects_view(request, session, archived=archived)


@router.post("/projects")
def create_project(request: Request, session: SessionDep, form: PostedForm):
    """Create a project from the form, then go to its configs."""

    def make(form) -> str:
        project = services.create_project(session, str(form.get("name", "")).strip() or "-", str(form.get("description", "")))
        return f"/web/projects/{project.id}/configs"

    return create_from_form(request, form, make, lambda error: projects_view(request, session, error, 409))


@router.get("/projects/{project_id}/configs")
def configs_page(request: Request, project_id: int, session: SessionDep, archived: bool = False):
    """A project's configs (`?archived=true`: the archived ones) and the form to paste one."""
    project = services.found(session, Project, project_id, "project")
    items, _ = services.list_configs(session, project_id, limit=500, archived=archived)
    return render(request, "configs.html", project=project, configs=items, error=None, name="", text="", archived=archived)


@router.post("/projects/{project_id}/configs")
def create_config(request: Request, project_id: int, session: SessionDep, settings: SettingsDep, form: PostedForm):
    """Paste a config file (YAML, or JSON, which is YAML too); errors come back on the form with the CLI's line."""
    if form is None:
        return csrf_refused(request)
    name, text = str(form.get("name", "")).strip() or "config", str(form.get("text", ""))
    try:
        services.create_config(session, project_id, name, text=text, allow_import=settings.allow_import)
    except (services.Invalid, services.Conflict) as err:
        project = services.found(session, Project, project_id, "project")
        items, _ = services.list_configs(session, project_id, limit=500)
        status = 409 if isinstance(err, services.Conflict) else 422
        return render(request, "configs.html", status_code=status, project=project, configs=items, error=str(err), name=name, text=text)
    return back(f"/web/projects/{project_id}/runs")


@router.get("/projects/{project_id}/runs")
def project_runs_page(request: Request, project_id: int, session: SessionDep, page: int = Query(1, ge=1)):
    """A project's configs with queue buttons, and its runs."""
    project = services.found(session, Project, project_id, "project")
    configs, _ = services.list_configs(session, project_id, limit=500)
    runs, total = services.list_runs(session, project_id=project_id, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    _, sweeps = readmodels.names(session)
    return render(
        request, "project_runs.html", project=project, configs=configs, runs=runs, total=total, page=page, size=PAGE_SIZE, sweeps=sweeps
    )


@router.post("/configs/{config_id}/queue")
def queue_run(request: Request, config_id: int, session: SessionDep, form: PostedForm):
    """Queue a run of a config, then show its page."""
    if form is None:
        return csrf_refused(request)
    try:  # the same bounds as the API's body
        queue = QueueIn(gpus=form.get("gpus") or 0, priority=form.get("priority") or 0, max_attempts=form.get("max_attempts") or 3)
    except ValidationError as err:
        return error_page(request, 422, problem(err.errors()))
    run, _ = jobqueue.queue_run(session, config_id, gpus=queue.gpus, priority=queue.priority, max_attempts=queue.max_attempts)
    return back(f"/web/runs/{run.id}")


# --- runs


# /web/runs, the run table, is in runpages.py


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: int, session: SessionDep, settings: SettingsDep):
    """One run: where, progress, queue controls, curves, figures, files, log tail, resolved config."""
    run = services.get_run(session, run_id)
    shown = readmodels.run_page(session, run, settings.roots)
    config_text = yaml.safe_dump(shown["config"], sort_keys=False) if shown["config"] else ""
    pictures = gallery.gallery(readmodels.run_folder(run, settings.roots), settings.roots)
    return render(request, "run.html", **shown, config_text=config_text, gallery=pictures)


@router.post("/runs/{run_id}/{action}")
def change_run(request: Request, run_id: int, action: str, session: SessionDep, form: PostedForm):
    """Cancel or resume a run from its page."""
    if form is None:
        return csrf_refused(request)
    if action not in jobqueue.ACTIONS:
        return error_page(request, 404, f"no action '{action}'; use one of {', '.join(jobqueue.ACTIONS)}")
    jobqueue.change_state(session, run_id, action)
    return back(f"/web/runs/{run_id}")


@router.get("/compare")
def compare_page(request: Request, session: SessionDep, settings: SettingsDep, ids: Annotated[list[int], Query()] = ()):
    """Picked runs: overlaid curves and the config keys that differ."""
    if len(ids) < 2:
        return error_page(request, 422, "pick at least two runs to compare (tick them in the runs list)")
    ids = list(dict.fromkeys(ids))  # a run ticked twice is one run
    data = readmodels.compare(session, ids[:MAX_COMPARED], settings.roots)
    labels = [f"#{r.id} {r.name or 'queued'}" for r in data["runs"]]
    return render(request, "compare.html", **data, labels=labels, asked=len(ids))


# --- sweeps


@router.get("/sweeps")
def sweeps_page(request: Request, session: SessionDep):
    """Every sweep found under the output roots."""
    items, _ = services.list_sweeps(session, limit=500)
    return render(request, "sweeps.html", sweeps=items)


@router.get("/sweeps/{sweep_id}")
def sweep_page(request: Request, sweep_id: int, session: SessionDep, settings: SettingsDep, message: str | None = None):
    """One sweep's board: tasks, resubmit-failed, leaderboard, seeds."""
    shown = readmodels.sweep_page(session, services.get_sweep(session, sweep_id), settings.roots, security.own_server(settings))
    return render(request, "sweep.html", **shown, message=message)


@router.post("/sweeps/{sweep_id}/resubmit-failed")
def resubmit_failed(request: Request, sweep_id: int, session: SessionDep, settings: SettingsDep, form: PostedForm):
    """`submit resubmit SWEEP --failed` by the sweep code, then the board with the line it ended with. A plain def: sbatch
    or a sweep's server may take seconds, and the event loop answers the agents' heartbeats meanwhile."""
    if form is None:
        return csrf_refused(request)
    sweep = services.get_sweep(session, sweep_id)
    code, message = sources.resubmit_failed(Path(sweep.folder), security.own_server(settings), settings.allow_import)
    shown = readmodels.sweep_page(session, sweep, settings.roots, security.own_server(settings))
    return render(request, "sweep.html", **shown, message=f"resubmit --failed: {message}" + ("" if code == 0 else f" (exit {code})"))


# --- agents


def agents_view(request: Request, session: Session, status_code: int = 200, **shown) -> HTMLResponse:
    """The agents page and the agent tokens; `shown`: error (registering), token_error, created (a new token's secret, once),
    archived (list the archived agents instead)."""
    archived = shown.pop("archived", False)
    items, _ = services.list_agents(session, limit=500, archived=archived)
    held = jobqueue.held_by_agent(session)
    made, _ = tokens.list_tokens(session, limit=500)
    context = {"error": None, "token_error": None, "created": None, "archived": archived, **shown}
    lease_s = request.app.state.settings.lease_s
    online = {a.id for a in items if a.last_heartbeat and time.time() - a.last_heartbeat < lease_s}  # its jobs' leases still hold
    return render(
        request, "agents.html", status_code=status_code, agents=items, held=held, tokens=made, online_ids=online, lease_s=lease_s, **context
    )


@router.get("/agents")
def agents_page(request: Request, session: SessionDep, archived: bool = False):
    """Agents (`?archived=true`: the archived ones), their GPUs and heartbeats, and the form to register one."""
    return agents_view(request, session, archived=archived)


@router.post("/agents")
def create_agent(request: Request, session: SessionDep, form: PostedForm):
    """Register an agent from the form."""

    def make(form) -> str:
        services.create_agent(session, str(form.get("name", "")).strip() or "agent", str(form.get("host", "")))
        return "/web/agents"

    return create_from_form(request, form, make, lambda error: agents_view(request, session, 409, error=error))


@router.post("/agents/tokens")
def create_agent_token(request: Request, session: SessionDep, form: PostedForm):
    """Make an agent token and show its secret on the page, this once."""
    if form is None:
        return csrf_refused(request)
    try:
        row, token = tokens.create_token(session, str(form.get("name", "")))
    except services.Conflict as err:
        return agents_view(request, session, status_code=409, token_error=str(err))
    except services.Invalid as err:
        return agents_view(request, session, status_code=422, token_error=str(err))
    return agents_view(request, session, status_code=201, created={"name": row.name, "token": token})


@router.post("/agents/tokens/{token_id}/revoke")
def revoke_agent_token(request: Request, token_id: int, session: SessionDep, form: PostedForm):
    """Revoke an agent token."""
    if form is None:
        return csrf_refused(request)
    tokens.revoke_token(session, token_id)
    return back("/web/agents")


@router.post("/agents/{agent_id}/delete")
def delete_agent(request: Request, agent_id: int, session: SessionDep, form: PostedForm):
    """Forget an agent (the page offers it for offline agents; a live one registers again at its next heartbeat)."""
    if form is None:
        return csrf_refused(request)
    services.delete_agent(session, agent_id)
    return back("/web/agents")


@router.post("/agents/{agent_id}/drain")
def drain_agent(request: Request, agent_id: int, session: SessionDep, form: PostedForm):
    """Drain an agent (or take it back into service)."""
    if form is None:
        return csrf_refused(request)
    agent = services.found(session, Agent, agent_id, "agent")
    services.update_agent(session, agent_id, None, not agent.drain)
    return back("/web/agents")
