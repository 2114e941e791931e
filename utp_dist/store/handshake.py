"""The run handshake: what a training process tells whoever started it, in a small JSON file that process names.

An agent starts `python -m utp_dist.train` with $UTP_DIST_HANDSHAKE set to a path of its own; the training writes
there, each time atomically, the run folder as soon as it has claimed it, and at its end the outcome:

    {"pid": 1234, "run_folder": {"root": ..., "dataset": ..., "name": ...} | null,
     "outcome": {"reason": "completed" | "stopped" | "failed", "exit_code": 0, "error": "one line" | null} | null}

The starter reads it: no scanning of processes or lock files to find the folder, no grepping of the log for the
error. Under a multi-process launch only the process that claims the run folder (rank 0) writes; it decides that
once, at the entry (`begin`). Without the variable nothing is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from utp_dist.preemption import EXIT_RESUMABLE
from utp_dist.store import atomic
from utp_dist.store.run_dir import RunDir

HANDSHAKE_ENV = "UTP_DIST_HANDSHAKE"
COMPLETED, STOPPED, FAILED = "completed", "stopped", "failed"


def reason_of(exit_code: int) -> str:
    """The exit reason an exit code of the training means: 0 completed, 75 stopped (resumable), else failed."""
    return {0: COMPLETED, EXIT_RESUMABLE: STOPPED}.get(exit_code, FAILED)


@dataclass
class Handshake:
    """What the file says: the run folder (None until claimed) and the outcome (None until the process ended)."""

    run_folder: RunDir | None = None
    reason: str | None = None
    exit_code: int | None = None
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.reason is not None


class Writer:
    """The training side: writes the file at `path` (the whole of it, each time)."""

    def __init__(self, path: Path):
        self.path, self.run = path, None

    def claimed(self, run: RunDir) -> None:
        """The run folder this process now holds the lock of."""
        self.run = run
        self._write(None)

    def ended(self, exit_code: int, error: str | None) -> None:
        """The outcome; a run folder removed again (a start that failed before writing anything) is not named."""
        if self.run is not None and not self.run.logs.is_dir():
            self.run = None
        self._write({"reason": reason_of(exit_code), "exit_code": exit_code, "error": error})

    def _write(self, outcome: dict | None) -> None:
        # the root as an absolute path: the starter's working folder or the dashboard's roots need not be this process's
        folder = {"root": str(self.run.root.resolve()), "dataset": self.run.dataset, "name": self.run.name} if self.run else None
        try:
            atomic.write_json(self.path, {"pid": os.getpid(), "run_folder": folder, "outcome": outcome})
        except OSError:  # the starter's folder went away: the run itself goes on, its starter sees the exit code only
            pass


_writer: Writer | None = None


def begin(rank: int) -> None:
    """At the training entry: write the handshake of this process if $UTP_DIST_HANDSHAKE asks for one and this rank
    claims the run folder (rank 0)."""
    global _writer
    path = os.environ.get(HANDSHAKE_ENV, "").strip()
    _writer = Writer(Path(path)) if path and rank == 0 else None


def claimed(run: RunDir) -> None:
    """Called where the run folder is claimed: name it in the handshake (nothing without one)."""
    if _writer is not None:
        _writer.claimed(run)


def end(exit_code: int, error: str | None) -> None:
    """At the training entry's end: write the outcome (nothing without a handshake) and forget the writer."""
    global _writer
    if _writer is not None:
        _writer.ended(exit_code, error)
    _writer = None


def read(path: Path) -> Handshake:
    """What the file at `path` says so far (an empty Handshake when it is not there yet or cannot be read)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Handshake()
    if not isinstance(raw, dict):
        return Handshake()
    folder, outcome = raw.get("run_folder"), raw.get("outcome")
    run = RunDir(folder["root"], folder["dataset"], folder["name"]) if isinstance(folder, dict) and _names_run(folder) else None
    if not isinstance(outcome, dict) or outcome.get("reason") not in (COMPLETED, STOPPED, FAILED):
        return Handshake(run)
    code, error = outcome.get("exit_code"), outcome.get("error")
    return Handshake(run, outcome["reason"], code if isinstance(code, int) else None, error if isinstance(error, str) else None)


def _names_run(folder: dict) -> bool:
    return all(isinstance(folder.get(k), str) and folder[k] for k in ("root", "dataset", "name"))
