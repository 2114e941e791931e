"""The one vocabulary of task states that every executor reports in, and which of them are final or resubmittable."""

from __future__ import annotations

NOT_SUBMITTED = "NOT_SUBMITTED"  # in the ledger, never submitted
PENDING = "PENDING"  # submitted (or requeued) and waiting to start
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"  # trained to its end (exit 0)
FAILED = "FAILED"  # ended with an error; its log says why
CANCELLED = "CANCELLED"  # cancelled by a user or an admin (scancel)
TIMEOUT = "TIMEOUT"  # hit its time limit with no requeue left; its newest state continues it
PREEMPTED = "PREEMPTED"  # the scheduler took its resources away; its newest state continues it
STOPPED = "STOPPED"  # took a stop signal, saved a state and exited 75, not requeued
LOST = "LOST"  # its process vanished without saying how it ended (kill -9, reboot)
# Slurm's own failures, kept by name because they tell the user what to change (memory, nodes, deadline)
OUT_OF_MEMORY = "OUT_OF_MEMORY"
NODE_FAIL = "NODE_FAIL"
BOOT_FAIL = "BOOT_FAIL"
DEADLINE = "DEADLINE"
UNKNOWN = "UNKNOWN"  # the backend reported something this vocabulary has no word for; shown, never acted on

ALL = (
    NOT_SUBMITTED,
    PENDING,
    RUNNING,
    COMPLETED,
    FAILED,
    CANCELLED,
    TIMEOUT,
    PREEMPTED,
    STOPPED,
    LOST,
    OUT_OF_MEMORY,
    NODE_FAIL,
    BOOT_FAIL,
    DEADLINE,
    UNKNOWN,
)
# ended without completing: `resubmit --failed` submits these again, and each continues its run's newest state
RESUBMITTABLE = frozenset({FAILED, CANCELLED, TIMEOUT, PREEMPTED, STOPPED, LOST, OUT_OF_MEMORY, NODE_FAIL, BOOT_FAIL, DEADLINE})
# nothing runs any more: `--wait` returns once every task is in one of these
DONE = frozenset({COMPLETED}) | RESUBMITTABLE
