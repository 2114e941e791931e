"""Write a JPEG ImageFolder (about 500x375 photos-like noise with a class-dependent colour cast) for GPU benchmarks."""

from __future__ import annotations

import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image


def _write(job: tuple[str, int, int]) -> None:
    path, label, seed = job
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16)
    arr[..., label % 3] += 40 + 10 * (label // 3)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def main(root: str, classes: int = 10, train: int = 300, val: int = 50) -> None:
    """ROOT/{train,val}/class_K/*.jpg."""
    jobs = []
    for split, n in (("train", train), ("val", val)):
        for label in range(classes):
            folder = Path(root) / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(str(folder / f"{i:05d}.jpg"), label, hash((split, label, i)) & 0xFFFFFFFF) for i in range(n)]
    with Pool() as pool:
        pool.map(_write, jobs, chunksize=64)


if __name__ == "__main__":
    main(sys.argv[1])
