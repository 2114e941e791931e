"""Test seams: callbacks the tests register through `train.callbacks`, so the product carries no test hooks.

Their durations come from the environment of the process under test, so one config serves the slowed-down run and
its uninterrupted reference alike.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path


class SlowSave:
    """Sleeps after a state's files are written and before it is marked complete: the window a kill -9 test aims at."""

    def __init__(self) -> None:
        self.seconds = float(os.environ.get("UTP_TEST_SLOW_SAVE", "0"))

    def on_state_written(self, folder: Path) -> None:
        """Widen the crash window."""
        time.sleep(self.seconds)


class SlowSteps:
    """Sleeps after every optimizer step on every rank, so Slurm's timers catch a tiny run mid-training."""

    ranks = "all"

    def __init__(self) -> None:
        self.seconds = float(os.environ.get("UTP_TEST_STEP_SLEEP", "0"))
        # once this file exists the run goes at full speed: a test that has seen what it watched for waits no longer
        fast = os.environ.get("UTP_TEST_STEP_SLEEP_UNTIL")
        self.fast_forward = Path(fast) if fast else None

    def on_step_end(self, step: int) -> None:
        """Slow the run down."""
        if self.seconds and not (self.fast_forward and self.fast_forward.exists()):
            time.sleep(self.seconds)


class FullDiskOnMain:
    """Fails the main process alone at its first evaluation, as a full disk does when the best model is exported there;
    writes the time it failed into the file UTP_TEST_FULL_DISK names."""

    def on_evaluate(self, split: str, metrics: dict, step: int) -> None:
        """Raise what a write into a full file system raises."""
        mark = Path(os.environ["UTP_TEST_FULL_DISK"])
        mark.write_text(str(time.time()))
        raise OSError(errno.ENOSPC, "No space left on device", str(mark.parent / "best"))
