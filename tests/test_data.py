"""utp_dist.data.loaders on real image files: decoding, indexing with caps, reproducible transforms, samplers and loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from utp_dist.config import DataConfig
from utp_dist.data.loaders import (
    IGNORE_LABEL,
    DataError,
    EpochSampler,
    ImageFolderSplit,
    InputSpec,
    build_loader,
    build_transforms,
    decode,
    index_splits,
)

# torchvision >= 0.29 warns that its image codecs are deprecated (moving to TorchCodec).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

H, W = 24, 32  # non-square, so a swapped (H, W) shows
SPEC = InputSpec(size=(16, 12), resize=18, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
COUNTS = {"train": 24, "val": 8, "test": 6}


def smooth_rgb() -> np.ndarray:
    """A gradient image: JPEG keeps it close to the source, unlike noise."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (H + W - 2)], -1).astype(np.uint8)


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(int)


def paths_of(samples) -> list[str]:
    return [p for p, _ in samples]


# --- decode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "ext", "exact"),
    [
        ("RGB", "jpg", False),
        ("RGB", "png", True),
        ("L", "png", True),
        ("L", "jpg", False),
        ("RGBA", "png", True),
        ("CMYK", "jpg", False),
        ("P", "png", True),
        ("RGB", "bmp", True),
        ("L", "bmp", True),
        ("RGB", "webp", False),
        ("RGB", "tif", True),
    ],
)
def test_decode_formats_to_uint8_rgb(tmp_path, mode, ext, exact):
    src = Image.fromarray(smooth_rgb())
    if mode == "P":
        img = src.quantize(colors=32)
    elif mode == "RGBA":
        img = src.convert("RGBA")
        img.putalpha(Image.fromarray(np.full((H, W), 77, np.uint8)))  # transparency must not darken the colours
    else:
        img = src.convert(mode)
    path = tmp_path / f"img.{ext}"
    img.save(path, **({"quality": 95} if ext == "jpg" else {}))
    # what the written pixels mean in RGB (for P: the palette colours, for L: gray, for CMYK: the naive inverse)
    expected = np.asarray(img.convert("RGB")).astype(int)

    out = decode(str(path))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, H, W)
    got = hwc(out)
    if mode == "L":
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    if exact:
        np.testing.assert_array_equal(got, expected)
    else:
        assert np.abs(got - expected).mean() < 3 and np.abs(got - expected).max() < 40
    # and close to the original colours (for RGB/L sources this is the source itself)
    if mode in ("RGB", "RGBA", "CMYK"):
        assert np.abs(got - smooth_rgb().astype(int)).mean() < 3


def test_decode_uppercase_extension(tmp_path):
    Image.fromarray(smooth_rgb()).save(tmp_path / "A.BMP")
    Image.fromarray(smooth_rgb()).save(tmp_path / "B.PNG")
    for name in ("A.BMP", "B.PNG"):
        np.testing.assert_array_equal(hwc(decode(str(tmp_path / name))), smooth_rgb())


def test_decode_16bit_png_gives_uint8(tmp_path):
    # BUG: torchvision decodes 16-bit PNGs to uint16; decode() promises uint8 (C, H, W), and a uint16
    # image later fails to collate with uint8 ones or is normalised with the wrong scale
    ramp = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 65535 // (H * W - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    out = decode(str(tmp_path / "deep.png"))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, H, W)
    assert int(out[0, 0, 0]) < 10 and int(out[0, -1, -1]) > 245


def test_decode_animated_gif_gives_one_frame(tmp_path):
    # BUG: decode_image returns (frames, 3, H, W) for an animated GIF; decode() promises (3, H, W)
    frames = [Image.fromarray(np.full((H, W, 3), v, np.uint8)) for v in (10, 120, 240)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = decode(str(tmp_path / "anim.gif"))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, H, W)


# --- index_splits ----------------------------------------------------------------------------------------


