"""Stop requests by signal: handlers only set a flag; the loop acts on it at an agreed step boundary."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: "stopped to be resumed"; the state on disk continues the run


class StopRequest:
    """Remembers that SIGTERM/SIGUSR1/SIGUSR2 arrived; never does work inside the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> StopRequest:
        """Route the stop signals to this flag (a second signal during the save is absorbed too)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        # only a flag: saving (or even logging) inside a handler can deadlock or corrupt what it interrupts
        if self.signum is None:
            self.signum = signum


class Stopped(Exception):
    """Raised out of the loop after the state was saved because a stop signal arrived."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum
        """The signal this process received (None when another rank's signal stopped the run)."""
