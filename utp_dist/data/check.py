"""`python -m utp_dist.data check ROOT [--decode]`: what in an ImageFolder root would stop or spoil a run, before it starts.

Per split and class: image counts, unreadable or truncated files (header check; a full decode with --decode) and tiny
images; then classes missing from a split, and byte-identical files shared between train and val/test. Exit code 1
when something would stop a run (the index's own errors, unreadable files under the default data.on_bad_image).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from utp_dist.config import SPLITS, DataConfig
from utp_dist.data.folder_index import list_splits_once
from utp_dist.data.loaders import DataError, decode, index_splits, resolve_root
from utp_dist.errors import UserError, first_line, run_command

# the last bytes a complete file of the format holds (JPEG's EOI marker, PNG's IEND chunk, GIF's trailer)
ENDINGS = {"JPEG": (b"\xff\xd9", 64), "PNG": (b"IEND", 12), "GIF": (b";", 2)}
EXAMPLES = 3  # files named per problem; the counts say how many more


@dataclass
class Report:
    """Everything found in one data root."""

    root: Path
    rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing would stop a run."""
        return not self.errors


def inspect_file(path: str, full: bool) -> tuple[str | None, tuple[int, int] | None]:
    """(problem or None, (width, height) or None) of one image: its header, its ending, and with `full` a decode."""
    try:
        with Image.open(path) as img:  # reads the header only
            size, fmt = img.size, img.format
    except Exception as err:  # PIL raises many types for a bad file; any of them means unreadable
        return f"unreadable ({first_line(err)})", None
    if fmt in ENDINGS:
        ending, span = ENDINGS[fmt]
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - span))
            if ending not in fh.read():
                return "truncated", size
    if full:
        try:
            decode(path)
        except (RuntimeError, OSError, ValueError) as err:
            return f"cannot decode ({first_line(err)})", size
    return None, size


def check(root_arg: str, full: bool = False, min_size: int = 32, workers: int = 8) -> Report:
    """Check one data root (a folder or builtin:NAME)."""
    try:
        root = resolve_root(root_arg)
    except DataError as err:
        return Report(Path(root_arg), errors=[str(err)])
    report = Report(root)
    try:
        index_splits(DataConfig(root=root_arg), 0)  # the index's own rules: what would stop a run at its start
    except DataError as err:
        report.errors.append(str(err))
    try:
        listings = list_splits_once(root, SPLITS)
    except OSError:  # a folder that cannot be read: the index's error above already names it
        return report
    classes = listings["train"].classes if "train" in listings else sorted({c for lst in listings.values() for c in lst.classes})
    files = {s: [(str(root / s / c / rel), c) for c in lst.classes for rel in lst.files[c]] for s, lst in listings.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = {s: list(pool.map(lambda item: inspect_file(item[0], full), items)) for s, items in files.items()}
    for split, items in files.items():
        counts: dict[str, dict] = {c: {"split": split, "class": c, "images": 0, "damaged": 0, "tiny": 0} for c in listings[split].classes}
        bad, tiny = [], []
        for (path, name), (problem, size) in zip(items, results[split], strict=True):
            counts[name]["images"] += 1
            if problem:
                counts[name]["damaged"] += 1
                bad.append(f"{path}: {problem}")
            elif size is not None and min(size) < min_size:
                counts[name]["tiny"] += 1
                tiny.append(f"{path} ({size[0]}x{size[1]})")
        report.rows += list(counts.values())
        if bad:
            report.errors.append(
                f"{split}: {len(bad)} unreadable or truncated file(s): {_examples(bad)}; fix or delete them, or set data.on_bad_image=skip"
            )
        if tiny:
            report.warnings.append(f"{split}: {len(tiny)} image(s) smaller than {min_size} px: {_examples(tiny)}")
        missing = [c for c in classes if c not in listings[split].classes or not listings[split].files[c]]
        if missing and split != "train":
            report.warnings.append(f"{split}: no images of class(es) {', '.join(missing)}")
    shared = _shared_files(files)
    if shared:
        report.warnings.append(f"{len(shared)} file(s) in val/test are byte-identical to train files: {_examples(shared)}")
    return report


def _shared_files(files: dict[str, list[tuple[str, str]]]) -> list[str]:
    """'val/test file = train file' for byte-identical pairs: sizes first, hashes only where sizes meet."""
    sizes: dict[str, dict[int, list[str]]] = {s: defaultdict(list) for s in files}
    for split, items in files.items():
        for path, _ in items:
            sizes[split][os.path.getsize(path)].append(path)
    train = sizes.get("train", {})
    found = []
    for split in ("val", "test"):
        for size, paths in sizes.get(split, {}).items():
            if size not in train:
                continue
            train_hashes = {_digest(p): p for p in train[size]}
            found += [f"{p} = {train_hashes[d]}" for p in paths if (d := _digest(p)) in train_hashes]
    return found


def _digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _examples(items: list[str]) -> str:
    more = f" and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else ""
    return ", ".join(items[:EXAMPLES]) + more


def render(report: Report) -> str:
    """The per split and class table, then one line per error and warning."""
    columns = ("split", "class", "images", "damaged", "tiny")
    cells = [columns, *([str(row[c]) for c in columns] for row in report.rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [f"data root {report.root}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines += [f"ERROR {e}" for e in report.errors] + [f"WARNING {w}" for w in report.warnings]
    lines.append("ok: nothing would stop a run" if report.ok else f"{len(report.errors)} problem(s) would stop a run")
    return "\n".join(lines)


def check_roots(roots: list[str], full: bool = False) -> bool:
    """Check and print each root; whether all are ok (what `submit --preflight` runs)."""
    ok = True
    for root in roots:
        report = check(root, full)
        print(render(report))
        ok = ok and report.ok
    return ok


def main(argv: list[str] | None = None) -> int:
    """`check ROOT [--decode]`: exit 0 when nothing would stop a run, 1 when something would, 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m utp_dist.data", description="Check an ImageFolder root before training on it.")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("check", help="counts, unreadable/truncated/tiny images, missing classes, train/val/test duplicates")
    sub.add_argument("root", help="ImageFolder root with train/ and val/ [test/], or builtin:NAME")
    sub.add_argument("--decode", action="store_true", help="decode every image fully (slower; finds damage a header check misses)")
    sub.add_argument("--min-size", type=int, default=32, help="warn about images whose shorter side is below this (default 32 px)")
    sub.add_argument("--workers", type=int, default=8, help="threads reading files (default 8)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*image decoding and encoding.*")

    def body() -> int:
        if args.workers < 1:
            raise UserError("--workers must be >= 1")
        report = check(args.root, args.decode, args.min_size, args.workers)
        print(render(report))
        return 0 if report.ok else 1

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
