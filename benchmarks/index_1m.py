"""Index a generated ImageFolder tree of 1M empty files: utp_dist's index without and with its cache, and torchvision's
ImageFolder, in the same run with a warm page cache.

    python benchmarks/index_1m.py [--classes 1000] [--per-class 1000] [--dir /tmp] [--keep]

Files are empty (an inode each, no data blocks); the tree is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def make_class(folder: str, count: int) -> None:
    """`count` empty JPEG-named files in `folder`, ImageNet-style names."""
    os.makedirs(folder)
    stem = os.path.basename(folder)
    for i in range(count):
        os.close(os.open(os.path.join(folder, f"{stem}_{i:06d}.JPEG"), os.O_CREAT | os.O_WRONLY, 0o644))


def generate(root: Path, classes: int, per_class: int) -> None:
    """train/ with classes x per_class files and val/ with one file per class; folders aged a minute (a tree at rest)."""
    jobs = [(str(root / "train" / f"n{c:08d}"), per_class) for c in range(classes)]
    jobs += [(str(root / "val" / f"n{c:08d}"), 1) for c in range(classes)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(make_class, *zip(*jobs, strict=True), chunksize=16))
    past = time.time() - 60
    for folder, _ in jobs:
        os.utime(folder, (past, past))
    for folder in (root / "train", root / "val", root):
        os.utime(folder, (past, past))


def timed(fn, repeat: int) -> tuple[float, object]:
    """(median seconds over `repeat` calls, the last result)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    """Generate, measure, print a Markdown table, delete."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the tree is generated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated tree")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    work = Path(tempfile.mkdtemp(prefix="utp_index_1m.", dir=args.dir))
    os.environ["UTP_DIST_CACHE"] = str(work / "cache")  # set before utp_dist reads it
    from torchvision.datasets import ImageFolder

    from utp_dist.config import DataConfig
    from utp_dist.data import folder_index
    from utp_dist.data.loaders import index_splits

    root = work / "data"
    try:
        start = time.perf_counter()
        generate(root, args.classes, args.per_class)
        total = args.classes * args.per_class
        print(f"generated {total:,} files in {args.classes} classes in {time.perf_counter() - start:.1f} s under {root}")
        cfg = DataConfig(root=str(root))
        ImageFolder(str(root / "train"))  # warms the page cache and the dentry cache for every contender

        def uncached():
            shutil.rmtree(folder_index.cache_dir(), ignore_errors=True)
            return index_splits(cfg, 0)

        rows = []
        seconds, splits = timed(uncached, args.repeat)
        assert len(splits.samples["train"]) == total
        rows.append(("utp_dist index_splits, no cache (lists and writes the cache)", seconds))
        rows.append(("utp_dist index_splits, cached", timed(lambda: index_splits(cfg, 0), args.repeat)[0]))
        seconds, dataset = timed(lambda: ImageFolder(str(root / "train")), args.repeat)
        assert len(dataset) == total
        rows.append(("torchvision ImageFolder(train) (no val)", seconds))
        print(f"\n| {total:,} files, median of {args.repeat} | seconds |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
