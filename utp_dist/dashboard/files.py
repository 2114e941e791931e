"""Serving files from the output roots only: a path is resolved (symlinks followed) and must stay inside a root.

Database files and the token file are never served, wherever they lie: a database in a root (the old default) would
hand every row, and the token, to anyone who can read a figure.
"""

from __future__ import annotations

from pathlib import Path

from utp_dist.store.run_dir import inside

TOKEN_FILE = "dashboard.token"
DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")  # what SQLite writes next to a database file
SQLITE_MAGIC = b"SQLite format 3\x00"


class NotServed(Exception):
    """A file that is not served: `status` 403 (outside the roots, a secret) or 404, with a line naming the path as asked."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def served(roots: tuple[Path, ...], index: int, relative: str) -> Path:
    """The file at `relative` below root number `index`, resolved; NotServed when it leads out, is a secret, or is none.

    Messages name the path as the client wrote it, never the server's absolute path.
    """
    shown = repr(relative)
    if not 0 <= index < len(roots):
        raise NotServed(403, f"no output root {index}")
    if "\x00" in relative:
        raise NotServed(404, f"no file {shown} in output root {index}")
    if relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        raise NotServed(403, f"{shown}: absolute paths are refused")
    target = inside(roots[index] / relative, roots)
    if target is None:
        raise NotServed(403, f"{shown} is outside the output roots")
    if secret(target):
        raise NotServed(403, f"{shown}: database and token files are never served")
    try:
        if target.is_file():
            return target
    except OSError:  # a name too long, a permission: as good as no file
        pass
    raise NotServed(404, f"no file {shown} in output root {index}")


def secret(path: Path) -> bool:
    """Whether `path` (resolved) is the token file, a database file by its name or its first bytes, or SQLite's journal of one."""
    name = path.name.lower()
    if name == TOKEN_FILE or name.endswith(DATABASE_SUFFIXES):
        return True
    for side in SQLITE_SIDE_FILES:
        database = path.parent / path.name[: -len(side)]
        if name.endswith(side) and (database.name.lower().endswith(DATABASE_SUFFIXES) or _sqlite(database)):
            return True
    return _sqlite(path)


def _sqlite(path: Path) -> bool:
    """Whether the file starts as every SQLite database does."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def url_of(roots: tuple[Path, ...], path: Path | None) -> str | None:
    """The /files/... URL of a file inside a root (None when it is not inside one)."""
    resolved = inside(path, roots) if path is not None else None
    if resolved is None:
        return None
    for i, root in enumerate(roots):
        if resolved.is_relative_to(root.resolve()):
            return f"/files/{i}/{resolved.relative_to(root.resolve()).as_posix()}"
    return None
