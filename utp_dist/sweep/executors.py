"""Where grid tasks run: one class per backend behind one small interface, and the registry that names them.

As in submitit's Executor/Job split, an executor submits tasks and hands back one job handle per task (the ledger
records them); later it tells the state of those jobs in the words of `utp_dist.states`. A new
backend is one subclass of Executor and one line in EXECUTORS.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote

import yaml

from utp_dist import states
from utp_dist.agent.client import Client, Conflict, Unreachable
from utp_dist.config import build_section, from_dict
from utp_dist.errors import UserError
from utp_dist.store.run_dir import versions
from utp_dist.sweep.resources import Resources
from utp_dist.sweep.task import TaskFailed, TaskRecord, TrainTask, process_alive

if TYPE_CHECKING:
    from utp_dist.sweep.worker import SearchWorker

SUBMITIT_DIR = "slurm"  # submitit's folder inside the sweep: pickles, sbatch files, task logs
LOCAL_LOGS = "local"


class Executor(abc.ABC):
    """One backend: submits a sweep's tasks, and tells the state of their jobs."""

    name: ClassVar[str]
    in_process: ClassVar[bool] = False  # whether run_here trains the tasks in the submitting process

    def __init__(self, resources: Resources, parallel: bool = False, server: str | None = None):
        self.resources, self.parallel, self.server = resources, parallel, server  # server: the dashboard executor's URL

    def check_available(self) -> None:
        """Raise a UserError when this backend cannot run here (called before the sweep folder is created)."""
        return None  # local processes need nothing beyond this Python

    def dry_run_files(self, folder: Path, job_name: str, count: int) -> dict[str, str]:
        """What --dry-run writes to show what would be submitted: {file name: text}."""
        return {}

    @abc.abstractmethod
    def submit(self, folder: Path, ledger: dict, indices: list[int]) -> dict[int, str]:
        """Start tasks `indices`; returns {task index: job handle} for ledger.record_submission."""

    def run_here(self, folder: Path, ledger: dict, indices: list[int]) -> bool:
        """Run the submitted tasks in this process when this backend does so; True when they have ended."""
        return False

    @abc.abstractmethod
    def states(self, folder: Path, ledger: dict, jobs: dict[int, str]) -> dict[int, str]:
        """{task index: state} of each task's newest job ({task index: job handle}), in the vocabulary of `states`."""

    def restarts(self, folder: Path, ledger: dict, jobs: dict[int, str]) -> dict[int, int]:
        """{task index: how often its run was started again}, from the records the tasks keep themselves."""
        return {task["index"]: max(0, TaskRecord(folder, task["index"]).read().get("attempts", 1) - 1) for task in ledger["tasks"]}

    def log_of(self, folder: Path, index: int, job: str) -> str | None:
        """Where task `index`'s job (`job`) wrote its output, for a failure without an error line (a crash, a kill)."""
        return None


class SlurmExecutor(Executor):
    """The tasks as ONE Slurm array job through submitit; states from Slurm accounting."""

    name = "slurm"

    def check_available(self) -> None:
        slurm_client("sbatch")

    def dry_run_files(self, folder: Path, job_name: str, count: int) -> dict[str, str]:
        from submitit.slurm.slurm import _make_sbatch_string

        submitit_folder = folder / SUBMITIT_DIR
        command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(submitit_folder))])
        script = _make_sbatch_string(
            command=command,
            folder=submitit_folder,
            map_count=count if count > 1 else None,
            **self.resources.submitit_parameters(job_name),
        )
        return {"array.sbatch": script}

    def submit(self, folder: Path, ledger: dict, indices: list[int]) -> dict[int, str]:
        """One array job; the handles are 'ARRAYID_N' (or the plain job id for one task)."""
        slurm_client("sbatch")
        import submitit

        max_requeues = self.resources.max_requeues
        executor = submitit.SlurmExecutor(folder=folder / SUBMITIT_DIR, max_num_timeout=max_requeues)
        executor.update_parameters(**self.resources.submitit_parameters(ledger["name"]))
        try:
            # submitit echoes sbatch's stderr before raising; the error below carries it, as one line
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():
                jobs = [executor.submit(_train_task(folder, ledger, i, max_requeues)) for i in indices]
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as err:
            raise UserError(f"sbatch refused the job: {_slurm_message(str(err))}") from None
        return {i: job.job_id for i, job in zip(indices, jobs, strict=True)}

    def log_of(self, folder: Path, index: int, job: str) -> str | None:
        return str(folder / SUBMITIT_DIR / f"{job}_0_log.err")  # submitit's %j_%t: the job (ARRAY_N), task rank 0

    def states(self, folder: Path, ledger: dict, jobs: dict[int, str]) -> dict[int, str]:
        accounting = sacct_states(sorted(set(jobs.values())))
        # a job sacct does not list yet was submitted moments ago: accounting lags behind sbatch
        return {index: states.from_slurm(accounting.get(job, "PENDING")) for index, job in jobs.items()}


