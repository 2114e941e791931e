"""One grid task as submitit runs it: the training entry on its config, checkpointable so Slurm can requeue it."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from utp_dist import states
from utp_dist.errors import one_line
from utp_dist.preemption import EXIT_RESUMABLE
from utp_dist.store import atomic

TASKS_DIR = "tasks"


class TaskFailed(RuntimeError):
    """The training command ended with an error (its message is in the task's log)."""


class TrainTask:
    """Callable submitted per grid point: runs `utp_dist.train CONFIG` in this process (one per GPU under Slurm)."""

    def __init__(self, config: str, sweep_dir: str, index: int, max_requeues: int, requeues: int = 0):
        self.config, self.sweep_dir, self.index = config, sweep_dir, index
        self.max_requeues, self.requeues = max_requeues, requeues

    def __call__(self) -> int:
        """Train; on a stop signal the run saves, then submitit's own USR2 handler requeues the job."""

        def train() -> tuple[int, int | None, str | None]:
            from utp_dist.train_command import run  # imported here: submitting a grid should not pay for torch

            outcome = run([self.config])
            return outcome.code, outcome.stop_signal, outcome.error

        code, rank, requeued = attempt(self.sweep_dir, self.index, train)
        if requeued or (code == EXIT_RESUMABLE and rank != 0):
            return code  # requeued by submitit, or stopped together with rank 0, which decides about the requeue
        if code != 0:
            raise TaskFailed(f"utp_dist.train {self.config} exited with {code}; the log above says why")
        return code

    def checkpoint(self) -> object:
        """What submitit requeues: the same task, which resumes from the run's newest training state."""
        import submitit

        if self.requeues >= self.max_requeues:
            return None  # submitit then ends the job instead of requeuing it
        return submitit.helpers.DelayedSubmission(TrainTask(self.config, self.sweep_dir, self.index, self.max_requeues, self.requeues + 1))


def attempt(sweep_dir: str, index: int, body: Callable[[], tuple[int, int | None, str | None]]) -> tuple[int, int, bool]:
    """One attempt of a sweep task (a grid point or a search worker) under its task record: (exit code, rank, whether
    submitit requeues it). `body` returns (exit code, the stop signal that ended it or None, the one-line error or None);
    after Slurm's timeout/preemption warning (USR2) the run saved at a step boundary and submitit's own handler requeues
    the job. A crash is recorded with its last line, then raised (the traceback goes to the task's log)."""
    requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler, when under Slurm
    rank = _export_rank_environment()
    record = TaskRecord(Path(sweep_dir), index) if rank == 0 else None
    if record:
        record.started()
    try:
        code, stop_signal, error = body()
    except Exception as err:
        if record:
            record.ended(1, f"{type(err).__name__}: {one_line(err)}")
        raise
    if record:
        record.ended(code, error)
    if stop_signal == signal.SIGUSR2 and callable(requeue):
        requeue(signal.SIGUSR2, None)
        return code, rank, True
    return code, rank, False


# what a launcher sets for each process of a process group (torchrun's names, which Accelerate reads)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _export_rank_environment() -> int:
    """Under Slurm, export RANK/WORLD_SIZE/MASTER_* from a job of several tasks (what torchrun would set) so Accelerate
    builds DDP; a job of one task is one process, with none of them (nor any the submitting shell passed on)."""
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return int(os.environ.get("RANK", "0"))
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks == 1:
        # with LOCAL_RANK set Accelerate would start a process group of one, whose store listens on MASTER_PORT:
        # submitit derives that port from the job id, and when another program of the node holds it the job crashes
        for name in RANK_VARIABLES:
            os.environ.pop(name, None)
        return 0
    # every process keeps all GPUs of its node visible: Accelerate binds cuda:LOCAL_RANK itself
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return env.rank


class TaskRecord:
    """SWEEP_DIR/tasks/N.json: what the task itself knows (attempts, host, pid, exit code), for `submit status`."""

    def __init__(self, sweep_dir: Path, index: int):
        self.path = sweep_dir / TASKS_DIR / f"{index}.json"

    def read(self) -> dict:
        """The record, or {} before the task first started."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def queued(self) -> None:
        """Mark the task submitted again: a stale failed must not end a `--wait` before the new attempt ran."""
        if self.path.exists():
            self._write({**self.read(), "state": states.QUEUED, "exit_code": None, "error": None})

    def started(self) -> None:
        """Count an attempt and mark the task running."""
        old = self.read()
        self._write(
            {
                "state": states.RUNNING,
                "attempts": old.get("attempts", 0) + 1,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "job_id": _job_id(),
                "started": time.time(),
            }
        )

    def ended(self, code: int, error: str | None = None) -> None:
        """Mark the task succeeded, stopped (saved to be resumed) or failed (with the one-line error, when there is one)."""
        self._write({**self.read(), "state": states.from_exit(code), "exit_code": code, "error": error, "ended": time.time()})

    def _write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path, json.dumps(record))


def _job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def process_alive(pid: str) -> bool:
    """Whether the process runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        number = int(pid.removeprefix("pid:"))
        os.kill(number, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{number}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists
