"""A search worker (one Slurm array task, one local process, or the debug executor's loop): takes the next piece of
work from the study, trains it in this process, reports its rung value, until the search has nothing left to do."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from utp_dist.preemption import EXIT_RESUMABLE
from utp_dist.store import atomic
from utp_dist.store.checkpoint import read_identity
from utp_dist.sweep import ledger as ledgers
from utp_dist.sweep.search import parse_search
from utp_dist.sweep.study import HEARTBEAT_S, Study, prepare_run, trial_run
from utp_dist.sweep.task import TaskFailed, attempt

POLL_S = 2.0  # how often an idle worker looks again for a promotion or an orphan while others train


class SearchWorker:
    """Callable submitted per worker; requeued by Slurm, it first continues the trial it was training."""

    def __init__(self, sweep_dir: str, index: int, max_requeues: int, requeues: int = 0):
        self.sweep_dir, self.index, self.max_requeues, self.requeues = sweep_dir, index, max_requeues, requeues

    def __call__(self) -> int:
        # requeued, the trial keeps this worker's lease and the requeued worker continues it; stopped by a signal,
        # rank 0 decides about the requeue under Slurm
        code, _, requeued = attempt(self.sweep_dir, self.index, lambda: (*work(Path(self.sweep_dir), self.index), None))
        if requeued or code == EXIT_RESUMABLE:
            return code
        if code != 0:
            raise TaskFailed(f"search worker {self.index} ended with {code}; its log says why")
        return code

    def checkpoint(self) -> object:
        """What submitit requeues: the same worker, which continues its trial from the newest state."""
        import submitit

        if self.requeues >= self.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(SearchWorker(self.sweep_dir, self.index, self.max_requeues, self.requeues + 1))


def work(folder: Path, index: int, poll: float = POLL_S) -> tuple[int, int | None]:
    """The worker loop; (exit code, the stop signal that ended it or None). A failed trial does not end the loop.

    Under DDP (a worker task of several processes) rank 0 alone talks to the study and hands each piece of work to the
    other ranks through the sweep folder; every rank then trains it, and pauses at the same epoch (train.stop_at_epoch).
    """
    ledger = ledgers.read(folder)
    study = Study(folder, parse_search(Path(ledger["search_file"]), ledger["search"]))
    handoff = Handoff(folder, index)
    while True:
        trial = handoff.next(lambda: _next(study, index, poll))
        if trial is None:
            return 0, None
        code, stop_signal = train_segment(study, trial, report=handoff.rank == 0)
        if stop_signal is not None:
            if stop_signal == signal.SIGUSR2 and os.environ.get("SLURM_JOB_ID") and handoff.rank == 0:
                study.hold(trial["number"])  # Slurm's timeout/preemption warning: this worker is requeued and goes on with it
            print(f"utp_dist: search worker {index}: stopped by signal {stop_signal} in trial {trial['number']}", file=sys.stderr)
            return code, stop_signal


def _next(study: Study, index: int, poll: float) -> dict | None:
    """The next trial to train (leased to this worker, its stale run folder cleared), or None once the search is done."""
    while True:
        trial = study.next_work(index)
        if trial is not None:
            prepare_run(trial)
            return trial
        if study.finished():
            return None
        time.sleep(poll)


class Handoff:
    """Rank 0's decisions, handed to the other ranks of the same worker task: SWEEP/workers/K/RESTART-SEQ.json."""

    def __init__(self, folder: Path, index: int):
        self.rank = int(os.environ.get("RANK", "0"))
        self.folder = folder / "workers" / str(index)
        self.restart, self.seq = os.environ.get("SLURM_RESTART_COUNT", "0"), 0

    def next(self, decide) -> dict | None:
        """What rank 0's `decide()` returned (None: the search is done), on every rank."""
        path = self.folder / f"{self.restart}-{self.seq}.json"
        self.seq += 1
        if self.rank == 0:
            trial = decide()
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic.write_json(path, {"trial": trial})
            return trial
        while not path.is_file():
            time.sleep(0.2)
        return json.loads(path.read_text())["trial"]


def train_segment(study: Study, trial: dict, report: bool = True) -> tuple[int, int | None]:
    """Train trial `trial` up to its target rung (a pause there), renewing its lease meanwhile; `report` the result
    (rank 0)."""
    from utp_dist.train_command import run

    target, last = trial["target"], study.search.max_epochs
    if reached(trial, target):  # its worker died between the pause and the report: nothing to train, only to report
        if report:
            study.report(trial["number"], 0 if target == last else EXIT_RESUMABLE, paused=target < last)
        return 0, None
    print(f"utp_dist: trial {trial['number']}: training to epoch {target} of {last} ({trial['params']})", file=sys.stderr, flush=True)
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            study.heartbeat(trial["number"])

    thread = threading.Thread(target=beat, daemon=True)
    if report:
        thread.start()
    try:
        outcome = run([trial["config"], f"train.stop_at_epoch={target if target < last else 'null'}"])
    finally:
        done.set()
        if report:
            thread.join()
    paused = outcome.code == EXIT_RESUMABLE and outcome.stop_signal is None
    if outcome.code == EXIT_RESUMABLE and not paused:
        return outcome.code, outcome.stop_signal
    if report:
        study.report(trial["number"], outcome.code, paused)
    return outcome.code, None


def reached(trial: dict, epochs: int) -> bool:
    """Whether the trial's run has a state saved after `epochs` epochs (or later) and the evaluation of that epoch."""
    run = trial_run(trial)
    states = run.states() if run is not None else []
    if not states or read_identity(states[-1])["epoch"] < epochs:
        return False
    return any(line.get("split") == "val" and line.get("epoch") == epochs - 1 for line in run.read_metrics())
