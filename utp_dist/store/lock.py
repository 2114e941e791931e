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


class RunLockError(UserError):
    """Another process writes this run, or its file system cannot lock."""


class RunLock:
    """The lock of one run folder; `acquire` takes it or raises RunLockError naming the holder."""

    def __init__(self, run: RunDir):
        self.run, self.file = run, None

    def acquire(self) -> RunLock:
        """Take the lock now (never waits): a second writer is refused with the holder's host and pid."""
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
        """Who holds the lock now ({host, pid, since}), None when nobody does."""
        handle = self._try_lock()
        if handle is not None:
            handle.close()
            return None
        try:
            return json.loads(self.run.lock_file.read_text() or "{}")
        except (OSError, ValueError):
            return {}

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
