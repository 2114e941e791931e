"""The dashboard's token: where the server keeps it, and how its clients of the same user find it (standard library only).

Precedence everywhere: the --token flag, then $UTP_DASHBOARD_TOKEN, then the token file
$XDG_CONFIG_HOME/utp_dist/dashboard.token (~/.config/utp_dist/dashboard.token), which the dashboard writes
(mode 0600) on its first start without a token, as Jupyter does.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from utp_dist.errors import UserError

TOKEN_ENV = "UTP_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16
TOKEN_BYTES = 32  # 256 random bits, URL-safe base64: 43 characters


def xdg_home(variable: str, default: str) -> Path:
    """An XDG base folder: $VARIABLE when it is an absolute path (the spec ignores relative ones), else ~/DEFAULT."""
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / default


def token_file() -> Path:
    """Where the dashboard keeps the token it generated: readable by its user only."""
    return xdg_home("XDG_CONFIG_HOME", ".config") / "utp_dist" / "dashboard.token"


def checked(token: str, source: str) -> str:
    """`token`, or a one-line error naming where it came from when it is too short to resist guessing."""
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(
            f"{source}: the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}, "
            f"e.g. python -c 'import secrets; print(secrets.token_urlsafe({TOKEN_BYTES}))'"
        )
    return token


def given(flag: str | None) -> tuple[str, str] | None:
    """(token, where it came from) of the --token flag or $UTP_DASHBOARD_TOKEN, checked; None when neither is set."""
    if flag is not None:
        return checked(flag, "--token"), "--token"
    if os.environ.get(TOKEN_ENV):
        return checked(os.environ[TOKEN_ENV], TOKEN_ENV), TOKEN_ENV
    return None


def read_file(path: Path) -> str | None:
    """The token stored in `path`, or None when there is none."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"{path}: cannot read the dashboard token: {err.strerror}") from None
    return checked(token, str(path)) if token else None


def find(flag: str | None) -> tuple[str | None, str | None]:
    """A client's token and where it came from: --token, $UTP_DASHBOARD_TOKEN, the token file; (None, None) when none."""
    found = given(flag)
    if found is not None:
        return found
    path = token_file()
    token = read_file(path)
    return (token, str(path)) if token else (None, None)


def server_token(flag: str | None) -> tuple[str, str, bool]:
    """The server's token, where it came from, and whether it was generated now (stored in the token file, mode 0600)."""
    found = find(flag)
    if found[0] is not None:
        return found[0], found[1], False
    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    draft.unlink(missing_ok=True)  # left by a start that died here
    try:
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
        # a hard link appears whole or not at all: of two dashboards starting at once, the second reads the first one's token
        os.link(draft, path)
    except FileExistsError:
        stored = read_file(path)
        if stored is None:
            raise UserError(f"{path}: the token file is empty: delete it (the next start writes a new one) or pass --token") from None
        return stored, str(path), False
    except OSError as err:
        raise UserError(f"{path}: cannot store the dashboard token: {err.strerror}; pass --token or set {TOKEN_ENV}") from None
    finally:
        draft.unlink(missing_ok=True)
    return token, str(path), True
