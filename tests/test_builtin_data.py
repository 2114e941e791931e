import multiprocessing

import pytest
import torchvision.io

from utp_dist.data.builtin import BUILTIN_DATASETS, default_cache_dir, materialize

NAME = "fashion-mnist-mini"
PER_CLASS = {"train": 250, "val": 60, "test": 40}

# torchvision >= 0.29 warns that its image codecs are deprecated (moving to TorchCodec).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return materialize(NAME, tmp_path_factory.mktemp("cache"))


def test_tree_layout(root):
    assert root.name == NAME and (root / ".complete").is_file()
    for split, n in PER_CLASS.items():
        classes = sorted(p for p in (root / split).iterdir())
        assert len(classes) == 10
        assert {len(list(c.glob("*.png"))) for c in classes} == {n}


def test_images_decode_as_grayscale_28x28(root):
    for split in PER_CLASS:
        path = next((root / split / "Bag").glob("*.png"))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = torchvision.io.decode_image(str(path))
        assert img.shape == (1, 28, 28)


def test_second_call_reuses_tree(root):
    png = next((root / "train" / "Coat").glob("*.png"))
    before = (png.stat().st_mtime_ns, (root / ".complete").stat().st_mtime_ns)
    assert materialize(NAME, root.parent) == root
    assert (png.stat().st_mtime_ns, (root / ".complete").stat().st_mtime_ns) == before


def test_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="builtin:fashion-mnist-mini"):
        materialize("nope", tmp_path)
    assert BUILTIN_DATASETS == (NAME,)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("UTP_DIST_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("UTP_DIST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "utp_dist"


def test_concurrent_processes(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        roots = pool.starmap(materialize, [(NAME, str(tmp_path))] * 2)
    assert roots == [tmp_path / NAME] * 2
    # The loser of the rename race must have removed its temporary tree.
    assert [p.name for p in tmp_path.iterdir()] == [NAME]
    assert len(list((tmp_path / NAME / "val").glob("*/*.png"))) == 600
