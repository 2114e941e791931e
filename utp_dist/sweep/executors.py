"""Where grid tasks run: one Slurm array job (submitit), local processes pinned to one GPU each, or in-process (debug)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from utp_dist.errors import UserError
from utp_dist.sweep.resources import Resources
from utp_dist.sweep.status import slurm_client
from utp_dist.sweep.task import TaskFailed, TrainTask

EXECUTORS = ("slurm", "local", "debug")
SUBMITIT_DIR = "slurm"  # submitit's folder inside the sweep: pickles, sbatch files, task logs
LOCAL_LOGS = "local"


def sbatch_script(folder: Path, resources: Resources, job_name: str, count: int) -> str:
    """The sbatch file submitit writes for an array of `count` tasks (what --dry-run shows)."""
    from submitit.slurm.slurm import _make_sbatch_string

    submitit_folder = folder / SUBMITIT_DIR
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(submitit_folder))])
    return _make_sbatch_string(
        command=command, folder=submitit_folder, map_count=count if count > 1 else None, **resources.submitit_parameters(job_name)
    )


def submit_slurm(folder: Path, ledger: dict, indices: list[int], resources: Resources) -> dict[int, str]:
    """Submit the tasks as ONE array job; returns {task index: 'ARRAYID_N'} (or the plain job id for one task)."""
    slurm_client("sbatch")
    import submitit

    executor = submitit.SlurmExecutor(folder=folder / SUBMITIT_DIR, max_num_timeout=resources.max_requeues)
    executor.update_parameters(**resources.submitit_parameters(ledger["name"]))
    try:
        # submitit echoes sbatch's stderr before raising; the error below carries it, as one line
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            jobs = [executor.submit(_task(folder, ledger, i, resources.max_requeues)) for i in indices]
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as err:
        raise UserError(f"sbatch refused the job: {_slurm_message(str(err))}") from None
    return {i: job.job_id for i, job in zip(indices, jobs, strict=True)}


def _slurm_message(text: str) -> str:
    """Slurm's own error lines out of submitit's exception text, joined into one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [re.sub(r"^sbatch: error:\s*", "", line) for line in lines if line.startswith("sbatch: error:")]
    return "; ".join(dict.fromkeys(errors)) if errors else (lines[-1] if lines else "no message")


def submit_local(folder: Path, ledger: dict, indices: list[int], parallel: bool) -> dict[int, str]:
    """Start a detached runner that trains the tasks one after another (or one per visible GPU with parallel)."""
    logs = folder / LOCAL_LOGS
    logs.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "utp_dist.submit", "_run-local", str(folder), "--tasks", ",".join(map(str, indices))]
    if parallel:
        cmd.append("--parallel")
    with open(logs / "runner.log", "ab") as log:
        runner = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return {i: f"pid:{runner.pid}" for i in indices}


def run_local(folder: Path, ledger: dict, indices: list[int], parallel: bool) -> int:
    """The runner: each task in its own process, CUDA_VISIBLE_DEVICES pinned to one GPU; returns the failures."""
    gpus = _visible_gpus()
    slots = gpus if parallel and gpus else gpus[:1] or [None]
    queue, running, failures = list(indices), {}, 0
    while queue or running:
        while queue and len(running) < len(slots):
            gpu = next(g for g in slots if g not in running.values())
            index = queue.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else dict(os.environ)
            with open(folder / LOCAL_LOGS / f"task-{index}.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "utp_dist.submit", "_task", str(folder), str(index)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            running[proc] = gpu
        pid, status = os.wait()  # the runner's only children are its tasks
        done = next(proc for proc in running if proc.pid == pid)
        done.returncode = os.waitstatus_to_exitcode(status)
        failures += done.returncode != 0
        running.pop(done)
    return failures


def _visible_gpus() -> list[str]:
    """GPU ids this machine offers (CUDA_VISIBLE_DEVICES if set, else nvidia-smi), [] without GPUs."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def run_debug(folder: Path, ledger: dict, indices: list[int]) -> int:
    """Run the tasks in this process, one after another (for tests and debuggers); returns the failures."""
    from utp_dist.trainer import reset_accelerate

    failures = 0
    for index in indices:
        reset_accelerate()  # Accelerate's process-wide state belongs to the previous run
        failures += run_task(folder, ledger, index) != 0
    return failures


def run_task(folder: Path, ledger: dict, index: int) -> int:
    """One task in this process (what the local runner starts per task, and debug runs in turn); 1 if it failed."""
    try:
        _task(folder, ledger, index)()
    except TaskFailed as err:
        print(f"utp_dist: task {index}: {err}", file=sys.stderr)
        return 1
    return 0


def _task(folder: Path, ledger: dict, index: int, max_requeues: int = 0) -> TrainTask:
    """The callable of task `index`; max_requeues matters only under Slurm, where submitit requeues it."""
    task = ledger["tasks"][index]
    return TrainTask(task["config"], str(folder), index, max_requeues)
