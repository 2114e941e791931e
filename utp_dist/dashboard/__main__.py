"""python -m utp_dist.dashboard [--host 127.0.0.1] [--port 8000] [--db URL] [--root OUTPUT_ROOT ...] [--lease-seconds 30]"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from utp_dist.dashboard.settings import DB_ENV, MAX_BODY, TOKEN_ENV, from_args
from utp_dist.errors import UserError, first_line, run_command


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: host, port, database URL, output roots, index interval."""
    parser = argparse.ArgumentParser(
        prog="python -m utp_dist.dashboard",
        description=f"Web dashboard and API over the runs and sweeps under the output roots. Off localhost, set {TOKEN_ENV}.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs the token)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", help=f"SQLAlchemy URL (or {DB_ENV}); default: sqlite file dashboard.db under the first root")
    parser.add_argument("--root", action="append", help="output root to index (repeatable; default: experiments)")
    parser.add_argument("--index-interval", type=float, default=5.0, help="seconds between looks for new or changed runs")
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="an agent's claim on a job lapses after this long without a heartbeat (default 30)",
    )
    parser.add_argument("--max-body", type=int, default=MAX_BODY, metavar="BYTES", help="bigger request bodies are refused (default 1 MiB)")
    return parser.parse_args(argv)


def check_database(engine) -> None:
    """Connect once before serving, so a wrong --db is one line, not a traceback from inside the server."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        url = engine.url.render_as_string(hide_password=True)
        raise UserError(f"--db {url}: cannot connect: {first_line(getattr(err, 'orig', None) or err)}") from None


def main(argv: list[str] | None = None) -> int:
    """Serve the dashboard until Ctrl-C; a bad flag or database is one line and exit code 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def serve() -> int:
        """Build the app, check the database, run uvicorn."""
        import uvicorn

        from utp_dist.dashboard.app import create_app

        settings = from_args(args.host, args.port, args.db, args.root, args.index_interval, args.lease_seconds)
        settings = dataclasses.replace(settings, max_body=args.max_body)
        settings.roots[0].mkdir(parents=True, exist_ok=True)  # the default database lives there
        app = create_app(settings)
        check_database(app.state.db.engine)
        print(f"utp_dist dashboard: http://{args.host}:{args.port}/  (roots: {', '.join(map(str, settings.roots))})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0

    return run_command(serve, interrupted="dashboard stopped")


if __name__ == "__main__":
    sys.exit(main())
