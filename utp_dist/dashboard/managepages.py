"""Archive, unarchive and delete from the pages: projects, configs (and a config's page, where an edit is stored as a new
version), agents and runs. Archived things leave the default lists (each list has a "show archived" link); deleting a
project or config asks for a ticked box, and deleting a run's folders for its folder name typed again.

The same service functions as the API's PATCH archived=... and DELETE routes; every form carries the CSRF token.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from utp_dist.dashboard import clone, readmodels, runtable, services
from utp_dist.dashboard.db import Agent, ConfigRow, Project, Run
from utp_dist.dashboard.deps import IdPath, SessionDep, SettingsDep
from utp_dist.dashboard.pages import PostedForm, back, csrf_refused, error_page, render
from utp_dist.states import ACTIVE

router = APIRouter(prefix="/web", include_in_schema=False)


def _not_confirmed(request: Request, form: FormData | None, what: str):
    """The refusal of a delete form without its CSRF token or its confirm box ticked (the browser refuses to send the
    form without the box; this checks it again), or None when the delete may go ahead."""
    if form is None:
        return csrf_refused(request)
    if form.get("confirm") != "yes":
        return error_page(request, 422, f"tick 'yes, delete' to delete {what}; nothing was deleted")
    return None


def set_archived(request: Request, session: Session, form: FormData | None, model, ident: int, what: str, listed):
    """Archive (archived=true) or unarchive (archived=false) a row, then back to its list (`listed(row)`: its URL) as it
    was shown: the archived ones after an unarchive."""
    if form is None:
        return csrf_refused(request)
    flag = {"true": True, "false": False}.get(str(form.get("archived") or ""))
    if flag is None:
        return error_page(request, 422, "archived: give true (archive) or false (unarchive)")
    row = services.patch(session, model, ident, what, archived=flag)
    return back(listed(row) + ("" if flag else "?archived=true"))


@router.post("/projects/{project_id}/archive")
def archive_project(request: Request, project_id: IdPath, session: SessionDep, form: PostedForm):
    """Archive or unarchive a project (archived ones leave the projects page's list)."""
    return set_archived(request, session, form, Project, project_id, "project", lambda row: "/web/projects")


@router.post("/configs/{config_id}/archive")
def archive_config(request: Request, config_id: IdPath, session: SessionDep, form: PostedForm):
    """Archive or unarchive a config (archived ones leave the project's lists and its queue buttons)."""
    return set_archived(request, session, form, ConfigRow, config_id, "config", lambda row: f"/web/projects/{row.project_id}/configs")


@router.post("/agents/{agent_id}/archive")
def archive_agent(request: Request, agent_id: IdPath, session: SessionDep, form: PostedForm):
    """Archive or unarchive an agent (an archived one leaves the agents page's list and claims nothing, as if drained)."""
    return set_archived(request, session, form, Agent, agent_id, "agent", lambda row: "/web/agents")


@router.post("/projects/{project_id}/delete")
def delete_project(request: Request, project_id: IdPath, session: SessionDep, form: PostedForm):
    """Delete a project with its configs (its runs stay, without a project): only with the confirm box ticked."""
    if refused := _not_confirmed(request, form, "the project and its configs"):
        return refused
    services.delete_project(session, project_id)
    return back("/web/projects")


@router.post("/configs/{config_id}/delete")
def delete_config(request: Request, config_id: IdPath, session: SessionDep, form: PostedForm):
    """Delete a config (runs queued from it stay): only with the confirm box ticked."""
    if refused := _not_confirmed(request, form, "the config"):
        return refused
    config = services.found(session, ConfigRow, config_id, "config")
    project_id = config.project_id
    services.delete_config(session, config_id)
    return back(f"/web/projects/{project_id}/configs")


# --- a config's page: its YAML, edited into a new version


def config_view(request: Request, config: ConfigRow, text: str | None = None, error: str | None = None, status_code: int = 200):
    """The config page, its editor holding `text` (the stored config when None) and the error of a refused version."""
    shown = yaml.safe_dump(config.config, sort_keys=False) if text is None else text
    return render(request, "config.html", status_code=status_code, config=config, project=config.project, text=shown, error=error)


@router.get("/configs/{config_id}")
def config_page(request: Request, config_id: IdPath, session: SessionDep):
    """One stored config: its YAML to edit into a new version, archive and delete."""
    return config_view(request, services.found(session, ConfigRow, config_id, "config"))


@router.post("/configs/{config_id}/versions")
def new_version(request: Request, config_id: IdPath, session: SessionDep, settings: SettingsDep, form: PostedForm):
    """Store the edited YAML as NAME v2, v3... (the old version stays); a bad key or value comes back on the form with the
    CLI's line."""
    if form is None:
        return csrf_refused(request)
    config = services.found(session, ConfigRow, config_id, "config")
    text = str(form.get("text") or "")
    description = form.get("description")
    try:
        row = clone.new_version(session, config_id, None, text, settings.allow_import, None if description is None else str(description))
    except (services.Invalid, services.Conflict) as err:
        session.rollback()
        return config_view(request, config, text, str(err), 409 if isinstance(err, services.Conflict) else 422)
    return back(f"/web/configs/{row.id}")


# --- deleting a run: its row, and its folders only when asked and confirmed


def run_delete_view(
    request: Request, session: Session, run: Run, roots: tuple[Path, ...], error: str | None = None, status_code: int = 200
):
    """The confirm page of a run's delete: what goes, what stays, and the folder name to type to delete its folders."""
    folder = readmodels.run_folder(run, roots)
    folders = [str(path) for path in (folder.logs, folder.checkpoints) if path.exists()] if folder is not None else []
    job = services.latest_job(session, run)
    return render(
        request,
        "run_delete.html",
        status_code=status_code,
        run=run,
        folders=folders,
        confirm_name=runtable.folder_name(run),
        active=job is not None and job.state in ACTIVE,
        error=error,
    )


@router.get("/runs/{run_id}/delete")
def run_delete_page(request: Request, run_id: IdPath, session: SessionDep, settings: SettingsDep):
    """The confirm step before a run is deleted."""
    return run_delete_view(request, session, services.get_run(session, run_id), settings.roots)


@router.post("/runs/{run_id}/delete")
def delete_run(request: Request, run_id: IdPath, session: SessionDep, settings: SettingsDep, form: PostedForm):
    """Forget the run; with the box "also delete its folders" ticked, remove them too, only when the folder name typed
    matches (else the confirm page again, 422, nothing deleted)."""
    if form is None:
        return csrf_refused(request)
    run = services.get_run(session, run_id)
    files = form.get("delete_files") == "yes"
    try:
        runtable.delete_run(session, run_id, settings.roots, files, str(form.get("confirm_name") or "") if files else None)
    except services.Invalid as err:
        return run_delete_view(request, session, run, settings.roots, str(err), 422)
    return back("/web/runs")
