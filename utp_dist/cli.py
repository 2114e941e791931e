"""`utp COMMAND [ARGS ...]`, the console command: `utp X ARGS` runs the same main(ARGS) as `python -m utp_dist.X ARGS`."""

from __future__ import annotations

import importlib
import sys

from utp_dist.errors import EXIT_USER_ERROR

# command -> (the module whose main(argv) runs it, the line `utp --help` shows); a module is imported only when its
# command runs, so `utp --help` and a mistyped command answer without importing torch
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("utp_dist.train_command", "train one run: utp train CONFIG.yaml [section.key=value ...] [--dry-run] [--print-config]"),
    "submit": ("utp_dist.sweep.submit", "run a grid as a sweep (Slurm, local, dashboard agents); also status, resubmit, leaderboard"),
    "dashboard": ("utp_dist.dashboard.__main__", "serve the web dashboard and API over the runs under the output roots"),
    "agent": ("utp_dist.agent.__main__", "run a dashboard's queued runs on this machine: claim what fits its GPUs, train, report"),
    "predict": ("utp_dist.predict", "classify images with a trained model"),
    "evaluate": ("utp_dist.evaluate", "training's metric suite on one ImageFolder split, written as report.json with figures"),
    "bench": ("utp_dist.bench", "is the data path the bottleneck? img/s of the model step, the data path and end to end"),
    "data": ("utp_dist.data.check", "check an ImageFolder root before training on it: utp data check ROOT"),
}


def usage() -> str:
    """The text of `utp --help`: one line per command."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: utp COMMAND [ARGS ...]",
            "",
            "utp_dist: train Hugging Face image classifiers, run sweeps, serve the dashboard and its agents.",
            "`utp COMMAND ARGS` is `python -m utp_dist.COMMAND ARGS`; `utp COMMAND --help` shows a command's options.",
            "",
            "commands:",
            *lines,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the named command with the rest of the arguments; no command or an unknown one is one line and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] == "--version":
        from utp_dist.version import __version__

        print(f"utp_dist {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"utp_dist: error: unknown command {argv[0]!r}; the commands are: {', '.join(COMMANDS)} (utp --help)", file=sys.stderr)
        return EXIT_USER_ERROR
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
