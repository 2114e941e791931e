"""The server's search controller: it steps every search submitted with `--executor dashboard` whose sweep folder lies
in one of its output roots, so nobody has to keep a controller process alive.

Each trial is one queued run (config "NAME__trial-NNN" in the project "sweep NAME"); each segment up to a rung is an
attempt of that run, and a promotion resumes it (the same run folder) with train.stop_at_epoch moved to the next rung.
The rung decisions are the study's own (Study.report); a lost agent's job is requeued by the reaper and continues
under the same trial number. Everything the controller knows is in the sweep folder and the database, so a restarted
server takes up where it stopped: every step reads the job of each trial and does what its state asks for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from utp_dist import states
from utp_dist.dashboard import jobqueue, services
from utp_dist.dashboard.db import ConfigRow, Project, Run
from utp_dist.dashboard.services import Conflict
from utp_dist.sweep import ledger as ledgers

if TYPE_CHECKING:
    from utp_dist.sweep.study import Study

log = logging.getLogger(__name__)
EXECUTOR = "dashboard"


def step_all(session: Session, roots: tuple[Path, ...], allow_import: tuple[str, ...] = ()) -> None:
    """One step of every unfinished dashboard search in `roots`; a broken one is logged and the others go on."""
    for root in roots:
        for path in sorted(ledgers.sweeps_dir(root).glob(f"*/{ledgers.LEDGER}")):
            try:
                ledger = ledgers.read(path.parent)
                if "search" in ledger and ledger.get("executor") == EXECUTOR:
                    step(session, path.parent, ledger, allow_import)
            except Exception:  # one search's bad file must not stop the others
                session.rollback()
                log.exception("search %s: the controller step failed; trying again next round", path.parent)


def step(session: Session, folder: Path, ledger: dict, allow_import: tuple[str, ...] = ()) -> None:
    """Report the trials whose segment ended, resume the promoted ones, and queue new trials up to search.parallel."""
    from utp_dist.sweep.search import parse_search  # optuna and the training code: only once there is a search
    from utp_dist.sweep.study import PROMOTED, RUNNING, Study

    study = Study(folder, parse_search(Path(ledger["search_file"]), ledger["search"]))
    if study.finished():  # also decides the rungs
        return
    for record in study.records():
        if record["state"] == RUNNING and record.get("run_id") is not None:
            _follow(session, study, record)
    for record in study.records():
        if record["state"] == PROMOTED:
            with study.locked() as records:  # the study's own lock: never held across Study.report, which takes it
                record = next(r for r in records if r["number"] == record["number"])
                if record["state"] != PROMOTED:
                    continue
                record.update(state=RUNNING, target=study.search.rungs[record["rung"] + 1], attempts=record.get("attempts", 0) + 1)
                study.save(record)
            _resume(session, study, record)
    for record in study.records():  # a trial made by an earlier step that was stopped before its run was queued
        if record["state"] == RUNNING and record.get("run_id") is None:
            _queue(session, study, ledger, record, allow_import)
    while True:
        with study.locked() as records:
            busy = sum(r["state"] in (RUNNING, PROMOTED) for r in records)
            if busy >= study.search.parallel or len(records) >= study.search.trials:
                return
            record = study._new(len(records))
            record["attempts"] = 1
            study.save(record)
        _queue(session, study, ledger, record, allow_import)


def _follow(session: Session, study: Study, record: dict) -> None:
    """Act on the job of a trial in flight: report its result, or resume a segment stopped before its rung."""
    from utp_dist.preemption import EXIT_RESUMABLE
    from utp_dist.sweep.worker import reached

    run = session.get(Run, record["run_id"], populate_existing=True)
    job = services.latest_job(session, run) if run is not None else None
    if job is None:  # its run was deleted on the dashboard: the trial cannot go on
        study.report(record["number"], 1, False)
        return
    if run.root is None:
        _place(session, run, record)
    if run.name and run.name != record["run"]:
        _moved(study, record, run.name)
    if job.state == states.SUCCEEDED:
        study.report(record["number"], 0, False)
    elif job.state == states.STOPPED and reached(record, record["target"]):
        study.report(record["number"], EXIT_RESUMABLE, True)
    elif job.state == states.STOPPED:  # stopped before its rung (a user's stop): the search goes on with it
        _resume(session, study, record)
    elif job.state in (states.FAILED, states.CANCELLED) and record.get("retry"):  # `submit resubmit --failed`: it continues
        _resume(session, study, record)
    elif job.state in (states.FAILED, states.CANCELLED):  # a queued trial cancelled by a user is not trained
        study.report(record["number"], 1, False)


def _place(session: Session, run: Run, record: dict) -> None:
    """Give the trial's run its folder as soon as the folder is there, before its agent reports it.

    A trial's folder is pinned by name, so the server knows it without the agent; an agent that lost its lease after
    the first save but before its report would otherwise leave the run without a folder, and the next attempt would
    train the trial again from scratch in NAME-v1 instead of continuing the state it saved.
    """
    from utp_dist.sweep.study import trial_run

    folder = trial_run(record)
    if folder is None:
        return
    key = {"root": str(folder.root.resolve()), "dataset": folder.dataset, "name": folder.name}
    # the indexer took the folder of a job no agent held for a run of its own: it is this trial's
    stray = session.scalar(select(Run).filter_by(source="disk", **key))
    if stray is not None:
        session.delete(stray)
        session.flush()
    for field, value in key.items():
        setattr(run, field, value)
    session.commit()


def _moved(study: Study, record: dict, name: str) -> None:
    """An attempt that found the trial's folder without any state (its agent died before the first save) started anew as
    NAME-vN: the trial follows its run there, and the stateless folder goes (one run folder per trial)."""
    from utp_dist.sweep.study import prepare_run

    with study.locked() as records:
        saved = next(r for r in records if r["number"] == record["number"])
        old, saved["run"] = dict(saved), name
        study.save(saved)
    record["run"] = name
    prepare_run(old)


def _resume(session: Session, study: Study, record: dict) -> None:
    """Point the trial's config at its current target rung and put its run back in the queue (the same run folder)."""
    run = session.get(Run, record["run_id"], populate_existing=True)
    row = session.get(ConfigRow, run.config_id) if run is not None and run.config_id is not None else None
    if row is None:
        study.report(record["number"], 1, False)
        return
    row.config = _config(study, record)  # a new dict: the JSON column sees the change
    session.commit()
    job = services.latest_job(session, run)
    if job is not None and job.state in jobqueue.RESUME:
        try:
            jobqueue.change_state(session, run.id, "resume")
        except Conflict:  # the job moved meanwhile (a user resumed it): the next step sees its new state
            session.rollback()
            return
    if record.get("retry"):
        with study.locked() as records:
            saved = next(r for r in records if r["number"] == record["number"])
            saved["retry"] = False
            study.save(saved)


