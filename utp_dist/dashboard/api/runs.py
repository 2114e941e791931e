"""/api/v1/runs: queueing, the runs list (queued and found on disk), one run, its curves, cancel/resume."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Query, Request, Response, status

from utp_dist.dashboard import clone, filterlang, jobqueue, readmodels, runtable, services
from utp_dist.dashboard.deps import MAX_PAGE, IdPath, SessionDep, SettingsDep
from utp_dist.dashboard.schemas import MAX_INT, BulkTags, CloneIn, QueueIn, QueueOut, RunDetail, RunOut, RunPatch, RunRow, StateChangeOut

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


@router.post("/from-config/{config_id}", response_model=QueueOut, status_code=status.HTTP_201_CREATED)
def queue_run(config_id: IdPath, session: SessionDep, body: Annotated[QueueIn | None, Body()] = None):
    """Queue a run of a config: a run row and a job row, both queued."""
    body = body or QueueIn()
    run, job = jobqueue.queue_run(session, config_id, body.gpus, body.priority, body.max_attempts)
    return QueueOut(run_id=run.id, job_id=job.id, state=job.state)


@router.get("", response_model=list[RunRow])
def list_runs(
    request: Request,
    response: Response,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=runtable.MAX_EXPORT, description="rows per page (JSON: at most 500)")] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    project_id: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    sweep_id: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    state: Annotated[list[str] | None, Query(max_length=20, description="one or more states")] = None,
    q: Annotated[str | None, Query(max_length=200, description="part of the run name, display name or data set")] = None,
    name: Annotated[str | None, Query(max_length=200, description="the same as q")] = None,
    tag: Annotated[list[str] | None, Query(max_length=20, description="runs with every tag given")] = None,
    where: Annotated[str | None, Query(max_length=filterlang.MAX_LENGTH, description="e.g. optim.lr < 0.003 and val_acc@1 > 0.8")] = None,
    sort: Annotated[str | None, Query(max_length=1000, description="columns, comma-separated; -name for descending")] = None,
    columns: Annotated[str | None, Query(max_length=9000, description="more columns: config keys and metrics, comma-separated")] = None,
    archived: bool = False,
    format: Annotated[Literal["json", "csv"] | None, Query(description="csv, or send Accept: text/csv")] = None,
):
    """The run table, filtered and sorted in the database; X-Total-Count holds the number of matching runs and
    X-Indexing says the first pass over the output roots is still under way (the list is not complete yet)."""
    as_csv = format == "csv" or (format is None and "text/csv" in request.headers.get("accept", ""))
    if not as_csv and limit > MAX_PAGE:
        raise services.Invalid(f"limit: at most {MAX_PAGE} runs per JSON page (CSV takes up to {runtable.MAX_EXPORT})")
    page = runtable.table(
        session,
        where=where,
        sort=sort,
        columns=columns,
        tags=tag or (),
        states=state or (),
        name=name or q,
        project_id=project_id,
        sweep_id=sweep_id,
        archived=archived,
        limit=limit,
        offset=offset,
    )
    headers = {"X-Total-Count": str(page.total), "X-Indexing": "true" if request.app.state.indexer.status["indexing"] else "false"}
    if as_csv:
        headers["Content-Disposition"] = 'attachment; filename="runs.csv"'
        return Response(runtable.to_csv(page), media_type="text/csv; charset=utf-8", headers=headers)
    response.headers.update(headers)
    return [row_of(run, page.tags.get(run.id, []), *page.names.get(run.id, (None, None)), page.values.get(run.id, {})) for run in page.runs]


def row_of(run, tags: list[str], project: str | None = None, sweep: str | None = None, values: dict | None = None) -> RunRow:
    """A run table row: the run's own columns and what the table adds."""
    return RunRow(**RunOut.model_validate(run).model_dump(), tags=tags, project=project, sweep=sweep, values=values or {})


@router.post("/tags")
def tag_runs(body: BulkTags, session: SessionDep) -> dict[str, int]:
    """Add and remove tags on many runs at once (the run table's bulk action): {"runs": how many of them exist}."""
    return {"runs": runtable.bulk_tag(session, body.run_ids, body.add, body.remove)}


