"""When one rank of a distributed run fails, every rank ends within seconds, not in its next collective's timeout.

A failure on one rank only (the best-model export on a full disk, a file only rank 0 opens) would leave the others
waiting in their next collective until torch's timeout (minutes on NCCL), holding their GPUs. So the failing rank
marks the failure in the process group's store (which every rank reaches without a collective), and a thread in
every other rank that sees the mark ends its process. The failing rank prints its one-line error; the others only
say that they stopped because of it. The failing rank waits for the others to leave before it exits: under gloo, its
closing sockets would otherwise fail their collective first, with a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from utp_dist.errors import EXIT_USER_ERROR

FAILED, LEFT = "utp_dist/failed_rank", "utp_dist/ranks_left"
POLL_S = 0.2
# a rank that fails by itself (an error every rank raises at the same agreed step) ends within this, printing its own line
GRACE_S = 1.5

_watch: _Watch | None = None
_failed = False  # this process failed a run with peers
_runs = 0  # runs watched in this process: every rank counts the same, so each run's keys are its own


class _Watch:
    def __init__(self, run: int) -> None:
        import torch.distributed as dist

        self.failed_key, self.left_key = f"{FAILED}/{run}", f"{LEFT}/{run}"
        # the store the process group was built on: reachable while a peer is stuck in a collective
        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.failing = self.done = False
        self.thread = threading.Thread(target=self._run, name="rank-failure", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.store.check([self.failed_key]):
                if self.done or self.failing:
                    return
                time.sleep(POLL_S)
            time.sleep(GRACE_S)
            if self.done or self.failing:
                return
            failed = self.store.get(self.failed_key).decode()
            self.store.add(self.left_key, 1)
        except Exception:  # the store ended with the run (rank 0 exited): nothing is left to watch
            return
        print(f"utp_dist: rank {self.rank} stopped: rank {failed} failed (its error is in its output)", file=sys.stderr, flush=True)
        os._exit(EXIT_USER_ERROR)  # this rank may be blocked in a collective that would never return

    def fail(self) -> None:
        self.failing = True
        # once the others left, torchrun's agent SIGTERMs this rank too: that must not cut its one-line error short
        with contextlib.suppress(ValueError):  # not the main thread: the caller owns the signals
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            self.store.set(self.failed_key, str(self.rank))
            self.store.add(self.left_key, 1)
            deadline = time.time() + GRACE_S + 5 * POLL_S + 3
            while self.store.add(self.left_key, 0) < self.world and time.time() < deadline:
                time.sleep(POLL_S)
        except Exception:  # the store went with another rank: nobody is left to wait for
            pass


def watch() -> None:
    """Start watching for another rank's failure (once the process group exists; nothing for a single process)."""
    global _watch, _runs
    import torch.distributed as dist

    if _watch is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _runs += 1
        _watch = _Watch(_runs)


def fail() -> None:
    """This rank is failing: make every other rank end, and wait (a few seconds at most) until they have."""
    global _failed
    if _watch is not None:
        _failed = True
        _watch.fail()


def exit_now(code: int) -> None:
    """End the process at once after a failure with peers: the process group's teardown at a normal exit waits for
    ranks that are gone (seconds under gloo); everything of the run is written and closed by then."""
    if _failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def unwatch() -> None:
    """The run ended on this rank: stop watching."""
    global _watch
    if _watch is not None:
        _watch.done = True
        # let the thread leave its store call now: one still inside it while the process (and the store) is torn down
        # at exit can abort the process ("terminate called without an active exception"), turning a 75 into a crash
        _watch.thread.join(timeout=POLL_S * 2 + 1.0)
        _watch = None
