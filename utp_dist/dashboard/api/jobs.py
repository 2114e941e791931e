"""/api/v1/jobs: what agents do with queued jobs: claim, start, progress, finish, refuse; states by run."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from utp_dist.dashboard import jobqueue
from utp_dist.dashboard.deps import IdPath, SessionDep, SettingsDep
from utp_dist.dashboard.schemas import MAX_INT, ClaimIn, ClaimOut, FinishIn, JobOut, ProgressIn, RefuseIn, RunStateOut, StartIn

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


@router.post("/claim", response_model=ClaimOut)
def claim(body: ClaimIn, session: SessionDep, settings: SettingsDep):
    """Atomically claim the best queued job that fits the agent's free GPUs (`{"job": null}` when none fits or it is drained)."""
    return ClaimOut(job=jobqueue.claim(session, body.agent_id, body.free_gpus, body.cpu, body.refused, settings.lease_s))


@router.post("/{job_id}/start", response_model=JobOut)
def start(job_id: IdPath, body: StartIn, session: SessionDep):
    """claimed -> running with the training process's pid (409 when the agent no longer holds this attempt)."""
    return jobqueue.start(session, job_id, body.agent_id, body.attempt, body.pid)


@router.post("/{job_id}/progress", status_code=204)
def progress(job_id: IdPath, body: ProgressIn, session: SessionDep):
    """Epoch, step, best so far, img/s, restarts, log tail and run folder, as the run's own files say (409 when not held)."""
    folder = body.run_folder.model_dump() if body.run_folder else None
    values = body.model_dump(exclude={"agent_id", "attempt", "run_folder"})
    jobqueue.progress(session, job_id, body.agent_id, body.attempt, folder, values)


@router.post("/{job_id}/finish", response_model=JobOut)
def finish(job_id: IdPath, body: FinishIn, session: SessionDep):
    """The exit code: 0 succeeded, 75 stopped (resumable), else failed with the CLI's one-line error or the log tail."""
    return jobqueue.finish(session, job_id, body.agent_id, body.attempt, body.exit_code, body.error, body.log_tail)


@router.post("/{job_id}/refuse", response_model=JobOut)
def refuse(job_id: IdPath, body: RefuseIn, session: SessionDep):
    """claimed -> queued: this agent cannot run the job; the reason is shown on the job."""
    return jobqueue.refuse(session, job_id, body.agent_id, body.attempt, body.reason)


@router.get("/by-run", response_model=dict[int, RunStateOut])
def by_run(session: SessionDep, ids: Annotated[list[int], Query(description="run ids")] = ()):
    """State, restarts and attempts of each run (what `submit status` asks for a grid on agents)."""
    return jobqueue.run_states(session, [i for i in ids if 1 <= i <= MAX_INT])  # an id no row can have is simply not found
