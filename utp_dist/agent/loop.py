"""The agent's loop: heartbeat (renew leases, abort, kill what it lost), report progress and outcomes, claim what fits.

One thread does everything, in turn, so no lock is needed and a child is forked from a single-threaded process.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from dataclasses import dataclass, field

from utp_dist.agent.client import Client, Conflict, Gone, Unreachable
from utp_dist.agent.runner import Child, Runner
from utp_dist.errors import UserError
from utp_dist.system_metrics import GpuReader

log = logging.getLogger("utp_dist.agent")
PROGRESS_EVERY_S = 2.0


@dataclass
class Slot:
    """A job this agent runs: its process and the GPUs it holds."""

    child: Child
    gpus: list[str]
    aborted: bool = False
    started: bool = False  # the server knows it runs (claimed -> running); retried when the server did not answer
    orphan: bool = False  # the server has no row for its job any more (a reset database): it finishes unreported
    reported: float = field(default=0.0)


class Agent:
    """Takes jobs from one dashboard and runs them with `runner`, never two on one GPU and at most `cpu_jobs` CPU jobs at once."""

    def __init__(self, client: Client, name: str, gpus: list[dict], runner: Runner, poll_s: float = 2.0, cpu_jobs: int = 1, drain=False):
        self.client, self.name, self.inventory, self.runner = client, name, gpus, runner
        self.poll_s, self.cpu_jobs, self.drain_flag = poll_s, cpu_jobs, drain
        self.gpus = [str(g["index"]) for g in gpus]
        self.usage = GpuReader(visible=",".join(self.gpus)) if gpus else None  # each heartbeat says what the GPUs are doing
        self.slots: dict[int, Slot] = {}
        self.refused: set[int] = set()
        self.agent_id: int | None = None
        self.heartbeat_s, self.last_beat, self.drained, self.stopping = 10.0, 0.0, drain, False

    # --- the loop

    def run(self) -> int:
        """Serve until stopped: with --drain, or after SIGTERM/SIGINT, once nothing runs any more."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.register()
        while True:
            busy = False
            try:
                if time.monotonic() - self.last_beat >= self.heartbeat_s:
                    self.beat()
                busy |= self.collect()
                self.report()
                if (self.drain_flag or self.stopping) and not self.slots:
                    log.info("agent %s: nothing left to run; exiting", self.name)
                    return 0
                if not (self.drained or self.stopping):
                    busy |= self.claim()
            except Unreachable as err:  # a restarting server: children keep running, leases are renewed once it is back
                log.warning("agent %s: %s; trying again", self.name, err)
            except Conflict as err:  # a job changed under a call that is not about a running child (a refusal, a failed start)
                log.warning("agent %s: %s", self.name, err)
            except Gone as err:  # the server forgot this agent or a job: children keep running
                self.recover(err)
            if not busy:
                time.sleep(self.poll_s)

    def _stop(self, signum, _frame) -> None:
        """SIGTERM/SIGINT: claim nothing more and ask every child to save and stop (exit 75: the jobs become stopped)."""
        if not self.stopping:
            log.info("agent %s: %s: stopping its runs (they save and exit 75)", self.name, signal.Signals(signum).name)
            self.stopping = True
            for slot in self.slots.values():
                slot.child.signal(signal.SIGTERM)

    def register(self) -> None:
        """Announce this agent and its GPUs; retried until the server answers. A live agent of the same name: one line, exit 2."""
        body = {"name": self.name, "host": socket.gethostname(), "gpus": self.inventory, "drain": self.drain_flag}
        while True:
            try:
                answer = self.client.post("/api/v1/agents/register", body)
                break
            except Unreachable as err:
                log.warning("agent %s: cannot register yet (%s)", self.name, err)
                time.sleep(self.poll_s)
            except Conflict as err:
                raise UserError(str(err)) from None
        self.agent_id, self.heartbeat_s = answer["agent_id"], answer["heartbeat_seconds"]
        log.info("agent %s: registered as %d with GPUs [%s]", self.name, self.agent_id, ",".join(self.gpus))

    def recover(self, err: Gone) -> None:
        """The server answered 404 (the agent was deleted, its database reset): register again; running jobs keep running.

        The next heartbeat tells the server which jobs this agent still runs: it takes back the ones it still has a row
        for (the same run, the same attempt), and the ones it has no row for finish unreported, indexed from their folders.
        """
        log.warning("agent %s: %s; registering again (its %d running job(s) keep running)", self.name, err, len(self.slots))
        try:
            self.beat()
            return
        except Gone:
            pass
        self.register()
        self.beat()

    def beat(self) -> None:
        """Renew the leases; SIGTERM what a user aborted; SIGKILL at once what this agent no longer holds."""
        held = [{"job_id": job_id, "attempt": slot.child.job["attempt"]} for job_id, slot in self.slots.items() if not slot.orphan]
        body = {"jobs": held, "name": self.name, "gpus": self.gpu_usage()}
        answer = self.client.post(f"/api/v1/agents/{self.agent_id}/heartbeat", body)
        self.last_beat = time.monotonic()
        self.drained = answer["drain"] or self.drain_flag
        for job_id in answer["lost"]:
            self.lose(job_id)
        for job_id in answer.get("unknown", []):
            slot = self.slots[job_id]
            log.warning(
                "agent %s: the server has no job %d any more: pid %d trains on, its run is indexed from its folder",
                self.name,
                job_id,
                slot.child.pid,
            )
            slot.orphan = True
        for job_id in answer["abort"]:
            slot = self.slots.get(job_id)
            if slot is not None and not slot.aborted:
                log.info("agent %s: job %d aborted: SIGTERM to pid %d", self.name, job_id, slot.child.pid)
                slot.child.signal(signal.SIGTERM)
                slot.aborted = True

    def gpu_usage(self) -> list[dict]:
        """Utilisation and memory in use of each of this agent's GPUs, as NVML reports them now."""
        if self.usage is None:
            return []
        found = []
        for label, values in self.usage.readings():
            usage = {"index": int(label), "util": values.get("util")}
            if "memory_used_mb" in values:
                usage["memory_used_mb"] = int(values["memory_used_mb"])
            found.append(usage)
        return found

    def lose(self, job_id: int) -> None:
        """The job is not ours any more (lease expired, cancelled): its process must not write another byte."""
        slot = self.slots.pop(job_id, None)
        if slot is not None:
            log.warning("agent %s: job %d is no longer held by this agent: killing pid %d", self.name, job_id, slot.child.pid)
            slot.child.kill()

    def collect(self) -> bool:
        """Report every ended process (its progress, then its exit code); True when one ended."""
        ended = [(job_id, slot, slot.child.poll()) for job_id, slot in list(self.slots.items())]
        ended = [(job_id, slot, code) for job_id, slot, code in ended if code is not None]
        for job_id, slot, code in ended:
            if slot.orphan:
                log.info("agent %s: job %d (unknown to the server) ended with exit code %d", self.name, job_id, code)
                self.slots.pop(job_id)
                continue
            if not slot.started and not self.started(job_id):  # a start the server never heard of: say it first
                continue
            child, last = slot.child, slot.child.progress()
            try:
                self.job_call(job_id, "progress", last)
                self.job_call(job_id, "finish", {"exit_code": code, "error": child.error(), "log_tail": last["log_tail"]})
                log.info("agent %s: job %d ended with exit code %d", self.name, job_id, code)
            except Conflict:
                pass  # taken from us meanwhile: the new holder's outcome counts
            self.slots.pop(job_id, None)
        return bool(ended)

    def report(self) -> None:
        """Progress of each running process, every few seconds."""
        for job_id, slot in list(self.slots.items()):
            if slot.orphan or (not slot.started and not self.started(job_id)):
                continue
            if time.monotonic() - slot.reported >= PROGRESS_EVERY_S:
                slot.reported = time.monotonic()
                try:
                    self.job_call(job_id, "progress", slot.child.progress())
                except Conflict:
                    self.lose(job_id)

    def claim(self) -> bool:
        """Claim and start jobs while GPUs (or a CPU slot) are free; True when one started."""
        started = False
        while True:
            free = self.free_gpus()
            cpu = sum(1 for s in self.slots.values() if not s.gpus) < self.cpu_jobs
            if not free and not cpu:
                return started
            body = {"agent_id": self.agent_id, "free_gpus": len(free), "cpu": cpu, "refused": sorted(self.refused)}
            job = self.client.post("/api/v1/jobs/claim", body)["job"]
            if job is None:
                return started
            started |= self.launch(job, free[: job["gpus"]])

    def launch(self, job: dict, gpus: list[str]) -> bool:
        """Start a claimed job's process and tell the server (or refuse the job with the reason); True when it started."""
        job_id = job["job_id"]
        reason = self.runner.cannot_run(job)
        if reason is not None:
            log.warning("agent %s: refusing job %d: %s", self.name, job_id, reason)
            self.refused.add(job_id)
            self.job_call(job_id, "refuse", {"reason": reason}, attempt=job["attempt"])
            return False
        try:
            child = self.runner.start(job, gpus)
        except OSError as err:
            self.job_call(
                job_id, "finish", {"exit_code": 127, "error": None, "log_tail": f"cannot start the training: {err}"}, job["attempt"]
            )
            return False
        self.slots[job_id] = Slot(child, gpus)
        if not self.started(job_id):
            return False
        log.info("agent %s: job %d attempt %d started as pid %d on GPUs [%s]", self.name, job_id, job["attempt"], child.pid, ",".join(gpus))
        return True

    def started(self, job_id: int) -> bool:
        """Tell the server the job's process runs (claimed -> running); False when the job is not ours any more."""
        slot = self.slots[job_id]
        try:
            self.job_call(job_id, "start", {"pid": slot.child.pid})
        except Conflict:
            self.lose(job_id)
            return False
        slot.started = True
        return True

    def free_gpus(self) -> list[str]:
        """GPUs no running job of this agent holds."""
        taken = {gpu for slot in self.slots.values() for gpu in slot.gpus}
        return [gpu for gpu in self.gpus if gpu not in taken]

    def job_call(self, job_id: int, action: str, body: dict, attempt: int | None = None) -> None:
        """POST /api/v1/jobs/{id}/{action} with this agent's id and the attempt it holds (its fencing token)."""
        if attempt is None:
            attempt = self.slots[job_id].child.job["attempt"]
        self.client.post(f"/api/v1/jobs/{job_id}/{action}", {**body, "agent_id": self.agent_id, "attempt": attempt})
