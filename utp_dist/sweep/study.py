"""A search's study and its trials: Optuna samples and keeps the reported values; utp_dist owns liveness and state.

Every trial has a record, SWEEP_DIR/trials/NNN.json, written only under the search lock (SWEEP_DIR/search.lock): its
params, state (TRIAL_STATES), the value at each rung reached, the epochs its current segment trains to, and the lease
of the worker training it (worker, host, pid, heartbeat). A worker takes the next piece of work under that lock: a
promoted trial, a trial whose worker lost its lease, or a new trial from the sampler. Optuna's own RUNNING state is
never read: a paused trial stays RUNNING in the study, and a dead worker's trial is found by its lease.

The rung rule is asynchronous successive halving (ASHA) over the values reported at each rung: while a rung may still
get results, the top floor(n / reduction) of its n trials are promoted; once no trial can reach it any more (the
budget is spent and every trial is past it or ended), the top ceil(n / reduction) are, and the rest are stopped early.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from utp_dist import states
from utp_dist.store import atomic
from utp_dist.store.lock import RunLock
from utp_dist.store.run_dir import RunDir, find_runs
from utp_dist.sweep.search import Search
from utp_dist.sweep.task import _job_id, process_alive

# a trial's states are words of the one vocabulary (utp_dist.states); one that trained its full budget has succeeded
RUNNING, PAUSED, PROMOTED, STOPPED_EARLY, COMPLETED, FAILED = (
    states.RUNNING,
    states.PAUSED,
    states.PROMOTED,
    states.STOPPED_EARLY,
    states.SUCCEEDED,
    states.FAILED,
)
TRIAL_STATES = states.TRIAL
ENDED = frozenset({STOPPED_EARLY, COMPLETED, FAILED})
TRIALS, CONFIGS, LOCK, DATABASE = "trials", "configs", "search.lock", "study.db"
HEARTBEAT_S = 15.0  # a worker renews its trial's lease this often
LEASE_S = 120.0  # a lease not renewed for this long is lost (on another host; on this one a dead pid loses it at once)


class Study:
    """The trials of one search (its sweep folder) and the Optuna study behind them."""

    def __init__(self, folder: Path, search: Search):
        self.folder, self.search = folder, search
        self.trials_dir = folder / TRIALS
        self._study = None

    # -- the Optuna side -------------------------------------------------------------------------------------------

    @property
    def storage(self) -> str:
        """search.storage, or a SQLite file in the sweep folder."""
        return self.search.storage or f"sqlite:///{self.folder / DATABASE}"

    @property
    def optuna(self):
        """The Optuna study (created on first use; every worker loads the same one)."""
        if self._study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            direction = "maximize" if self.search.mode == "max" else "minimize"
            self._study = optuna.create_study(storage=self.storage, study_name=self.folder.name, direction=direction, load_if_exists=True)
        return self._study

    # -- records ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[list[dict]]:
        """Hold the search lock; yields every trial record (changes are written with save())."""
        self.trials_dir.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield self.records()

    def records(self) -> list[dict]:
        """Every trial record, by number (readers outside the lock see each file whole: they are replaced atomically)."""
        out = []
        for path in sorted(self.trials_dir.glob("*.json")) if self.trials_dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out

    def save(self, record: dict) -> None:
        atomic.write_json(self.trials_dir / f"{record['number']:03d}.json", record)

    # -- taking work -----------------------------------------------------------------------------------------------

    def next_work(self, worker: int) -> dict | None:
        """Claim the next piece of work for `worker` (the record, leased to it), or None when there is none now."""
        with self.locked() as records:
            self._decide(records)
            # this worker's own trial from before a requeue (same Slurm task: the old process is gone) or a crash
            mine = [r for r in records if r["state"] == RUNNING and r.get("worker") == worker and (_same_job(r) or not alive(r))]
            waiting = sorted((r for r in records if r["state"] == PROMOTED), key=lambda r: (-r["rung"], r["number"]))
            orphans = [r for r in records if r["state"] == RUNNING and not alive(r)]
            for record in (*mine, *waiting, *orphans):
                if record["state"] == PROMOTED:
                    record["target"] = self.search.rungs[record["rung"] + 1]
                return self._lease(record, worker)
            if len(records) < self.search.trials:
                return self._lease(self._new(len(records)), worker)
            return None

    def finished(self) -> bool:
        """Whether the search has nothing left to do: every trial sampled and ended (rungs decided)."""
        with self.locked() as records:
            self._decide(records)
            return len(records) >= self.search.trials and all(r["state"] in ENDED for r in records)

    def _new(self, number: int) -> dict:
        study = self.optuna
        study.sampler = self.search.sampler(number)
        distributions = self.search.distributions()
        if self.search.asha and type(study.sampler).__name__ == "TPESampler":
            params, known = self._drawn_from_rungs(study, distributions)
            study.enqueue_trial(params, user_attrs={"drawn_from_trials": known})  # TPE models once known >= n_startup_trials
        trial = study.ask(distributions)
        run_name = f"{self.folder.name}__trial-{trial.number:03d}"
        config = self.search.config(trial.params, run_name)
        path = self.folder / CONFIGS / f"trial-{trial.number:03d}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(config.to_yaml(), encoding="utf-8")
        return {
            "number": trial.number,
            "trial_id": trial._trial_id,  # what optuna.trial.Trial(study, id) needs to report a rung from any process
            "params": trial.params,
            "config": str(path),
            "output_root": config.output.root,
            "run": run_name,
            "state": RUNNING,
            "rung": -1,
            "values": {},
            "target": self.search.rungs[0],
            "attempts": 0,
            "created": time.time(),
        }

    def _drawn_from_rungs(self, study, distributions: dict) -> tuple[dict, int]:
        """TPE's draw from what the rungs say so far: a trial paused at a rung is RUNNING to Optuna, and TPE reads only
        ended trials, so under ASHA it would draw at random until the rungs close at the very end. In a copy of the
        study each paused trial counts as pruned at its rung (TPE ranks those by the rung reached, then the value)."""
        import optuna
        from optuna.trial import TrialState, create_trial

        view = optuna.create_study(direction=study.direction, sampler=study.sampler)
        for trial in study.get_trials(deepcopy=False):
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                view.add_trial(trial)
            elif trial.state == TrialState.RUNNING and trial.intermediate_values:
                paused = {"params": trial.params, "distributions": trial.distributions, "intermediate_values": trial.intermediate_values}
                view.add_trial(create_trial(state=TrialState.PRUNED, **paused))
        known = len(view.trials)
        return view.ask(distributions).params, known

    def _lease(self, record: dict, worker: int) -> dict:
        record.update(
            state=RUNNING,
            worker=worker,
            host=socket.gethostname(),
            pid=os.getpid(),
            job=_job_id(),
            heartbeat=time.time(),
            attempts=record.get("attempts", 0) + 1,
            held=False,
            error=None,
        )
        self.save(record)
        return record

    def hold(self, number: int) -> None:
        """Keep trial `number` for this worker while Slurm requeues it: its lease lives on for LEASE_S without a pid,
        so the requeued worker (same job) continues it rather than another worker."""
        with self.locked() as records:
            record = next((r for r in records if r["number"] == number), None)
            if record is not None and record["state"] == RUNNING:
                record.update(pid=None, held=True, heartbeat=time.time())
                self.save(record)

    def heartbeat(self, number: int) -> None:
        """Renew the lease of trial `number` (held by this process)."""
        with self.locked() as records:
            record = next((r for r in records if r["number"] == number), None)
            if record is not None and record["state"] == RUNNING and record.get("pid") == os.getpid():
                record["heartbeat"] = time.time()
                self.save(record)

    # -- results ---------------------------------------------------------------------------------------------------

    def report(self, number: int, code: int, paused: bool) -> dict:
        """After a segment of trial `number` ended with exit `code` (`paused`: at its target rung, not by a signal): record
        its rung value, or its failure; decide the rungs."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import Trial

        with self.locked() as records:
            record = next(r for r in records if r["number"] == number)
            value = rung_value(record, record["target"], self.search.metric)
            if (code == 0 or paused) and value is not None:
                record["rung"] = self.search.rungs.index(record["target"])
                record["values"][str(record["target"])] = value
                if math.isfinite(value):
                    with contextlib.suppress(UpdateFinishedTrialError):  # reported and told before its worker died
                        Trial(self.optuna, record["trial_id"]).report(value, record["target"])
                record["state"] = COMPLETED if code == 0 else PAUSED
                if code == 0:
                    self._tell(record["number"], value)
            elif code == 0 or paused:
                record.update(state=FAILED, error=f"no {self.search.metric} after epoch {record['target']} in its metrics.jsonl")
            else:
                record.update(state=FAILED, error=f"exit {code}; see the worker's log")
            record.update(pid=None, heartbeat=time.time())
            self.save(record)
            self._decide(records)
            return record

    def _decide(self, records: list[dict]) -> None:
        """Promote (and, for a rung that can get no more results, stop early) paused trials; see the module docstring."""
        rungs, factor = self.search.rungs, self.search.asha.reduction if self.search.asha else 2
        sampled = len(records) >= self.search.trials
        sign = -1 if self.search.mode == "max" else 1
        for k in range(len(rungs) - 1):
            reached = [r for r in records if r["rung"] >= k]
            closed = sampled and all(r["rung"] >= k or r["state"] in ENDED for r in records)
            if not reached:
                continue
            ranked = sorted(reached, key=lambda r: _sort_key(r["values"].get(str(rungs[k])), sign))
            quota = math.ceil(len(ranked) / factor) if closed else len(ranked) // factor
            for place, record in enumerate(ranked):
                if record["state"] != PAUSED or record["rung"] != k:
                    continue
                if place < quota and _sort_key(record["values"].get(str(rungs[k])), sign)[0] == 0:
                    record["state"] = PROMOTED
                    self.save(record)
                elif closed:
                    self._stop_early(record)

    def _stop_early(self, record: dict) -> None:
        """No promotion can reach it any more: end it in the study and keep only its best export."""
        from optuna.trial import TrialState

        record["state"] = STOPPED_EARLY
        self.save(record)
        self._tell(record["number"], state=TrialState.PRUNED)
        run = trial_run(record)
        if run is not None:
            shutil.rmtree(run.state_dir, ignore_errors=True)

    def _tell(self, number: int, value: float | None = None, state=None) -> None:
        """End a trial in the study; one told already (a crash between the tell and its record) is left as it is."""
        try:
            self.optuna.tell(number, value, state=state, skip_if_finished=True)
        except RuntimeError as err:
            # GridSampler calls study.stop() once the grid is walked, which raises outside study.optimize(); the
            # trial is told by then
            if "Study.stop" not in str(err):
                raise


