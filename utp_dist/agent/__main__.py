"""python -m utp_dist.agent --server URL [--name NAME] [--gpus auto|0,1,...|none] [--token T] [--drain] [--poll SECONDS] [--allow-import MODULE ...]"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import tempfile
from pathlib import Path

from utp_dist.credentials import TOKEN_ENV, token_file
from utp_dist.errors import UserError, run_command


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: which dashboard, this agent's name and GPUs, and how it polls."""
    parser = argparse.ArgumentParser(
        prog="python -m utp_dist.agent",
        description="Run the dashboard's queued runs on this machine: claim what fits its GPUs, train, report, repeat.",
    )
    parser.add_argument("--server", required=True, help="the dashboard's URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--name", default=socket.gethostname(), help="this agent's name on the dashboard (default: the host name)")
    parser.add_argument(
        "--gpus",
        default="auto",
        help="auto (every GPU the driver reports), none (CPU jobs only) or indices like 0,1 (checked against the driver)",
    )
    parser.add_argument("--token", help=f"the dashboard's token (default: ${TOKEN_ENV}, else the token file of this user, {token_file()})")
    parser.add_argument("--drain", action="store_true", help="claim nothing new; finish what runs, then exit")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between looks for work when idle (default 2)")
    parser.add_argument("--cpu-jobs", type=int, default=1, help="CPU jobs (gpus = 0) run at once (default 1)")
    parser.add_argument("--workdir", help="where job configs and process logs go (default: a new temporary folder)")
    parser.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE; jobs may name what it registers and MODULE[.sub]:attr paths (repeatable; default: built-ins only)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, runner_class=None) -> int:
    """Serve the queue until --drain or SIGTERM/SIGINT end it; a bad flag is one line and exit code 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def serve() -> int:
        from utp_dist.agent.client import Client
        from utp_dist.agent.gpus import inventory
        from utp_dist.agent.loop import Agent
        from utp_dist.agent.runner import Runner
        from utp_dist.registry import allow_imports

        if args.poll <= 0:
            raise UserError(f"--poll {args.poll}: must be positive, e.g. 2")
        if args.cpu_jobs < 0:
            raise UserError(f"--cpu-jobs {args.cpu_jobs}: must be 0 (GPU jobs only) or more")
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"utp-agent-{args.name}-"))
        runner = (runner_class or Runner)(workdir, allow_imports(args.allow_import))
        agent = Agent(Client(args.server, args.token), args.name, inventory(args.gpus), runner, args.poll, args.cpu_jobs, args.drain)
        return agent.run()

    return run_command(serve, interrupted="agent stopped")


if __name__ == "__main__":
    sys.exit(main())