class LocalExecutor(Executor):
    """A detached runner on this machine: the tasks one after another (or one per visible GPU), each in its own process."""

    name = "local"

    def submit(self, folder: Path, ledger: dict, indices: list[int]) -> dict[int, str]:
        """Start the runner; every task's handle is the runner's 'pid:N'."""
        logs = folder / LOCAL_LOGS
        logs.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "utp_dist.submit", "_run-local", str(folder), "--tasks", ",".join(map(str, indices))]
        if self.parallel or "search" in ledger:  # a search's workers all run at once: they share its trials
            cmd.append("--parallel")
        with open(logs / "runner.log", "ab") as log:
            runner = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return {i: f"pid:{runner.pid}" for i in indices}

    def log_of(self, folder: Path, index: int, job: str) -> str | None:
        return str(folder / LOCAL_LOGS / f"task-{index}.log")

    def states(self, folder: Path, ledger: dict, jobs: dict[int, str]) -> dict[int, str]:
        """From each task's own record; a task whose process is gone without a word is lost."""
        return {index: _process_state(TaskRecord(folder, index).read(), job) for index, job in jobs.items()}


class DebugExecutor(LocalExecutor):
    """In this process, one task after another, so breakpoints work; states as for local processes."""

    name = "debug"
    in_process = True

    def submit(self, folder: Path, ledger: dict, indices: list[int]) -> dict[int, str]:
        """Nothing starts yet (run_here trains them); every handle is this process."""
        return {i: f"pid:{os.getpid()}" for i in indices}

    def run_here(self, folder: Path, ledger: dict, indices: list[int]) -> bool:
        from utp_dist.trainer import reset_accelerate

        for index in indices:
            reset_accelerate()  # Accelerate's process-wide state belongs to the previous run
            run_task(folder, ledger, index)
        return True


RUN_PAGE = "/web/runs/"


