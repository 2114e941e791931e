"""The dashboard's settings, read once at start from the command line and the environment."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from utp_dist.credentials import xdg_home
from utp_dist.errors import UserError

DB_ENV = "DASHBOARD_DB_URL"
DB_FILE = "dashboard.db"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 1 << 20  # bytes of a request body: the largest config text or agent report is a few KiB


@dataclass(frozen=True)
class Settings:
    """Where the database is, which output roots are indexed, who may call (token, hosts) and for how long a login lasts."""

    roots: tuple[Path, ...] = (Path("experiments"),)
    """Output roots to index; file-serving endpoints serve only files inside them."""
    db_url: str = ""
    """SQLAlchemy URL; empty = a SQLite file in the user's data folder (`default_db_file`), never inside a served root."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """Every API call, write and page needs it; None only with --no-token on a loopback address."""
    allowed_hosts: tuple[str, ...] = ()
    """Host header names answered besides the loopback names and the bound address (--allowed-host); others get 400."""
    session_hours: float = 12.0
    """How long a login cookie lasts (--session-hours)."""
    index_interval_s: float = 5.0
    """How often the background indexer looks for new or changed run folders."""
    lease_s: float = 30.0
    """How long an agent's claim on a job lasts without a heartbeat; then the reaper requeues the job."""
    allow_import: tuple[str, ...] = ()
    """Modules (imported at start) whose registered names and `module:attr` paths stored configs may name (--allow-import)."""
    max_body: int = MAX_BODY
    """Request bodies above this many bytes are answered 413 (--max-body)."""

    def __post_init__(self) -> None:
        if not self.roots:
            raise UserError("--root: give at least one output root")
        if not self.lease_s > 0:
            raise UserError(f"--lease-seconds {self.lease_s}: must be positive, e.g. 30 (agents heartbeat every third of it)")
        if not self.session_hours > 0:
            raise UserError(f"--session-hours {self.session_hours}: must be positive, e.g. 12")
        if self.max_body < 1:
            raise UserError(f"--max-body {self.max_body}: must be a positive number of bytes, e.g. 1048576 (1 MiB)")
        if not is_loopback(self.host) and not self.token:
            raise UserError(
                f"--no-token: only with a loopback --host (127.0.0.1, localhost, ::1); {self.host} is reachable from other machines"
            )

    @property
    def default_db_file(self) -> Path:
        """The SQLite file used without --db: one per set of roots, in $XDG_DATA_HOME/utp_dist/dashboards (never served)."""
        key = hashlib.sha256("\n".join(str(root) for root in self.roots).encode()).hexdigest()[:12]
        return xdg_home("XDG_DATA_HOME", ".local/share") / "utp_dist" / "dashboards" / key / DB_FILE

    @property
    def database_url(self) -> str:
        """The URL to connect to."""
        return self.db_url or f"sqlite:///{self.default_db_file}"


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def from_args(args, token: str | None, allow_import: tuple[str, ...] = ()) -> Settings:
    """Settings from the parsed command line and the token already resolved, falling back to DASHBOARD_DB_URL."""
    return Settings(
        roots=tuple(Path(r).resolve() for r in (args.root or ["experiments"])),
        db_url=args.db or os.environ.get(DB_ENV, ""),
        host=args.host,
        port=args.port,
        token=token,
        allowed_hosts=tuple(args.allowed_host or ()),
        session_hours=args.session_hours,
        index_interval_s=args.index_interval,
        lease_s=args.lease_seconds,
        allow_import=tuple(allow_import),
        max_body=args.max_body,
    )
