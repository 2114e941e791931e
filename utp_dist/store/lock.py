"""One writer per run: an exclusive lock on RUN/LOCK, held for the life of the process that trains the run.

The lock is flock(2). The kernel drops it when its holder dies, kill -9 included, so a stale lock never blocks a
resume; on NFS, Linux maps flock onto the server's byte-range locks, which work across hosts and which the server
releases when a dead node's lease runs out (about 90 s). Lustre needs its `flock` mount option, GPFS locks across
nodes as it is. The file also names the holder (host, pid, start time) for the error the second writer gets.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import IO

from utp_dist.errors import UserError
from utp_dist.store.run_dir import RunDir

ACQUIRE_TRIES, ACQUIRE_PAUSE_S = 10, 0.05


class RunLockError(UserError):
    """Another process writes this run, or its file system cannot lock."""


class RunLock:
    """The lock of one run folder; `acquire` takes it or raises RunLockError naming the holder."""

    def __init__(self, run: RunDir):
        self.run, self.file = run, None

    def acquire(self) -> RunLock:
        """Take the lock now: a second writer is refused with the holder's host and pid.

        It tries for a moment only, for a reader asking `holder()` (the dashboard, `submit status`) holds the lock for
        the microseconds of its question, and that must not turn a starting run away.
        """
        handle = self._try_lock()
        for _ in range(ACQUIRE_TRIES - 1):
            if handle is not None:
                break
            time.sleep(ACQUIRE_PAUSE_S)
            handle = self._try_lock()
        if handle is None:
            holder = self.holder() or {}
            raise RunLockError(
                f"run '{self.run.name}' is being written by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"(since {_when(holder.get('since'))}, lock {self.run.lock_file}); wait for it to end or stop it, then run again"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        handle.flush()
        self.file = handle
        return self

    def release(self) -> None:
        """Drop the lock (closing the file drops it; so does the process's end)."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def holder(self) -> dict | None:
        """Who holds the lock now ({host, pid, since}; {} when the file does not say), None when nobody does.

        Asked with a shared lock on the file opened read-only: a reader creates nothing, needs no write permission on
        the run, and its question conflicts with the writer's exclusive lock only (NFS included).
        """
        try:
            handle = open(self.run.lock_file, encoding="utf-8")  # noqa: SIM115 - closed below, which drops the probe
        except OSError:  # no lock file: no process ever claimed the run (or it cannot be read: nothing to say)
            return None
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    named = json.loads(handle.read() or "{}")
                except (OSError, ValueError):
                    return {}
                return named if isinstance(named, dict) else {}
            except OSError:  # a file system without locks: the writer could not have taken one either
                return None
        return None

    def _try_lock(self) -> IO[str] | None:
        """The lock file, open and locked by us; None when another process holds it."""
        try:
            handle = open(self.run.lock_file, "a+", encoding="utf-8")  # noqa: SIM115 - the open file *is* the lock
        except OSError as err:
            raise RunLockError(f"cannot open the run lock {self.run.lock_file}: {err.strerror}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except OSError as err:
            handle.close()
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise RunLockError(
                    f"the file system of {self.run.lock_file} cannot lock files ({err.strerror}), so two processes could write "
                    "one run; put output.root on a file system with locks (NFS with lockd, Lustre mounted with -o flock)"
                ) from None
            raise
        return handle


def _when(since) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
