"""The index of what the output roots hold: every run folder and sweep ledger, refreshed incrementally by mtime.

Pages and the API read runs from the database only; this is the one place that walks the roots, in a
background thread (and on demand), and it re-reads a run's files only when their newest mtime changed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from utp_dist import states
from utp_dist.dashboard import jobqueue, runtable, sources
from utp_dist.dashboard.db import Run, Sweep, now
from utp_dist.errors import UserError
from utp_dist.store import runfiles
from utp_dist.store.run_dir import RunDir, find_runs, inside, is_version_of

log = logging.getLogger(__name__)
BATCH = 200  # runs read per commit


class Stopped(Exception):
    """The server is shutting down: a pass ends where it is."""


class Indexer:
    """Keeps the runs and sweeps tables in step with the run folders and ledgers under the output roots."""

    def __init__(self, roots: tuple[Path, ...], sessions: sessionmaker[Session]):
        self.roots, self.sessions = roots, sessions
        self.lock = threading.Lock()  # one refresh at a time (the background loop and an on-demand refresh)
        self.ledgers: dict[str, tuple[float, list[tuple[str, str, str]]]] = {}  # sweep folder -> (mtime, its tasks' run keys)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        # what pages and the API say while the first pass over the roots is still under way (the server answers meanwhile)
        # and, over every pass since the start (background and on demand alike), how many run folders were read and forgotten
        self.status: dict = {
            "indexing": True,
            "runs_seen": 0,
            "started": None,
            "first_pass_s": None,
            "runs_read_total": 0,
            "runs_gone_total": 0,
        }

    def refresh(self) -> dict[str, int]:
        """One pass over every root: add new runs/sweeps, re-read changed ones, forget vanished ones. Returns counts."""
        with self.lock, self.sessions() as session:
            started = time.monotonic()
            self.status.update(started=self.status["started"] or now(), runs_seen=0)
            counts = self._runs(session)
            counts.update(self._sweeps(session))
            counts["linked"] = self._link(session)
            session.commit()
            self.status["runs_read_total"] += counts["runs_read"]
            self.status["runs_gone_total"] += counts["runs_gone"]
            if self.status["indexing"]:
                self.status.update(indexing=False, first_pass_s=round(time.monotonic() - started, 3))
        return counts

    def _runs(self, session: Session) -> dict[str, int]:
        roots = [str(r) for r in self.roots]
        rows = {(r.root, r.dataset, r.name): r for r in session.scalars(select(Run).where(Run.root.in_(roots)))}
        seen, read, values = set(), 0, {}
        # a job whose agent has not reported its folder yet: a new folder may be its, and its agent reports it within
        # seconds (from the training's handshake); until then a folder that is live, or of that job's config (a short
        # run can end before the report), gets no row of its own
        unreported = select(Run.config_hash).where(Run.source == "queue", Run.root.is_(None), Run.state.in_(jobqueue.HELD))
        starting = set(session.scalars(unreported))
        for root in roots:
            for folder in find_runs(root, within=self.roots):  # a symlink out of the roots is no run
                if self.stopping.is_set():  # shutting down mid-pass: what was committed stays, nothing is forgotten
                    raise Stopped
                key = (root, folder.dataset, folder.name)
                row = rows.get(key)
                if row is None and starting and (folder.config_hash() in starting or runfiles.alive(folder)):
                    continue
                seen.add(key)
                mtime = runfiles.newest_mtime(folder)
                # unchanged files: nothing to read, except that a "running" folder turns stopped when its process ends
                if row is not None and row.indexed_mtime == mtime and not (row.source == "disk" and row.state == states.RUNNING):
                    continue
                if row is None:
                    row = Run(source="disk", root=root, dataset=folder.dataset, name=folder.name, created=_started(folder))
                    session.add(row)
                values[row] = self._read(row, folder, mtime)
                read += 1
                if len(values) >= BATCH:  # the table fills while a big root is read, and writers are not held off for long
                    self._store(session, values)
                self.status["runs_seen"] = len(seen)
        self._store(session, values)
        # a root that is not there right now (an unmounted share) forgets nothing: its runs keep their ids and links
        present = {root for root in roots if runfiles.holds_runs(root)}
        gone = [row for key, row in rows.items() if key not in seen and row.source == "disk" and key[0] in present]
        for row in gone:
            session.delete(row)
        return {"runs": len(seen), "runs_read": read, "runs_gone": len(gone)}

    @staticmethod
    def _store(session: Session, values: dict[Run, dict]) -> None:
        """Write what was read so far, with each run's filterable values (runtable.py), and commit."""
        runtable.assign_projects(session, values)
        session.flush()  # new runs get their ids
        runtable.store_values(session, {row.id: found for row, found in values.items()})
        session.commit()
        values.clear()

    @staticmethod
    def _read(row: Run, folder: RunDir, mtime: float | None) -> dict:
        """Update the row from the run's files; returns its values for the run table."""
        config = folder.read_config()
        progress = runfiles.progress(folder, config)
        summary = folder.read_summary() or {}
        given = summary.get("config_hash")
        row.config_hash = given if isinstance(given, str) and 0 < len(given) <= 64 else folder.config_hash()
        for field in ("epoch", "step", "best_metric", "best", "img_per_s"):
            setattr(row, field, progress[field])
        row.restarts = progress["restarts"] or 0
        if row.source == "disk":  # a queued run's state is its job's, not a guess from its files
            row.state = runfiles.disk_state(folder)
        row.indexed_mtime = mtime
        row.updated = now()
        return runtable.values_of(folder, config, summary, mtime, row.created)

    def _sweeps(self, session: Session) -> dict[str, int]:
        rows = {s.folder: s for s in session.scalars(select(Sweep))}
        seen = set()
        for root in self.roots:
            for path in sorted((root / "sweeps").glob(f"*/{sources.LEDGER}")):
                if inside(path, self.roots) is None:  # a sweep folder linked in from elsewhere is not read
                    continue
                folder = str(path.parent)
                seen.add(folder)
                mtime = path.stat().st_mtime
                row = rows.get(folder)
                if row is not None and row.indexed_mtime == mtime and self.ledgers.get(folder, (None,))[0] == mtime:
                    continue
                try:
                    ledger = sources.read_ledger(path.parent)
                except UserError as err:
                    log.warning("%s", err)
                    continue
                if row is None:
                    row = Sweep(folder=folder)
                    session.add(row)
                row.name = ledger.get("name", path.parent.name)
                row.executor = ledger.get("executor", "")
                row.tasks = len(ledger.get("tasks", []))
                row.created = ledger.get("created") or mtime
                row.indexed_mtime = mtime
                # the run each task trains: (output root, name, config fingerprint), as ledger.find_run matches it
                tasks = [] if "search" in ledger else ledger.get("tasks", [])  # a search's tasks are its workers, not runs
                keys = [(str(Path(t["output_root"]).resolve()), t["name"], t["config_hash"]) for t in tasks]
                self.ledgers[folder] = (mtime, keys)
        roots = tuple(str(r) for r in self.roots)
        gone = [row for folder, row in rows.items() if folder not in seen and folder.startswith(roots)]
        for row in gone:
            self.ledgers.pop(row.folder, None)
            session.delete(row)
        return {"sweeps": len(seen)}

    def _link(self, session: Session) -> int:
        """Point each run at the sweep whose ledger has its task (runs.sweep_id); returns how many links changed."""
        session.flush()  # new sweeps get their ids
        ids = dict(session.execute(select(Sweep.folder, Sweep.id)).all())
        wanted: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for folder, (_, keys) in self.ledgers.items():
            for root, name, config_hash in keys:
                wanted.setdefault((root, config_hash), []).append((name, ids.get(folder)))
        changed = 0
        runs = session.execute(
            select(Run.id, Run.root, Run.name, Run.config_hash, Run.sweep_id).where(Run.root.in_([str(r) for r in self.roots]))
        )
        for run_id, root, name, config_hash, current in runs.all():
            target = next((sweep for task, sweep in wanted.get((root, config_hash), []) if is_version_of(task, name)), None)
            if target != current:
                session.execute(update(Run).where(Run.id == run_id).values(sweep_id=target))
                changed += 1
        return changed

    def start(self, interval_s: float, first_after_s: float = 0.0) -> None:
        """Refresh after `first_after_s`, then every `interval_s` seconds, in a daemon thread until stop(): the server
        answers while the first pass reads a big root."""

        def loop() -> None:
            wait = first_after_s
            while not self.stopping.wait(wait):
                wait = interval_s
                try:
                    self.refresh()
                except Stopped:
                    return
                except Exception:  # a bad folder or a locked database must not end the loop
                    log.exception("indexing the output roots failed; trying again in %.0f s", interval_s)

        self.thread = threading.Thread(target=loop, name="indexer", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the background loop (at shutdown)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


def _started(folder: RunDir) -> float:
    """When the run started: its config.yaml is written first."""
    for path in (folder.config_file, folder.logs):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return now()
