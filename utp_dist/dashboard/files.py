"""Serving files from the output roots only: a path is resolved (symlinks followed) and must stay inside a root."""

from __future__ import annotations

from pathlib import Path


class OutsideRoots(Exception):
    """A path that leaves the configured output roots (.., an absolute path, or a symlink pointing out)."""


def inside(roots: tuple[Path, ...], path: Path) -> Path:
    """`path` resolved, if it lies inside one of the resolved roots; OutsideRoots otherwise."""
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise OutsideRoots(f"{path} is outside the output roots")


def under_root(roots: tuple[Path, ...], index: int, relative: str) -> Path:
    """The file at `relative` below root number `index`, refused when it resolves outside every root."""
    if not 0 <= index < len(roots):
        raise OutsideRoots(f"no output root {index}")
    if relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        raise OutsideRoots(f"{relative}: absolute paths are refused")
    return inside(roots, roots[index] / relative)


def url_of(roots: tuple[Path, ...], path: Path | None) -> str | None:
    """The /files/... URL of a file inside a root (None when it is not inside one)."""
    if path is None:
        return None
    resolved = path.resolve()
    for i, root in enumerate(roots):
        if resolved.is_relative_to(root.resolve()):
            return f"/files/{i}/{resolved.relative_to(root.resolve()).as_posix()}"
    return None
