"""How an agent runs a claimed job: the training command, its process, its run folder, its progress and its outcome.

The child is told where to write its handshake (utp_dist.store.handshake): it names its run folder there once it has
claimed it, and its outcome at its end; the agent reads that file and nothing else to learn either.
`Runner` is the one place that starts processes; tests hand the agent a subclass whose children do nothing, so the
claim/lease machinery can be raced with hundreds of jobs in seconds.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from utp_dist.config import ConfigError, from_dict
from utp_dist.errors import one_line
from utp_dist.registry import IMPORT_ENV, check_references
from utp_dist.store import handshake, runfiles
from utp_dist.store.run_dir import RunDir
from utp_dist.train_command import EXPECT_CUDA_ENV

PR_SET_PDEATHSIG = 1


class Child:
    """One training process of a claimed job: its log, its handshake file, and signals to its process group."""

    def __init__(self, job: dict, proc: subprocess.Popen, log: Path, handshake_file: Path, folder: RunDir | None):
        self.job, self.proc, self.log, self.handshake_file, self.folder = job, proc, log, handshake_file, folder

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code once the process ended (negative: killed by that signal), else None."""
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        """Send a signal to the whole process group (the launcher and every rank)."""
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the group and reap it: for a job this agent no longer holds, nothing may keep writing the run."""
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def run_folder(self) -> RunDir | None:
        """The run folder this process writes, as its handshake names it (a continued run's is known before)."""
        named = handshake.read(self.handshake_file).run_folder
        if named is not None:
            self.folder = named
        return self.folder

    def progress(self) -> dict:
        """Epoch, step, best so far, img/s and restarts from the run's own files, plus the tail of the process's output."""
        values = {"log_tail": runfiles.tail(self.log)}
        folder = self.run_folder()
        if folder is not None:
            found = runfiles.progress(folder, folder.read_config())
            values.update({k: found[k] for k in ("epoch", "step", "best_metric", "best", "img_per_s", "restarts")})
            values["run_folder"] = {"root": str(folder.root), "dataset": folder.dataset, "name": folder.name}
            self.mirror_log(folder)
        return values

    def mirror_log(self, folder: RunDir) -> None:
        """Append what the process printed since the last report to a copy in the run's log folder: each attempt's output
        stays with the run (this agent's file is on this machine only), for the run page to link."""
        copy = folder.logs / self.log.name
        try:
            done = copy.stat().st_size if copy.exists() else 0  # the copy's length is how far it got: no state to lose
            with open(self.log, "rb") as source, open(copy, "ab") as target:
                source.seek(done)
                shutil.copyfileobj(source, target)
        except OSError:  # a run folder that went away: the server still has the tail the agent reports
            pass

    def error(self) -> str | None:
        """The one-line error the training ended with, as its handshake says (None: it ended well, or never said)."""
        return handshake.read(self.handshake_file).error


class Runner:
    """Starts `python -m utp_dist.train` (or `python -m utp_dist.launch` for several GPUs) for a claimed job."""

    def __init__(self, workdir: Path, allow_import: tuple[str, ...] = ()):
        self.workdir, self.allow_import = workdir, allow_import
        self.workdir.mkdir(parents=True, exist_ok=True)

    def cannot_run(self, job: dict) -> str | None:
        """Why this machine cannot run the job (it names code nobody allowed, its output root is not writable here), or None."""
        try:
            cfg = from_dict(job["config"], job["config_name"])
        except ConfigError as err:
            return f"its config does not load here: {one_line(err)}"
        try:
            # the server checked it when it was stored; a row written into the database by other means is caught here
            check_references(cfg, self.allow_import)
        except ConfigError as err:
            return f"its config names code this agent does not run: {one_line(err)}"
        root = Path(cfg.output.root)
        existing = next((p for p in (root.resolve(), *root.resolve().parents) if p.exists()), None)
        # the nearest existing folder decides whether the run's folders can be made (a file on the way: never)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            return (
                f"output.root '{root}' is not writable on {socket.gethostname()} (share it with the other agents, or fix its permissions)"
            )
        return None

    def command(self, config_file: Path, gpus: list[str], resume: str) -> list[str]:
        """The training command: one process for a CPU or 1-GPU job, utp_dist.launch with one process per GPU beyond that.

        utp_dist.launch (torchrun's options) exits with the ranks' own code, so a stopped N-GPU job is 75 (resumable)
        and a refused one 2, as a 1-GPU job; accelerate's and torchrun's launchers turn both into 1.
        """
        train = ["-m", "utp_dist.train", str(config_file), f"checkpoint.resume={resume}"]
        if len(gpus) <= 1:
            return [sys.executable, *train]
        launch = ["-m", "utp_dist.launch", "--nproc_per_node", str(len(gpus)), "--master_addr", "127.0.0.1"]
        return [sys.executable, *launch, "--master_port", str(_free_port()), *train]

    def start(self, job: dict, gpus: list[str]) -> Child:
        """Write the job's config, start its process (seeing only `gpus`), and return it; continues the run an earlier attempt made."""
        stem = f"job-{job['job_id']}-attempt-{job['attempt']}"
        config_file = self.workdir / f"{stem}.yaml"
        config_file.write_text(yaml.safe_dump(job["config"], sort_keys=False), encoding="utf-8")
        folder = RunDir(**job["run_folder"]) if job.get("run_folder") else None
        # a later attempt continues the run's newest complete state; with none (it died before its first save) it starts anew
        resume = str(folder.checkpoints) if folder is not None and folder.states() else "never"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}  # "" hides every GPU from a CPU job
        if self.allow_import:  # the names the allowed modules register resolve in the training process too
            env[IMPORT_ENV] = ",".join(self.allow_import)
        # CUDA numbers GPUs as NVML (the agent's inventory) does; the training fails at start if it sees fewer than it was given
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", **{EXPECT_CUDA_ENV: str(len(gpus))})
        told = self.workdir / f"{stem}.handshake.json"
        told.unlink(missing_ok=True)  # the same attempt started again (an agent restarted): only this process's word counts
        env[handshake.HANDSHAKE_ENV] = str(told)
        log = self.workdir / f"{stem}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.command(config_file, gpus, resume),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: abort and kill reach every rank
                preexec_fn=_die_with_parent,
            )
        return Child(job, proc, log, told, folder if resume != "never" else None)


def _die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it when the agent dies, so a killed agent leaves no writer behind."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the lease and the run lock still keep a second writer out
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