def test_index_splits_classes_and_counts(tmp_path):
    root = make_image_folder(tmp_path / "zoo", classes=("zebra", "ant", "moose"), per_class={"train": 4, "val": 2, "test": 1})
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "README.md").write_text("a file next to the class folders is not a class")
    splits = index_splits(DataConfig(root=str(root)), seed=0)
    assert splits.classes == ["ant", "moose", "zebra"] and splits.name == "zoo" and splits.root == root
    assert {s: len(v) for s, v in splits.samples.items()} == {"train": 12, "val": 6, "test": 3}
    for split, samples in splits.samples.items():
        for path, label in samples:
            assert Path(path).parent.name == splits.classes[label] and Path(path).parent.parent.name == split
            assert Path(path).suffix in (".png", ".jpg")
    assert len(splits.fingerprint()) == 21 and splits.fingerprint()[0] == ("train/ant/0000.jpg", 0)


def test_index_splits_test_is_optional_and_val_may_lack_a_class(image_root):
    shutil.rmtree(image_root / "test")
    shutil.rmtree(image_root / "val" / "fox")
    splits = index_splits(DataConfig(root=str(image_root)), seed=0)
    assert set(splits.samples) == {"train", "val"}
    assert len(splits.samples["val"]) == 16 and {y for _, y in splits.samples["val"]} == {0, 1}


def test_class_missing_from_train(image_root):
    (image_root / "val" / "wolf").mkdir()
    write_png(image_root / "val" / "wolf" / "a.png")
    with pytest.raises(DataError, match="class 'wolf'") as info:
        index_splits(DataConfig(root=str(image_root)), seed=0)
    assert str(image_root / "val") in str(info.value)


def test_missing_val_folder_is_named(image_root):
    shutil.rmtree(image_root / "val")
    with pytest.raises(DataError) as info:
        index_splits(DataConfig(root=str(image_root)), seed=0)
    assert str(image_root / "val") in str(info.value)


def test_empty_train_class_folder(image_root):
    (image_root / "train" / "emu").mkdir()
    with pytest.raises(DataError, match="has no images") as info:
        index_splits(DataConfig(root=str(image_root)), seed=0)
    assert str(image_root / "train" / "emu") in str(info.value)


def test_train_without_class_folders(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "d" / split).mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        index_splits(DataConfig(root=str(tmp_path / "d")), seed=0)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        index_splits(DataConfig(root=str(tmp_path / "nowhere")), seed=0)
    assert str(tmp_path / "nowhere") in str(info.value)


def test_unknown_builtin_is_a_data_error():
    with pytest.raises(DataError, match="data.root"):
        index_splits(DataConfig(root="builtin:imagenet-huge"), seed=0)


# --- caps -------------------------------------------------------------------------------------------------


def per_class(samples, classes) -> dict[str, int]:
    return {name: sum(1 for _, y in samples if y == i) for i, name in enumerate(classes)}


def test_int_cap_is_seeded_and_applies_to_train_only(image_root):
    cfg = DataConfig(root=str(image_root), max_datapoints_per_class=5)
    first = index_splits(cfg, seed=1)
    assert per_class(first.samples["train"], first.classes) == {"cat": 5, "dog": 5, "fox": 5}
    assert len(first.samples["val"]) == 3 * COUNTS["val"] and len(first.samples["test"]) == 3 * COUNTS["test"]
    full = set(paths_of(index_splits(DataConfig(root=str(image_root)), seed=1).samples["train"]))
    assert set(paths_of(first.samples["train"])) <= full
    # the same seed picks the same files, another seed picks others
    assert index_splits(cfg, seed=1).samples == first.samples
    assert paths_of(index_splits(cfg, seed=2).samples["train"]) != paths_of(first.samples["train"])


def test_cap_above_class_size_keeps_everything(image_root):
    splits = index_splits(DataConfig(root=str(image_root), max_datapoints_per_class=1000), seed=0)
    assert len(splits.samples["train"]) == 3 * COUNTS["train"]


def test_per_class_cap_only_caps_named_classes(image_root):
    splits = index_splits(DataConfig(root=str(image_root), max_datapoints_per_class={"dog": 3}), seed=0)
    assert per_class(splits.samples["train"], splits.classes) == {"cat": 24, "dog": 3, "fox": 24}
    assert per_class(splits.samples["val"], splits.classes) == {"cat": 8, "dog": 8, "fox": 8}


