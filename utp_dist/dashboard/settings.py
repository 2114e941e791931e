"""The dashboard's settings, read once at start from the command line and the environment."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from utp_dist.errors import UserError

TOKEN_ENV, DB_ENV = "UTP_DASHBOARD_TOKEN", "DASHBOARD_DB_URL"
DB_FILE = "dashboard.db"
MAX_BODY = 1 << 20  # bytes of a request body: the largest config text or agent report is a few KiB


@dataclass(frozen=True)
class Settings:
    """Where the database is, which output roots are indexed, and the access token (None = open on localhost)."""

    roots: tuple[Path, ...] = (Path("experiments"),)
    """Output roots to index; file-serving endpoints serve only files inside them."""
    db_url: str = ""
    """SQLAlchemy URL; empty = a SQLite file under the first root."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """Every API call, write and page needs it when set; required to bind anything but a loopback address."""
    index_interval_s: float = 5.0
    """How often the background indexer looks for new or changed run folders."""
    lease_s: float = 30.0
    """How long an agent's claim on a job lasts without a heartbeat; then the reaper requeues the job (issue 12)."""
    max_body: int = MAX_BODY
    """Request bodies above this many bytes are answered 413 (--max-body)."""
    secret: bytes = field(default=b"", repr=False)
    """Signs the login cookie; derived from the token."""

    def __post_init__(self) -> None:
        if not self.roots:
            raise UserError("--root: give at least one output root")
        if not self.lease_s > 0:
            raise UserError(f"--lease-seconds {self.lease_s}: must be positive, e.g. 30 (agents heartbeat every third of it)")
        if self.max_body < 1:
            raise UserError(f"--max-body {self.max_body}: must be a positive number of bytes, e.g. 1048576 (1 MiB)")
        if not is_loopback(self.host) and not self.token:
            raise UserError(f"--host {self.host} is reachable from other machines: set {TOKEN_ENV} to a secret token first")

    @property
    def database_url(self) -> str:
        """The URL to connect to (the default SQLite file is created under the first root)."""
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.roots[0] / DB_FILE).resolve()}"


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def from_args(
    host: str, port: int, db: str | None, roots: list[str] | None, index_interval_s: float = 5.0, lease_s: float = 30.0
) -> Settings:
    """Settings from the command line, falling back to DASHBOARD_DB_URL and UTP_DASHBOARD_TOKEN."""
    token = os.environ.get(TOKEN_ENV) or None
    return Settings(
        roots=tuple(Path(r).resolve() for r in (roots or ["experiments"])),
        db_url=db or os.environ.get(DB_ENV, ""),
        host=host,
        port=port,
        token=token,
        index_interval_s=index_interval_s,
        lease_s=lease_s,
        secret=(token or os.urandom(16).hex()).encode(),
    )
