"""The data index: ImageFolder rules (nested class folders), one listing per job shared with every rank, the cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import make_image_folder, write_image

from utp_dist.config import DataConfig
from utp_dist.data import folder_index
from utp_dist.data.loaders import DataError, index_splits


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache folder that caches any tree, however small."""
    monkeypatch.setenv("UTP_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(folder_index, "CACHE_MIN_FILES", 1)
    return tmp_path / "cache" / "index"


def _age(root: Path) -> None:
    """Set every folder's mtime a minute back: a tree at rest, not one written in the last second."""
    past = time.time() - 60
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (past, past))


def _files(root: Path, split: str = "train") -> list[tuple[str, int]]:
    return [(str(Path(p).relative_to(root / split)), y) for p, y in index_splits(DataConfig(root=str(root)), 0).samples[split]]


def test_images_in_sub_folders_of_a_class_folder_belong_to_the_class(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 2, "val": 1})
    rng = __import__("numpy").random.default_rng(0)
    write_image(root / "train" / "cat" / "indoor" / "deep" / "a.png", rng, 0)
    write_image(root / "train" / "bird" / "2024" / "b.jpg", rng, 1)  # a class folder holding only a sub-folder
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"")  # hidden files are never images
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    files = _files(root)
    assert ("cat/indoor/deep/a.png", 1) in files and ("bird/2024/b.jpg", 0) in files
    assert not any("hidden" in f or f.endswith(".txt") for f, _ in files)
    assert index_splits(DataConfig(root=str(root)), 0).classes == ["bird", "cat", "dog", "fox"]


def test_an_empty_class_folder_is_still_named(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 2, "val": 1})
    (root / "train" / "owl" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"class folder '.*owl' has no images \(in it or its sub-folders\)"):
        index_splits(DataConfig(root=str(root)), 0)


def test_the_cache_is_used_and_notices_added_removed_and_renamed_files_and_classes(tmp_path, cache, monkeypatch):
    root = make_image_folder(tmp_path / "d", per_class={"train": 3, "val": 1})
    rng = __import__("numpy").random.default_rng(0)
    write_image(root / "train" / "cat" / "sub" / "x.png", rng, 0)
    _age(root)
    first = _files(root)
    assert len(list(cache.glob("*.json"))) == 2  # train and val
    # a second job reads the cache: no folder is scanned
    with monkeypatch.context() as patch:
        patch.setattr(folder_index, "_walk", lambda *a: pytest.fail("listed again although nothing changed"))
        assert _files(root) == first

    write_image(root / "train" / "cat" / "sub" / "new.png", rng, 0)  # a new file in a nested folder
    assert ("cat/sub/new.png", 0) in _files(root)
    (root / "train" / "dog" / "0000.jpg").unlink()
    assert ("dog/0000.jpg", 1) not in _files(root)
    (root / "train" / "dog" / "0001.png").rename(root / "train" / "dog" / "renamed.png")
    assert ("dog/renamed.png", 1) in _files(root)
    for split in ("train", "val"):
        (root / split / "fox").rename(root / split / "wolf")
    assert index_splits(DataConfig(root=str(root)), 0).classes == ["cat", "dog", "wolf"]


def test_a_damaged_cache_file_is_ignored(tmp_path, cache):
    root = make_image_folder(tmp_path / "d", per_class={"train": 2, "val": 1})
    _age(root)
    first = _files(root)
    for path in cache.glob("*.json"):
        path.write_text("{not json")
    assert _files(root) == first
    for path in cache.glob("*.json"):
        json.loads(path.read_text())  # written again, readable


def test_a_tree_changed_within_the_last_seconds_is_not_cached(tmp_path, cache):
    root = make_image_folder(tmp_path / "d", per_class={"train": 2, "val": 1})
    _files(root)  # just written: its folders' mtimes may not yet tell a further change apart
    assert not list(cache.glob("*.json"))


def _rank(rank: int, root: str, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    calls = []
    original = folder_index.list_split
    folder_index.list_split = lambda folder, cache=True: calls.append(folder) or original(folder, cache)
    splits = index_splits(DataConfig(root=root), 0)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"samples": splits.samples, "listed": len(calls)}))
    dist.destroy_process_group()


def test_the_main_process_lists_and_every_rank_gets_the_same_index(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 4, "val": 2, "test": 1})
    mp.spawn(_rank, args=(str(root), str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["samples"] == ranks[1]["samples"] and len(ranks[0]["samples"]["train"]) == 12
    assert (ranks[0]["listed"], ranks[1]["listed"]) == (3, 0)  # train, val, test: on rank 0 only
