#!/usr/bin/env python3
"""Rebuild utp_dist/data/assets/fashion_mnist_mini.npz from Debian's dataset-fashion-mnist files.

Usage: python scripts/build_fashion_mnist_mini.py [SRC_DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import pathlib

import numpy as np

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "utp_dist" / "data" / "assets" / "fashion_mnist_mini.npz"
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
SEED = 20240601
N_TRAIN, N_VAL, N_TEST = 250, 60, 40  # per class


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Read a gzipped IDX file (ubyte data only) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    # Magic: two zero bytes, dtype code 0x08 (ubyte), number of dimensions.
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def pick(labels: np.ndarray, counts: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Draw disjoint per-class index sets of the given sizes; each set sorted by class then index."""
    out: list[list[np.ndarray]] = [[] for _ in counts]
    for c in range(len(CLASSES)):
        perm = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, n in enumerate(counts):
            if start + n > perm.size:
                raise ValueError(f"class {c}: only {perm.size} images, need {sum(counts)}")
            out[k].append(np.sort(perm[start : start + n]))
            start += n
    return [np.concatenate(parts) for parts in out]


def build(src: pathlib.Path, out: pathlib.Path) -> None:
    """Write the mini data set to `out`."""
    rng = np.random.default_rng(SEED)
    tr_x = read_idx(src / "train-images-idx3-ubyte.gz")
    tr_y = read_idx(src / "train-labels-idx1-ubyte.gz")
    te_x = read_idx(src / "t10k-images-idx3-ubyte.gz")
    te_y = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    train_idx, val_idx = pick(tr_y, (N_TRAIN, N_VAL), rng)
    (test_idx,) = pick(te_y, (N_TEST,), rng)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        train_x=tr_x[train_idx],
        train_y=tr_y[train_idx],
        val_x=tr_x[val_idx],
        val_y=tr_y[val_idx],
        test_x=te_x[test_idx],
        test_y=te_y[test_idx],
        classes=np.array(CLASSES),
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): train {train_idx.size}, val {val_idx.size}, test {test_idx.size}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=DEFAULT_SRC, help=f"directory with the IDX .gz files (default {DEFAULT_SRC})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output .npz (default utp_dist/data/assets/fashion_mnist_mini.npz)")
    args = ap.parse_args()
    build(pathlib.Path(args.src), pathlib.Path(args.out))


if __name__ == "__main__":
    main()