@router.get("/tags")
def list_tags(session: SessionDep) -> list[dict]:
    """Every tag in use and how many runs carry it, most used first."""
    return [{"tag": tag, "runs": count} for tag, count in runtable.tag_names(session)]


@router.get("/columns")
def run_columns(session: SessionDep) -> dict[str, list[str]]:
    """What the run table can show, sort and filter by: built-in columns, config keys and the metrics runs have."""
    return runtable.column_names(session)


@router.get("/{run_id}", response_model=RunDetail)
def get_run(run_id: IdPath, session: SessionDep, settings: SettingsDep):
    """A run with its state, resolved config, progress, summary, paths and jobs."""
    detail = readmodels.run_detail(session, services.get_run(session, run_id), settings.roots)
    base = RunOut.model_validate(detail["run"]).model_dump()
    progress = {k: v for k, v in detail["progress"].items() if k != "log_tail"}
    return RunDetail(
        **base,
        config=detail["config"],
        progress=progress,
        summary=detail["summary"],
        paths=detail["paths"],
        jobs=detail["jobs"],
        sweep_task=detail["task"],
        log_tail=detail["run"].log_tail,
        tags=[t.tag for t in detail["run"].tags],
    )


@router.patch("/{run_id}", response_model=RunRow)
def patch_run(run_id: IdPath, body: RunPatch, session: SessionDep):
    """Set a run's display name, notes, tags (or add/remove some) or archived flag; fields not given stay."""
    run = runtable.annotate(session, run_id, **body.model_dump(exclude_unset=True))
    return row_of(run, [t.tag for t in run.tags], run.project.name if run.project else None)


@router.post("/{run_id}/clone")
def clone_run(run_id: IdPath, body: CloneIn, session: SessionDep, settings: SettingsDep, response: Response) -> dict:
    """A new run from this run's config with `overrides` (dotted keys), validated as the CLI validates (422 with its line)
    and by the server's --allow-import, stored as a config of the run's project and queued (201); `dry_run` only checks."""
    answer = clone.clone(
        session,
        run_id,
        body.overrides,
        settings.roots,
        settings.allow_import,
        name=body.name,
        dry_run=body.dry_run,
        gpus=body.gpus,
        priority=body.priority,
        max_attempts=body.max_attempts,
    )
    response.status_code = status.HTTP_200_OK if body.dry_run else status.HTTP_201_CREATED
    return answer


@router.get("/{run_id}/series")
def run_series(run_id: IdPath, session: SessionDep, settings: SettingsDep, log: bool = False) -> dict:
    """Curves for charts: {"state", "train": {tag: {x, y}}, "val": {metric: {x, y}}} (+ "log": the tail the run page shows)."""
    run = services.get_run(session, run_id)
    series = {"state": run.state, "epoch": run.epoch, "step": run.step, "best": run.best, **readmodels.run_series(run, settings.roots)}
    if log:
        series["log"] = readmodels.run_log(session, run, readmodels.run_folder(run, settings.roots))[1]
    return series


@router.post("/{run_id}/cancel", response_model=StateChangeOut)
def cancel_run(run_id: IdPath, session: SessionDep):
    """Cancel a queued/claimed job, or ask a running one to stop (409 with the current state otherwise)."""
    job = jobqueue.change_state(session, run_id, "cancel")
    return StateChangeOut(run_id=run_id, job_id=job.id, state=job.state)


@router.post("/{run_id}/resume", response_model=StateChangeOut)
def resume_run(run_id: IdPath, session: SessionDep):
    """Put a stopped, failed or cancelled run back in the queue (409 with the current state otherwise)."""
    job = jobqueue.change_state(session, run_id, "resume")
    return StateChangeOut(run_id=run_id, job_id=job.id, state=job.state)


@router.delete("/{run_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_run(
    run_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    delete_files: Annotated[bool, Query(description="also remove its logs and checkpoints folders (inside the output roots only)")] = False,
    confirm: Annotated[str | None, Query(max_length=255, description="with delete_files: the run's folder name, typed again")] = None,
):
    """Forget a run that is not active. Its files stay unless `delete_files=true&confirm=NAME` (then a run found on disk does
    not come back at the next index); to only hide a run, archive it (PATCH archived=true)."""
    runtable.delete_run(session, run_id, settings.roots, delete_files, confirm)
