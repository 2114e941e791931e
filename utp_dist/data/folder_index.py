"""Listing ImageFolder trees at scale: one os.scandir walk per split folder, on the main process only, cached.

A split folder's listing is its class folders (every sub-folder, as torchvision's ImageFolder has it) and, per class,
the image files anywhere below it (sub-folders of a class folder belong to the class). The cache is valid while every
folder of the tree keeps the modification time it had when listed: adding, removing or renaming a file or a folder
changes the mtime of the folder that holds it, so the next job lists again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from utp_dist.data.builtin import default_cache_dir
from utp_dist.store import atomic

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
CACHE_VERSION = 1  # bump when the listing rules change, so older caches are ignored
CACHE_MIN_FILES = 10_000  # smaller trees list in milliseconds: no cache file is worth writing for them
RACY_NS = 2_000_000_000  # a folder changed this close to its listing may change again within its mtime's granularity


@dataclass
class Listing:
    """One split folder: its class folders and, per class, the image paths relative to the class folder, sorted."""

    classes: list[str]
    files: dict[str, list[str]]

    def count(self) -> int:
        """Image files in all classes."""
        return sum(len(f) for f in self.files.values())


def list_split(folder: Path, cache: bool = True) -> Listing:
    """The listing of `folder`, from the cache when no folder of the tree changed since it was written."""
    cache_file = _cache_file(folder) if cache else None
    listing = _read_cache(cache_file) if cache_file else None
    if listing is not None:
        return listing
    started = time.time_ns()
    mtimes: dict[str, int] = {"": os.stat(folder).st_mtime_ns}
    classes, files = [], {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                classes.append(entry.name)
    classes.sort()
    for name in classes:
        found: list[str] = []
        _walk(os.path.join(folder, name), "", found, mtimes, name)
        found.sort()
        files[name] = found
    listing = Listing(classes, files)
    if cache_file and listing.count() >= CACHE_MIN_FILES and max(mtimes.values()) < started - RACY_NS:
        _write_cache(cache_file, folder, listing, mtimes)
    return listing


def _walk(path: str, prefix: str, found: list[str], mtimes: dict[str, int], key: str) -> None:
    """Append the image files below `path` (as prefix + name) to `found`, recording every folder's mtime."""
    mtimes[key] = os.stat(path).st_mtime_ns  # before reading: a change during the walk makes the cache stale
    with os.scandir(path) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):  # hidden files and folders (.DS_Store, ._x.jpg, .git) are never images
                continue
            if entry.is_dir():  # follows symbolic links, as torchvision's ImageFolder does
                _walk(entry.path, f"{prefix}{name}/", found, mtimes, f"{key}/{name}")
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(prefix + name)


def cache_dir() -> Path:
    """Where listings are cached: UTP_DIST_CACHE/index (default ~/.cache/utp_dist/index)."""
    return default_cache_dir() / "index"


def _cache_file(folder: Path) -> Path:
    real = os.path.realpath(folder)
    return cache_dir() / f"{hashlib.sha256(real.encode()).hexdigest()[:24]}.json"


def _read_cache(path: Path) -> Listing | None:
    """The cached listing, None when missing, unreadable or stale (any folder's mtime differs)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("version") != CACHE_VERSION:
            return None
        root = raw["root"]
        for rel, mtime in raw["mtimes"].items():
            if os.stat(os.path.join(root, rel) if rel else root).st_mtime_ns != mtime:
                return None
        # one newline-joined string per class: JSON reads a few long strings far faster than a million short ones
        return Listing(raw["classes"], {c: (text.split("\n") if text else []) for c, text in raw["files"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_cache(path: Path, folder: Path, listing: Listing, mtimes: dict[str, int]) -> None:
    raw = {
        "version": CACHE_VERSION,
        "root": os.path.realpath(folder),
        "mtimes": mtimes,
        "classes": listing.classes,
        "files": {c: "\n".join(f) for c, f in listing.files.items()},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(raw))
    except OSError as err:  # a read-only or full cache folder only costs the next job a listing
        log.warning("could not write the index cache %s: %s", path, err.strerror)


def list_splits_once(root: Path, splits: tuple[str, ...]) -> dict[str, Listing]:
    """{split: listing} of the split folders present, listed by the main process only; the other ranks receive it.
    A folder that cannot be read raises OSError with the same one-line message on every rank."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    message = [_list_all(root, splits) if not distributed or dist.get_rank() == 0 else None]
    if distributed:  # the listing or its error: no rank is left waiting for the other
        dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], str):
        raise OSError(message[0])
    return message[0]


def _list_all(root: Path, splits: tuple[str, ...]) -> dict[str, Listing] | str:
    try:
        return {s: list_split(root / s) for s in splits if (root / s).is_dir()}
    except OSError as err:
        return f"cannot list '{err.filename}': {err.strerror}"
