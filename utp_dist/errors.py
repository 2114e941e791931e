"""Errors the user can fix, and the one wrapper that turns them into one line and an exit code for every command."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2  # bad config, data or arguments: fix and run again
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it


class UserError(Exception):
    """A problem the user can fix (bad config, missing data); printed as one line, exit code 2."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:  # torch wraps worker errors: the last line is "module.Class: message"
        return text.splitlines()[-1].split(": ", 1)[-1]
    return first_line(err)


def worker_death(err: BaseException) -> UserError | None:
    """The one-line error for torch's report that a DataLoader worker died, None for any other error.

    torch's SIGCHLD handler raises that RuntimeError wherever the main process happens to be (inside a save too), so
    callers that wrap errors by where they happened ask here first, and a dead worker is never called a write error.
    """
    text = first_line(err).rstrip(". ")
    if not (isinstance(err, RuntimeError) and text.startswith("DataLoader worker (pid")):
        # the dead worker may show up as another error first (a batch whose shared memory it was still handing over):
        # torch's own check of this process's workers tells, with the signal that killed it
        from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

        try:
            _error_if_any_worker_fails()
        except RuntimeError as died:
            text = first_line(died).rstrip(". ")
        else:
            return None
    return UserError(
        f"data.num_workers: a data loading worker died ({text}); the out-of-memory killer is the usual cause: lower "
        "data.num_workers, data.prefetch_factor or data.batch_size. The newest complete training state continues the run"
    )


def run_command(command: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a command's body: a UserError becomes 'utp_dist: error: LINE' on stderr and exit 2, Ctrl-C exit 130."""
    try:
        return command()
    except UserError as err:
        print(f"utp_dist: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"utp_dist: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
