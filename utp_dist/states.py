"""The states a user sees, in the words every page and command shows, and where each backend's own words map into them.

A run or sweep task is in one of these states wherever it is shown: the run list, the run page, the sweep board,
`submit status`, `submit leaderboard` and the API. Each source of states is translated here, once: the dashboard's
queue (whose words these are: the database stores them as they are), Slurm accounting (sacct), the local runner's
task records, an exit code, and a run folder found on disk. It imports only a constant, so every package can use it.
"""

from __future__ import annotations

from utp_dist.preemption import EXIT_RESUMABLE

# --- the words (the queue's own states first: the dashboard stores and moves jobs between these)
QUEUED = "queued"  # waiting to start: queued on a dashboard, or submitted (or requeued) to a scheduler
CLAIMED = "claimed"  # an agent took the job and is starting it
RUNNING = "running"
STOPPING = "stopping"  # asked to stop: it saves a state and exits
SUCCEEDED = "succeeded"  # trained to its end (exit 0)
FAILED = "failed"  # ended with an error; its log says why
CANCELLED = "cancelled"  # cancelled by a user or an admin before it ended
STOPPED = "stopped"  # took a stop signal, saved a state and exited 75: it continues from there
# what only a scheduler or the local runner reports
TIMEOUT = "timeout"  # hit its time limit with no requeue left; its newest state continues it
PREEMPTED = "preempted"  # the scheduler took its resources away; its newest state continues it
LOST = "lost"  # its process vanished without saying how it ended (kill -9, reboot, a deleted run)
# Slurm's own failures, kept by name because they tell the user what to change (memory, nodes, deadline)
OUT_OF_MEMORY = "out-of-memory"
NODE_FAIL = "node-fail"
BOOT_FAIL = "boot-fail"
DEADLINE = "deadline"
NOT_SUBMITTED = "not-submitted"  # a sweep task never submitted
UNKNOWN = "unknown"  # a source said something these words do not name, or a run on disk says nothing: shown, never acted on

# an adaptive search's trials (utp_dist.sweep.study) take RUNNING, SUCCEEDED (trained to the full budget) and FAILED too
PAUSED = "paused"  # stopped at a rung boundary with a saved state, waiting for the rung rule
PROMOTED = "promoted"  # the rung rule let it continue: the next free worker resumes it to the next rung
STOPPED_EARLY = "stopped-early"  # the rung rule will never promote it: its states are pruned to the best export
TRIAL = (RUNNING, PAUSED, PROMOTED, STOPPED_EARLY, SUCCEEDED, FAILED)

QUEUE = (QUEUED, CLAIMED, RUNNING, SUCCEEDED, FAILED, CANCELLED, STOPPING, STOPPED)  # the states a job of the queue takes
ACTIVE = (QUEUED, CLAIMED, RUNNING, STOPPING)  # a job in one of these still belongs to the queue or an agent
ALL = (
    *QUEUE,
    TIMEOUT,
    PREEMPTED,
    LOST,
    OUT_OF_MEMORY,
    NODE_FAIL,
    BOOT_FAIL,
    DEADLINE,
    NOT_SUBMITTED,
    UNKNOWN,
    PAUSED,
    PROMOTED,
    STOPPED_EARLY,
)
RUN = (*QUEUE, UNKNOWN)  # the states a run row of the dashboard can have (queued here, or found on disk)

# ended without completing: `resubmit --failed` submits these again, and each continues its run's newest state
RESUBMITTABLE = frozenset({FAILED, CANCELLED, TIMEOUT, PREEMPTED, STOPPED, LOST, OUT_OF_MEMORY, NODE_FAIL, BOOT_FAIL, DEADLINE})
# nothing runs any more: `--wait` returns once every task is in one of these
DONE = frozenset({SUCCEEDED}) | RESUBMITTABLE

# how a page colours a state: ok, running, interrupted (stopped from outside, it can continue), failed, waiting
KIND = {
    SUCCEEDED: "ok",
    **dict.fromkeys((CLAIMED, RUNNING, STOPPING, PROMOTED), "running"),
    **dict.fromkeys((PAUSED, STOPPED_EARLY), "interrupted"),
    **dict.fromkeys((STOPPED, CANCELLED, TIMEOUT, PREEMPTED, LOST, NODE_FAIL, DEADLINE), "interrupted"),
    **dict.fromkeys((FAILED, OUT_OF_MEMORY, BOOT_FAIL), "failed"),
}


def kind(state: str) -> str:
    """The colour class of a state (a state without one, queued or unknown, is waiting)."""
    return KIND.get(state, "waiting")


# --- Slurm accounting: sacct's words (man sacct, JOB STATE CODES) in ours
SLURM = {
    "PENDING": QUEUED,
    "REQUEUED": QUEUED,
    "REQUEUE_FED": QUEUED,
    "REQUEUE_HOLD": QUEUED,
    "RESV_DEL_HOLD": QUEUED,
    "RUNNING": RUNNING,
    "CONFIGURING": RUNNING,
    "COMPLETING": RUNNING,
    "RESIZING": RUNNING,
    "SIGNALING": RUNNING,
    "STAGE_OUT": RUNNING,
    # Slurm's STOPPED (SIGSTOP) and SUSPENDED keep the allocation and go on: not our stopped, which has ended
    "STOPPED": RUNNING,
    "SUSPENDED": RUNNING,
    "COMPLETED": SUCCEEDED,
    "FAILED": FAILED,
    "SPECIAL_EXIT": FAILED,
    "CANCELLED": CANCELLED,
    "REVOKED": CANCELLED,  # a federated sibling runs it elsewhere
    "TIMEOUT": TIMEOUT,
    "PREEMPTED": PREEMPTED,
    "OUT_OF_MEMORY": OUT_OF_MEMORY,
    "NODE_FAIL": NODE_FAIL,
    "BOOT_FAIL": BOOT_FAIL,
    "DEADLINE": DEADLINE,
}


def from_slurm(word: str) -> str:
    """A sacct state ('CANCELLED by 0' already cut to CANCELLED) in our words."""
    return SLURM.get(word, UNKNOWN)


# --- the local runner's task records (sweep/tasks/N.json): written in our words; records of older versions say
# PENDING, RUNNING, COMPLETED, STOPPED (exit 75) or FAILED
_OLD_RECORDS = {"PENDING": QUEUED, "RUNNING": RUNNING, "COMPLETED": SUCCEEDED, "STOPPED": STOPPED, "FAILED": FAILED}


def from_record(word: str | None) -> str | None:
    """A task record's state in our words (None: no state recorded)."""
    if word is None:
        return None
    word = _OLD_RECORDS.get(word, word)
    return word if word in ALL else UNKNOWN


def from_exit(code: int) -> str:
    """The state an exit code of a training process means: 0 succeeded, 75 stopped (resumable), anything else failed."""
    return SUCCEEDED if code == 0 else STOPPED if code == EXIT_RESUMABLE else FAILED


# --- a run folder found on disk (never queued on the dashboard): what its own files say
def from_disk(finished: bool, live: bool, resumable: bool) -> str:
    """succeeded (its FINISHED marker), running (alive), stopped (it has a state to continue), else unknown."""
    return SUCCEEDED if finished else RUNNING if live else STOPPED if resumable else UNKNOWN


def from_queue(word: str | None) -> str:
    """A run's state as a dashboard's API reports it (a deleted run, None, is lost)."""
    return LOST if word is None else word if word in ALL else UNKNOWN
