"""The queue's state machine, written down in one place: job states and which changes a user or an agent may make."""

from __future__ import annotations

QUEUED, CLAIMED, RUNNING = "queued", "claimed", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STOPPING, STOPPED = "stopping", "stopped"
JOB_STATES = (QUEUED, CLAIMED, RUNNING, SUCCEEDED, FAILED, CANCELLED, STOPPING, STOPPED)
ACTIVE = (QUEUED, CLAIMED, RUNNING, STOPPING)

# a run found on disk but never queued here: what its own files say
FINISHED_ON_DISK, LIVE_ON_DISK, RESUMABLE_ON_DISK, UNKNOWN = SUCCEEDED, RUNNING, STOPPED, "unknown"

# job state -> the states it may move to. Agents drive claimed/running/succeeded/failed/stopped;
# users drive cancel (queued/claimed -> cancelled, running -> stopping) and resume (stopped/failed/cancelled -> queued).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (CLAIMED, CANCELLED),
    CLAIMED: (RUNNING, QUEUED, CANCELLED, FAILED),
    RUNNING: (SUCCEEDED, FAILED, STOPPING, STOPPED, QUEUED),
    STOPPING: (STOPPED, FAILED, SUCCEEDED, QUEUED),
    STOPPED: (QUEUED,),
    FAILED: (QUEUED,),
    CANCELLED: (QUEUED,),
    SUCCEEDED: (),
}

# what a user's action asks for, by the job's current state
CANCEL = {QUEUED: CANCELLED, CLAIMED: CANCELLED, RUNNING: STOPPING}
RESUME = {STOPPED: QUEUED, FAILED: QUEUED, CANCELLED: QUEUED}
ACTIONS = {"cancel": CANCEL, "resume": RESUME}


def allowed(current: str, new: str) -> bool:
    """Whether a job may move from `current` to `new`."""
    return new in TRANSITIONS.get(current, ())
