"""Callbacks: code of the user's (or of the tests) that observes a run at a handful of named events.

`train.callbacks` lists registered names (register_callback) or import paths `module:attr`; each is called without
arguments and returns an object with any of the methods of Callback. A callback runs on the main process only, unless
it sets `ranks = "all"`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from utp_dist.registry import CALLBACKS, load_object  # noqa: F401 (load_object lived here before registry.py)

EVENTS = ("on_fit_start", "on_step_end", "on_evaluate", "on_state_written", "on_save", "on_fit_end")


class Callback(Protocol):
    """The events a callback may implement (all optional)."""

    def on_fit_start(self, step: int) -> None:
        """Training starts (or resumes) at optimizer step `step`."""

    def on_step_end(self, step: int) -> None:
        """An optimizer step finished."""

    def on_evaluate(self, split: str, metrics: dict, step: int) -> None:
        """An evaluation of `split` finished."""

    def on_state_written(self, folder: Path) -> None:
        """A training state's files are written into `folder` but not yet marked complete."""

    def on_save(self, state: Path) -> None:
        """A complete training state was saved."""

    def on_fit_end(self, summary: dict) -> None:
        """The run finished; `summary` is what summary.json holds."""


class Callbacks:
    """Every configured callback of this rank; calling an event calls it on each callback that implements it."""

    def __init__(self, specs: list[str], main_process: bool):
        built = [CALLBACKS.get(spec)() for spec in specs]
        self.callbacks = [cb for cb in built if main_process or getattr(cb, "ranks", "main") == "all"]

    def __getattr__(self, event: str):
        if event not in EVENTS:
            raise AttributeError(event)

        def call(*args) -> None:
            for callback in self.callbacks:
                method = getattr(callback, event, None)
                if method is not None:
                    method(*args)

        return call