def _queue(session: Session, study: Study, ledger: dict, record: dict, allow_import: tuple[str, ...]) -> None:
    """The trial's config and queued run (those an earlier step made before it was stopped, if any); its run id saved."""
    project = _project(session, ledger["name"])
    row = session.scalar(select(ConfigRow).where(ConfigRow.project_id == project, ConfigRow.name == record["run"]))
    if row is None:
        row = services.create_config(session, project, record["run"], config=_config(study, record), allow_import=allow_import)
    run = session.scalar(select(Run).where(Run.config_id == row.id).order_by(Run.id).limit(1))
    if run is None:
        run, _ = jobqueue.queue_run(session, row.id, gpus=int((ledger.get("resources") or {}).get("gpus_per_node") or 0))
    with study.locked() as records:
        saved = next(r for r in records if r["number"] == record["number"])
        saved["run_id"] = run.id
        study.save(saved)


def _config(study: Study, record: dict) -> dict:
    """The trial's config as its next segment trains it: up to its target rung (a pause there), or to its end."""
    import yaml

    config = yaml.safe_load(Path(record["config"]).read_text(encoding="utf-8"))
    last = record["target"] >= study.search.max_epochs
    config.setdefault("train", {})["stop_at_epoch"] = None if last else record["target"]
    return config


def _project(session: Session, name: str) -> int:
    """The project "sweep NAME" (as the dashboard executor names a grid's), made on first use."""
    title = f"sweep {name}"
    found = session.scalar(select(Project.id).where(Project.name == title))
    if found is not None:
        return found
    return services.create_project(session, title, "the trials of a search submitted with --executor dashboard").id
