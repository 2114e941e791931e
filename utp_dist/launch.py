"""`python -m utp_dist.launch [torchrun options] -m utp_dist.train CONFIG ...`: torchrun that exits with its ranks' code.

torchrun exits 1 whenever a rank ends non-zero, and dies of SIGUSR1/SIGUSR2 (it has no handler for them), so a run
that stopped to be resumed (75) or refused a setting (2) looks like a crash to whatever started it: Slurm, an agent,
a script that resubmits on 75. This launcher takes torchrun's arguments, leaves the stop signals to the ranks (it
forwards the ones sent to it alone; a signal to the whole process group reaches them anyway), and exits with the
ranks' own code when they agree on one.
"""

from __future__ import annotations

import os
import signal
import sys

from utp_dist.preemption import STOP_SIGNALS

EXIT_FAILED = 1  # ranks that ended differently (or were killed): what torchrun itself says


def _forward(signum: int, frame) -> None:
    import psutil  # accelerate's dependency

    for child in psutil.Process().children():  # the ranks; a second copy of a group signal changes nothing there
        try:
            child.send_signal(signum)
        except psutil.Error:  # ended meanwhile
            pass


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv`; its ranks' common exit code (0, 2, 75, ...), else 1."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _forward)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    # torchrun raises on the signals it handles and then tears the ranks down: the stop signals stay with the ranks
    args.signals_to_handle = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"  # option, or env before 2.8
    try:
        run(args)
    except ChildFailedError as err:
        # a rank that ended by a signal (negative: torchrun's teardown once the first rank left, or a copy of the
        # group's signal arriving after its handler was gone) does not outvote the code the other ranks chose
        chosen = {failure.exitcode for failure in err.failures.values() if failure.exitcode > 0}
        return chosen.pop() if len(chosen) == 1 else EXIT_FAILED
    except SignalException as err:  # Ctrl-C (SIGINT), SIGHUP, SIGQUIT: the ranks were shut down with it
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