def test_per_split_cap(image_root):
    cfg = DataConfig(root=str(image_root), max_datapoints_per_class={"val": 2, "test": {"cat": 1}})
    splits = index_splits(cfg, seed=0)
    assert per_class(splits.samples["train"], splits.classes) == {"cat": 24, "dog": 24, "fox": 24}
    assert per_class(splits.samples["val"], splits.classes) == {"cat": 2, "dog": 2, "fox": 2}
    assert per_class(splits.samples["test"], splits.classes) == {"cat": 1, "dog": 6, "fox": 6}


def test_cap_naming_an_unknown_class(image_root):
    with pytest.raises(DataError, match="class 'wolf' is not in the data") as info:
        index_splits(DataConfig(root=str(image_root), max_datapoints_per_class={"wolf": 3}), seed=0)
    assert "cat, dog, fox" in str(info.value) and "data.max_datapoints_per_class" in str(info.value)


def test_a_class_named_like_a_split_is_cappable_and_the_ambiguous_map_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "named", classes=("cat", "test"), per_class={"train": 6, "val": 4, "test": 4})
    with pytest.raises(DataError) as info:
        index_splits(DataConfig(root=str(root), max_datapoints_per_class={"test": 2}), seed=0)
    message = str(info.value)
    assert "ambiguous" in message and "{per_split: {test: 2}}" in message and "{classes: {test: 2}}" in message
    assert "\n" not in message
    by_class = index_splits(DataConfig(root=str(root), max_datapoints_per_class={"classes": {"test": 2}}), seed=0)
    assert per_class(by_class.samples["train"], by_class.classes) == {"cat": 6, "test": 2}
    assert per_class(by_class.samples["test"], by_class.classes) == {"cat": 4, "test": 4}
    by_split = index_splits(DataConfig(root=str(root), max_datapoints_per_class={"per_split": {"test": 2}}), seed=0)
    assert per_class(by_split.samples["train"], by_split.classes) == {"cat": 6, "test": 6}
    assert per_class(by_split.samples["test"], by_split.classes) == {"cat": 2, "test": 2}


# --- ImageFolderSplit and transforms ------------------------------------------------------------------------


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_rgb()).save(path)


def dataset(root: Path, train: bool = True, augment: str = "standard", seed: int = 0, on_bad_image: str = "error"):
    splits = index_splits(DataConfig(root=str(root)), seed=0)
    train_tf, eval_tf = build_transforms(SPEC, augment)
    samples = splits.samples["train" if train else "val"]
    return ImageFolderSplit(samples, train_tf if train else eval_tf, seed, on_bad_image, randomized=train and augment != "none")


def test_items_are_uint8_of_spec_size(image_root):
    for ds in (dataset(image_root, train=True), dataset(image_root, train=False)):
        for index in (0, len(ds) - 1):
            image, label = ds[(0, index)]
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *SPEC.size)
            assert label == ds.samples[index][1]


def test_augmentation_is_keyed_by_seed_epoch_index(image_root):
    ds = dataset(image_root)
    again = dataset(image_root)  # a fresh dataset, as in another worker or process
    torch.manual_seed(123)
    a = ds[(0, 3)][0]
    torch.manual_seed(999)  # the global RNG must not matter
    assert torch.equal(ds[(0, 3)][0], a) and torch.equal(again[(0, 3)][0], a)
    # other epochs (and another seed) augment differently
    idx = range(6)
    assert any(not torch.equal(ds[(0, i)][0], ds[(1, i)][0]) for i in idx)
    other_seed = dataset(image_root, seed=1)
    assert any(not torch.equal(ds[(0, i)][0], other_seed[(0, i)][0]) for i in idx)


def test_eval_transform_is_deterministic_resize_and_crop(image_root):
    ds = dataset(image_root, train=False)
    assert torch.equal(ds[(0, 2)][0], ds[(7, 2)][0])
    plain = dataset(image_root, train=True, augment="none")
    assert all(torch.equal(plain[(0, i)][0], plain[(5, i)][0]) for i in range(4))


