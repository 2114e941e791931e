"""Built-in data sets ("builtin:NAME"), materialised on demand as ImageFolder trees."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("fashion-mnist-mini",)

_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
_NPZ = {"fashion-mnist-mini": "fashion_mnist_mini.npz"}
_SPLITS = ("train", "val", "test")
_MARKER = ".complete"


def default_cache_dir() -> pathlib.Path:
    """Return $UTP_DIST_CACHE, else $XDG_CACHE_HOME/utp_dist, else ~/.cache/utp_dist."""
    if os.environ.get("UTP_DIST_CACHE"):
        return pathlib.Path(os.environ["UTP_DIST_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "utp_dist"


def materialize(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Write built-in data set `name` as CACHE/NAME/{train,val,test}/CLASS/NNNNN.png and return its root."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in data set {name!r}; valid: " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS))
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / name
    if (root / _MARKER).is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    # Build in a private sibling so concurrent callers (e.g. several ranks) never see
    # a half-written tree; the final rename is atomic on one file system.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    try:
        _write_tree(_ASSETS / _NPZ[name], tmp)
        (tmp / _MARKER).touch()  # written last: marks the tree complete
        try:
            os.rename(tmp, root)
        except OSError:
            # Lost the race: another process renamed its (complete) tree first.
            if not (root / _MARKER).is_file():
                raise RuntimeError(f"{root} exists but is incomplete; delete it and retry") from None
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_tree(npz_path: pathlib.Path, out: pathlib.Path) -> None:
    # PIL rather than torchvision.io: the latter's PNG codec is deprecated since 0.29.
    # Imported here so that reading BUILTIN_* constants stays cheap.
    from PIL import Image

    with np.load(npz_path) as data:
        classes = [str(c) for c in data["classes"]]
        for split in _SPLITS:
            xs, ys = data[f"{split}_x"], data[f"{split}_y"]
            for cls in classes:
                (out / split / cls).mkdir(parents=True)
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                Image.fromarray(x).save(out / split / classes[y] / f"{i:05d}.png")
