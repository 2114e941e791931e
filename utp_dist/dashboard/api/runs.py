"""/api/v1/runs: queueing, the runs list (queued and found on disk), one run, its curves, cancel/resume."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, status

from utp_dist.dashboard import jobqueue, readmodels, services
from utp_dist.dashboard.deps import IdPath, PagingDep, SessionDep, SettingsDep
from utp_dist.dashboard.schemas import MAX_INT, QueueIn, QueueOut, RunDetail, RunOut, StateChangeOut

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


@router.post("/from-config/{config_id}", response_model=QueueOut, status_code=status.HTTP_201_CREATED)
def queue_run(config_id: IdPath, session: SessionDep, body: Annotated[QueueIn | None, Body()] = None):
    """Queue a run of a config: a run row and a job row, both queued."""
    body = body or QueueIn()
    run, job = jobqueue.queue_run(session, config_id, body.gpus, body.priority, body.max_attempts)
    return QueueOut(run_id=run.id, job_id=job.id, state=job.state)


@router.get("", response_model=list[RunOut])
def list_runs(
    session: SessionDep,
    paging: PagingDep,
    project_id: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    sweep_id: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    state: str | None = None,
    q: Annotated[str | None, Query(description="part of the run name or data set")] = None,
):
    """Runs, newest first: queued here and found under the output roots."""
    return paging.total(*services.list_runs(session, project_id, state, q, paging.limit, paging.offset, sweep_id))


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
    )


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
def delete_run(run_id: IdPath, session: SessionDep):
    """Forget a run that is not active (its files stay)."""
    services.delete_run(session, run_id)