def test_getitem_leaves_global_rng_alone(image_root):
    ds = dataset(image_root)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    for i in range(4):
        ds[(i, i)]
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("ext", ["jpg", "png", "bmp"])
def test_corrupt_image(image_root, ext):
    bad = image_root / "train" / "dog" / f"zz_broken.{ext}"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    ds = dataset(image_root)
    index = paths_of(ds.samples).index(str(bad))
    with pytest.raises(DataError, match="on_bad_image=skip") as info:
        ds[(0, index)]
    assert str(bad) in str(info.value)
    skipping = dataset(image_root, on_bad_image="skip")
    image, label = skipping[(0, index)]
    assert label == IGNORE_LABEL == -100
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *SPEC.size)
    # the neighbours still load with their labels
    assert skipping[(0, index - 1)][1] == ds.samples[index - 1][1]


# --- EpochSampler --------------------------------------------------------------------------------------------


def order(sampler: EpochSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    keys = list(sampler)
    assert all(e == epoch for e, _ in keys)
    return [i for _, i in keys]


def test_epoch_sampler_order():
    s = EpochSampler(50, seed=3, shuffle=True)
    e0 = order(s, 0)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    assert order(EpochSampler(50, seed=3, shuffle=True), 0) == e0  # the same on every rank / run
    assert order(s, 1) != e0
    assert order(s, 0) == e0
    assert order(EpochSampler(50, seed=4, shuffle=True), 0) != e0


def test_epoch_sampler_multiple_of_and_sequential():
    s = EpochSampler(23, seed=0, shuffle=True, multiple_of=8)
    assert len(s) == 16
    idx = order(s, 2)
    assert len(idx) == 16 and len(set(idx)) == 16 and set(idx) <= set(range(23))
    seq = EpochSampler(10, seed=0, shuffle=False, multiple_of=4)
    assert order(seq, 0) == list(range(8)) == order(seq, 5)
    assert len(EpochSampler(3, seed=0, shuffle=True, multiple_of=4)) == 0


# --- build_loader --------------------------------------------------------------------------------------------


def batches(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return list(loader)


def test_loader_batches_and_drop_last_global(image_root):
    ds = dataset(image_root)  # 72 training images
    cfg = DataConfig(root=str(image_root), batch_size=5, num_workers=0)
    loader, sampler = build_loader(ds, cfg, seed=0, train=True, world_size=1, pin_memory=False)
    got = batches(loader, sampler, 0)
    assert [len(y) for _, y in got] == [5] * 14  # 72 -> 70: the last partial batch is dropped
    # with 3 ranks a global batch is 15 images: 72 -> 60
    loader, sampler = build_loader(ds, cfg, seed=0, train=True, world_size=3, pin_memory=False)
    assert len(sampler) == 60 and sum(len(y) for _, y in batches(loader, sampler, 0)) == 60
    # evaluation keeps every image, in order, with 2 x batch_size
    val = dataset(image_root, train=False)
    loader, sampler = build_loader(val, cfg, seed=0, train=False, world_size=1, pin_memory=False)
    got = batches(loader, sampler, 0)
    assert [len(y) for _, y in got] == [10, 10, 4]
    assert torch.cat([y for _, y in got]).tolist() == [y for _, y in val.samples]


def test_loader_workers_match_in_process(image_root):
    ds = dataset(image_root)
    runs = {}
    for workers in (0, 2):
        cfg = DataConfig(root=str(image_root), batch_size=8, num_workers=workers)
        loader, sampler = build_loader(ds, cfg, seed=0, train=True, world_size=1, pin_memory=False)
        runs[workers] = [batches(loader, sampler, epoch) for epoch in (0, 1)]
    for x, y in runs[2][0]:
        assert x.dtype == torch.uint8 and tuple(x.shape) == (8, 3, *SPEC.size)
        assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    for epoch in (0, 1):
        assert len(runs[0][epoch]) == len(runs[2][epoch]) == 9
        for (x0, y0), (x2, y2) in zip(runs[0][epoch], runs[2][epoch], strict=True):
            assert torch.equal(y0, y2) and torch.equal(x0, x2)
    # epochs differ in order and augmentation
    assert not torch.equal(torch.cat([y for _, y in runs[2][0]]), torch.cat([y for _, y in runs[2][1]]))
