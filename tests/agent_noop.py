"""`python tests/agent_noop.py --server URL ...`: a real agent process whose jobs do nothing and succeed.

Each claim is appended to $UTP_TEST_CLAIMS as "JOB ATTEMPT AGENT_PID START GPUS", so the race test can count double
claims and the GPU test can check that no two jobs overlapped on one GPU. A job "runs" $UTP_TEST_NOOP_SECONDS (0), or
until SIGTERM, which it answers like the training does: exit 75.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utp_dist.agent.__main__ import main  # noqa: E402
from utp_dist.agent.runner import Runner  # noqa: E402


class NoopChild:
    """A finished process: exit code 0, no run folder, no output."""

    def __init__(self, job: dict):
        self.job, self.pid = job, os.getpid()
        self.code, self.ends = 0, time.monotonic() + float(os.environ.get("UTP_TEST_NOOP_SECONDS", "0"))

    def poll(self) -> int | None:
        return self.code if time.monotonic() >= self.ends else None

    def signal(self, signum: int) -> None:
        if signum == signal.SIGTERM:  # as utp_dist.train does: save, then exit 75 (stopped, resumable)
            self.code, self.ends = 75, 0.0

    def kill(self) -> None:
        pass

    def progress(self) -> dict:
        return {"log_tail": ""}

    def error(self) -> None:
        return None


class NoopRunner(Runner):
    """Claims are recorded, nothing is trained."""

    def cannot_run(self, job: dict) -> None:
        return None

    def start(self, job: dict, gpus: list[str]) -> NoopChild:
        with open(os.environ["UTP_TEST_CLAIMS"], "a") as out:  # one short O_APPEND write per claim: lines never interleave
            out.write(f"{job['job_id']} {job['attempt']} {os.getpid()} {time.time():.3f} {','.join(gpus) or '-'}\n")
        return NoopChild(job)


if __name__ == "__main__":
    sys.exit(main(runner_class=NoopRunner))
