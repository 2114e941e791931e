"""python -m utp_dist.dashboard [--host 127.0.0.1] [--port 8000] [--root OUTPUT_ROOT ...] [--token T | --no-token] [--allow-import MODULE] ..."""

from __future__ import annotations

import argparse
import gc
import sys

from utp_dist import credentials
from utp_dist.dashboard.settings import DB_ENV, DB_FILE, MAX_BODY, Settings, from_args
from utp_dist.errors import UserError, first_line, run_command


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: host, port, who may call, database URL, output roots, index interval, lease."""
    parser = argparse.ArgumentParser(
        prog="python -m utp_dist.dashboard",
        description="Web dashboard and API over the runs and sweeps under the output roots, guarded by a token.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token",
        help=f"the access token (or ${credentials.TOKEN_ENV}; default: the one in {credentials.token_file()}, generated on first start)",
    )
    parser.add_argument("--no-token", action="store_true", help="no token at all (loopback --host only): any local user can queue jobs")
    parser.add_argument(
        "--allowed-host",
        action="append",
        help="a Host name the dashboard answers to besides 127.0.0.1, localhost, ::1 and --host (repeatable; e.g. a proxy's name)",
    )
    parser.add_argument("--session-hours", type=float, default=12.0, help="how long a login lasts (default 12)")
    parser.add_argument("--db", help=f"SQLAlchemy URL (or {DB_ENV}); default: a SQLite file in ~/.local/share/utp_dist/dashboards/")
    parser.add_argument("--root", action="append", help="output root to index (repeatable; default: experiments)")
    parser.add_argument("--index-interval", type=float, default=5.0, help="seconds between looks for new or changed runs")
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="an agent's claim on a job lapses after this long without a heartbeat (default 30)",
    )
    parser.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE; stored configs may name what it registers and MODULE[.sub]:attr paths (repeatable; default: built-ins only)",
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


def base_url(settings: Settings) -> str:
    """The URL to open in a browser on this machine (a wildcard bind is reached through 127.0.0.1)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def announce(settings: Settings, source: str | None, generated: bool) -> None:
    """Say where the dashboard is and how to log in; the token itself is printed only on the start that generated it."""
    url, roots = base_url(settings), ", ".join(map(str, settings.roots))
    if settings.token is None:
        print("utp_dist: warning: --no-token: any user of this machine can queue jobs that run as you", file=sys.stderr, flush=True)
        how = "no token"
    elif generated:
        how = f"new token stored in {source}; log in once with {url}/web/login?token={settings.token}"
    else:
        how = f"token from {source}"
    print(f"utp_dist dashboard: {url}/  ({how}; roots: {roots})", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Serve the dashboard until Ctrl-C; a bad flag, token or database is one line and exit code 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def serve() -> int:
        """Resolve the token, build the app, check the database, run uvicorn."""
        # importing FastAPI, SQLAlchemy and the routes makes many long-lived objects and little garbage: the collector's
        # passes over them were about 15 % of the time to the first answer, so it waits until the app is built, and then
        # leaves them out of its passes for good (freeze), instead of sweeping them all once it is back on
        gc.disable()
        try:
            app, settings, source, generated = build()
        finally:
            gc.freeze()
            gc.enable()
        announce(settings, source, generated)
        import uvicorn

        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0

    def build():
        """The app and its settings, with the database checked: (app, settings, token source, token generated)."""
        from utp_dist.dashboard.app import create_app
        from utp_dist.registry import allow_imports

        if args.no_token and args.token is not None:
            raise UserError("--no-token and --token: give one of them")
        # with --no-token, Settings refuses a non-loopback --host; without, a first start writes the token file
        token, source, generated = (None, None, False) if args.no_token else credentials.server_token(args.token)
        settings = from_args(args, token, allow_imports(args.allow_import))
        if not settings.db_url:
            settings.default_db_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if (settings.roots[0] / DB_FILE).exists() and not settings.default_db_file.exists():
                print(
                    f"utp_dist: note: {settings.roots[0] / DB_FILE} (an earlier default) is no longer used: the database is "
                    f"{settings.default_db_file}; move the file there to keep its projects and queue",
                    file=sys.stderr,
                )
        app = create_app(settings)
        check_database(app.state.db.engine)
        return app, settings, source, generated

    return run_command(serve, interrupted="dashboard stopped")


if __name__ == "__main__":
    sys.exit(main())