def _sort_key(value, sign: int) -> tuple:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    return (0, sign * value) if ok else (1, 0.0)


def trial_run(record: dict) -> RunDir | None:
    """The run folder of a trial (named exactly as its config pins it), None before it made one."""
    return next((run for run in find_runs(record["output_root"], record["run"]) if run.name == record["run"]), None)


def rung_value(record: dict, epochs: int, metric: str) -> float | None:
    """The trial's validation `metric` after `epochs` epochs, from its run's metrics.jsonl."""
    run = trial_run(record)
    if run is None:
        return None
    lines = [line for line in run.read_metrics() if line.get("split") == "val" and line.get("epoch") == epochs - 1]
    value = lines[-1].get(metric) if lines else None
    return float(value) if isinstance(value, (int, float)) else None


def prepare_run(record: dict) -> None:
    """Before a trial trains: a run folder a dead worker left without any state has nothing to continue, so it goes
    (the trial then claims the same name again, never NAME-v1)."""
    run = trial_run(record)
    if run is not None and not run.states() and not run.is_finished() and RunLock(run).holder() is None:
        shutil.rmtree(run.logs, ignore_errors=True)
        shutil.rmtree(run.checkpoints, ignore_errors=True)


def alive(record: dict) -> bool:
    """Whether the worker holding a trial's lease still works on it: on this host its pid, elsewhere its heartbeat."""
    pid = record.get("pid")
    if record.get("run_id") is not None:  # a queued run on the dashboard: the job queue's lease keeps it alive
        return True
    if record.get("held"):  # its worker is being requeued
        return time.time() - record.get("heartbeat", 0) < LEASE_S
    if pid is None:
        return False
    if record.get("host") == socket.gethostname():
        return process_alive(str(pid))
    return time.time() - record.get("heartbeat", 0) < LEASE_S


def _same_job(record: dict) -> bool:
    """Whether the record's lease was taken by an earlier run of this very Slurm task (requeued since)."""
    return record.get("job") is not None and record.get("job") == _job_id() and record.get("pid") != os.getpid()


def search_finished(folder: Path, ledger: dict) -> bool:
    """Whether a search has every trial sampled and ended."""
    return _study(folder, ledger).finished()


def retry_failed(folder: Path, ledger: dict) -> int:
    """Put the failed trials of a search back to work (each continues its run's newest state); how many."""
    study = _study(folder, ledger)
    with study.locked() as records:
        failed = [r for r in records if r["state"] == FAILED]
        for record in failed:
            # a lease nobody holds: the next worker takes it (on agents: the server resumes its run)
            record.update(state=RUNNING, pid=None, worker=None, error=None, retry=True)
            study.save(record)
    return len(failed)


def _study(folder: Path, ledger: dict) -> Study:
    from utp_dist.sweep.search import parse_search

    return Study(folder, parse_search(Path(ledger["search_file"]), ledger["search"]))
