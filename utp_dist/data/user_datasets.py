"""`data.dataset`: where a run's splits come from (data.py's ImageFolder index by default, or a user's function), checked
and capped the same way whatever their source, so sampling, caps, resume and metrics work for any of them."""

from __future__ import annotations

from collections import defaultdict

from utp_dist.config import SPLITS, DataConfig
from utp_dist.data.loaders import DataError, Splits, cap_files, check_cap_classes, index_splits
from utp_dist.registry import DATASETS


def build_splits(cfg: DataConfig, seed: int) -> Splits:
    """The splits of data.dataset, checked, with data.max_datapoints_per_class applied."""
    build = DATASETS.get(cfg.dataset)
    if build is index_splits:  # the ImageFolder index checks and caps as it lists: no second pass over a large tree
        return index_splits(cfg, seed)
    splits = build(cfg, seed)
    _check(splits, cfg.dataset)
    ambiguous = cfg.ambiguous_cap(splits.classes)
    if ambiguous:
        raise DataError(ambiguous)
    samples = {split: _capped(items, splits.classes, cfg.cap_for(split), seed, split) for split, items in splits.samples.items()}
    return Splits(splits.root, splits.classes, samples)


def _check(splits: Splits, spec: str) -> None:
    """One line naming data.dataset for anything the trainer could not use."""
    where = f"data.dataset: {spec}"
    if not isinstance(splits, Splits):
        raise DataError(f"{where} returned {type(splits).__name__}; return utp_dist.data.loaders.Splits(root, classes, samples)")
    if not splits.classes:
        raise DataError(f"{where} returned no classes")
    for split in ("train", "val"):
        if not splits.samples.get(split):
            raise DataError(f"{where} returned no {split} images; train and val are required")
    for split, items in splits.samples.items():
        if split not in SPLITS:
            raise DataError(f"{where} returned a split '{split}'; splits are {', '.join(SPLITS)}")
        bad = next((label for _, label in items if not (isinstance(label, int) and 0 <= label < len(splits.classes))), None)
        if bad is not None:
            raise DataError(
                f"{where}: {split} has label {bad!r}; labels index the {len(splits.classes)} classes (0 to {len(splits.classes) - 1})"
            )
        root = str(splits.root).rstrip("/") + "/"
        outside = next((path for path, _ in items if not str(path).startswith(root)), None)
        if outside is not None:  # resume hashes every file's path relative to the root
            raise DataError(f"{where}: '{outside}' is not under Splits.root '{splits.root}'; every file must lie under the root")
    if len(splits.classes) < 2:
        raise DataError(f"{where} returned one class ('{splits.classes[0]}'); a classifier needs at least two classes")


def _capped(items: list[tuple[str, int]], classes: list[str], cap: int | dict | None, seed: int, split: str) -> list[tuple[str, int]]:
    """At most `cap` files per class, by the rule of data.py's index."""
    check_cap_classes(cap, classes)
    by_class = defaultdict(list)
    for path, label in items:
        by_class[label].append(path)
    return [(f, label) for label, name in enumerate(classes) for f in cap_files(by_class[label], cap, seed, split, name)]