class DashboardExecutor(Executor):
    """Each task as a config and a queued run of a dashboard (`--server URL`), in the project "sweep NAME"; its agents run them.

    The job handle is the run's page, SERVER/web/runs/ID, so `submit status`, `resubmit --failed` and `leaderboard`
    find the server again from the ledger; states come from the dashboard's queue.
    """

    name = "dashboard"

    def check_available(self) -> None:
        self._call(self._client(self.server), "GET", "/api/v1/projects?limit=1")

    def submit(self, folder: Path, ledger: dict, indices: list[int]) -> dict[int, str]:
        """A queued run per task; a task whose run stopped or failed on the dashboard is resumed there (same run folder)."""
        if "search" in ledger:
            raise UserError("a search on the dashboard has no workers to submit: its server queues the trials itself")
        handles: dict[int, str] = {}
        project = None
        for index in indices:
            task = ledger["tasks"][index]
            server, run_id = _run_page(task["jobs"][-1]) if task["jobs"] else (None, None)
            client = self._client(self.server or server)
            if run_id is not None and self._resumed(client, run_id):
                handles[index] = f"{client.server}{RUN_PAGE}{run_id}"
                continue
            if project is None:
                project = self._project(client, ledger["name"])
            config = self._first_attempt(task)
            made = self._config(client, project, task, config)
            queued = self._call(client, "POST", f"/api/v1/runs/from-config/{made}", {"gpus": self.resources.gpus_per_node})
            handles[index] = f"{client.server}{RUN_PAGE}{queued['run_id']}"
        return handles

    def states(self, folder: Path, ledger: dict, jobs: dict[int, str]) -> dict[int, str]:
        """One request per server: the state of every task's run (a deleted run is lost)."""
        return {index: states.from_queue((row or {}).get("state")) for index, row in self._by_run(jobs).items()}

    def log_of(self, folder: Path, index: int, job: str) -> str | None:
        return job  # the run's page, which shows its error and its log

    def restarts(self, folder: Path, ledger: dict, jobs: dict[int, str]) -> dict[int, int]:
        """The dashboard's count: the agents' tasks keep no record of their own."""
        return {index: (row or {}).get("restarts") or 0 for index, row in self._by_run(jobs).items()}

    def _by_run(self, jobs: dict[int, str]) -> dict[int, dict | None]:
        """{task index: its run's row of /api/v1/jobs/by-run (state, restarts, attempts), None for a deleted run}."""
        by_server: dict[str, dict[int, int]] = {}
        for index, handle in jobs.items():
            server, run_id = _run_page(handle)
            by_server.setdefault(server, {})[index] = run_id
        found: dict[int, dict | None] = {}
        for server, runs in by_server.items():
            query = "&".join(f"ids={run_id}" for run_id in runs.values())
            answer = self._call(self._client(server), "GET", f"/api/v1/jobs/by-run?{query}")
            found.update({index: answer.get(str(run_id)) for index, run_id in runs.items()})
        return found

    def _first_attempt(self, task: dict) -> dict:
        """The task's config as an agent's first attempt runs it (checkpoint.resume=never), its file and fingerprint updated.

        So the run's saved config has the task's fingerprint, and `submit status`, the leaderboard and the dashboard's
        sweep board find the run by it, as they do for the other executors.
        """
        path = Path(task["config"])
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        config.setdefault("checkpoint", {})["resume"] = "never"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        task["config_hash"] = from_dict(config, str(path)).fingerprint()  # the ledger is written after submit()
        return config

    def _client(self, server: str | None) -> Client:
        if not server:
            raise UserError("--server: the dashboard executor needs the dashboard's URL, e.g. --server http://127.0.0.1:8000")
        return Client(server)

    def _call(self, client: Client, method: str, path: str, body: dict | None = None):
        try:
            return client.call(method, path, body)
        except (Unreachable, Conflict) as err:
            raise UserError(f"dashboard {client.server}: {err}") from None

    def _resumed(self, client: Client, run_id: int) -> bool:
        """Put a stopped/failed/cancelled run back in the queue; False when it is not resumable (then a new run is queued)."""
        try:
            client.post(f"/api/v1/runs/{run_id}/resume", {})
        except Conflict:  # 409: not in a resumable state
            return False
        except UserError:  # 404: the run was deleted on the dashboard
            return False
        except Unreachable as err:
            raise UserError(f"dashboard {client.server}: {err}") from None
        return True

    def _config(self, client: Client, project: int, task: dict, config: dict) -> int:
        """The id of the task's config in the project: stored now, or the same one a resubmission stored before.

        A config name is unique in its project (409): a name taken by another config (another sweep of the same name)
        makes the task's config NAME-v1, NAME-v2, ...
        """
        for name in versions(task["name"]):
            try:
                return client.post("/api/v1/configs", {"project_id": project, "name": name, "config": config})["id"]
            except Conflict:
                stored = self._call(client, "GET", f"/api/v1/configs/project/{project}?name={quote(name)}")
                if stored and stored[0]["config_hash"] == task["config_hash"]:
                    return stored[0]["id"]
            except Unreachable as err:
                raise UserError(f"dashboard {client.server}: {err}") from None
        raise UserError(f"dashboard {client.server}: too many configs named '{task['name']}' in project {project}")

    def _project(self, client: Client, sweep: str) -> int:
        """The project "sweep NAME" that holds this sweep's configs (made on first use)."""
        name = f"sweep {sweep}"
        body = {"name": name, "description": "configs of a grid submitted with --executor dashboard"}
        try:
            return client.post("/api/v1/projects", body)["id"]
        except Conflict:  # 409: it exists already (a resubmission)
            projects = self._call(client, "GET", "/api/v1/projects?limit=500")
            return next(p["id"] for p in projects if p["name"] == name)
        except Unreachable as err:
            raise UserError(f"dashboard {client.server}: {err}") from None


def _run_page(handle: str) -> tuple[str, int]:
    """(server, run id) of a job handle SERVER/web/runs/ID."""
    server, _, run_id = handle.rpartition(RUN_PAGE)
    if not server or not run_id.isdigit():
        raise UserError(f"job handle {handle!r} is not a dashboard run page (SERVER{RUN_PAGE}ID)")
    return server, int(run_id)


EXECUTORS: dict[str, type[Executor]] = {
    executor.name: executor for executor in (SlurmExecutor, LocalExecutor, DebugExecutor, DashboardExecutor)
}


def of_ledger(folder: Path, ledger: dict) -> Executor:
    """The executor a sweep was submitted with, as its ledger records it."""
    from utp_dist.sweep.ledger import LEDGER

    where = folder / LEDGER
    if ledger.get("executor") not in EXECUTORS:
        raise UserError(f"{where}: executor '{ledger.get('executor')}' is not one of {', '.join(EXECUTORS)}")
    return EXECUTORS[ledger["executor"]](build_section(Resources, ledger["resources"], f"{where}: resources."))


def slurm_client(command: str = "sbatch") -> str:
    """Path of a Slurm client command, or a one-line error saying what to install."""
    path = shutil.which(command)
    if path is None:
        raise UserError(f"no Slurm client found ('{command}' is not on PATH); install slurm-client or use --executor local")
    return path


def sacct_states(job_ids: list[str], attempts: int = 5) -> dict[str, str]:
    """sacct's state of each job id (123 or 123_4); retried, since accounting lags a few seconds behind sbatch."""
    if not job_ids:
        return {}
    slurm_client("sacct")
    from submitit.slurm.slurm import SlurmInfoWatcher

    found: dict[str, str] | None = None
    error = "timed out"
    for attempt in range(attempts):
        try:
            out = subprocess.run(
                ["sacct", "-X", "-P", "--format=JobID,State", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            out = None
        if out is not None and out.returncode == 0:
            # submitit's parser expands a pending array's '123_[5-7%2]' line into its tasks
            found = {job: (info.get("State") or "UNKNOWN").split()[0] for job, info in SlurmInfoWatcher().read_info(out.stdout).items()}
            if all(j in found for j in job_ids):
                break
        elif out is not None:
            error = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        time.sleep(min(2.0, 0.5 * (attempt + 1)))
    if found is None:
        raise UserError(f"sacct failed ({error}); job states come from Slurm accounting: slurmdbd must be running")
    return found


def _slurm_message(text: str) -> str:
    """Slurm's own error lines out of submitit's exception text, joined into one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [re.sub(r"^sbatch: error:\s*", "", line) for line in lines if line.startswith("sbatch: error:")]
    return "; ".join(dict.fromkeys(errors)) if errors else (lines[-1] if lines else "no message")


def _process_state(record: dict, job: str) -> str:
    """State of a task run by a process of this machine, from its record; a task whose process is gone is lost."""
    state = states.from_record(record.get("state"))
    if state in (None, states.QUEUED):
        return states.QUEUED if process_alive(job) else states.LOST
    if state == states.RUNNING and not process_alive(str(record.get("pid"))):
        return states.LOST
    return state


def run_local(folder: Path, indices: list[int], parallel: bool) -> int:
    """The local runner: each task in its own process, CUDA_VISIBLE_DEVICES pinned to one GPU; returns the failures."""
    gpus = _visible_gpus()
    slots = gpus if parallel and gpus else gpus[:1] or [None]
    from utp_dist.sweep.ledger import read as read_ledger

    if parallel and "search" in read_ledger(folder):  # every worker at once, spread over the GPUs (or all on the CPU)
        slots = [slots[i % len(slots)] for i in range(len(indices))]
    queue, running, failures = list(indices), {}, 0
    while queue or running:
        while queue and len(running) < len(slots):
            slot = next(n for n in range(len(slots)) if n not in running.values())
            gpu, index = slots[slot], queue.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else dict(os.environ)
            with open(folder / LOCAL_LOGS / f"task-{index}.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "utp_dist.submit", "_task", str(folder), str(index)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            running[proc] = slot
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


def run_task(folder: Path, ledger: dict, index: int) -> int:
    """One task in this process (what the local runner starts per task, and debug runs in turn); 1 if it failed."""
    try:
        _train_task(folder, ledger, index)()
    except TaskFailed as err:
        print(f"utp_dist: task {index}: {err}", file=sys.stderr)
        return 1
    return 0


def _train_task(folder: Path, ledger: dict, index: int, max_requeues: int = 0) -> TrainTask | SearchWorker:
    """The callable of task `index` (what submitit pickles): a grid point's training, or a search's worker;
    max_requeues matters only under Slurm, which requeues it."""
    if "search" in ledger:
        from utp_dist.sweep.worker import SearchWorker  # the worker's study reads process liveness from this module

        return SearchWorker(str(folder), index, max_requeues)
    return TrainTask(ledger["tasks"][index]["config"], str(folder), index, max_requeues)
