"""The exported model's image processor describes the training input: transformers.pipeline on the export gives the
same top-1 and scores as predict, and the run's test accuracy, for input sizes that differ from the processor's
defaults (data.image_size, a config without image_size, ConvNeXt's crop_pct, a pretrained processor overridden)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_vit, tiny_config
from PIL import Image

from utp_dist.config import from_dict

CLASSES = ("cat", "dog", "fox")
# non-square images of several shapes and modes: the shortest-edge resize, the crop offsets and grayscale -> RGB all matter
SHAPES = [(23, 31, "RGB"), (31, 22, "L"), (26, 26, "RGB"), (29, 24, "P")]


def _write_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in {"train": 8, "val": 4, "test": 6}.items():
        for label, name in enumerate(CLASSES):
            for i in range(n):
                height, width, mode = SHAPES[(i + label) % len(SHAPES)]
                arr = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
                arr[: height // 2 if label != 1 else height, : width // 2 if label != 2 else width] += np.uint8(120)
                path = root / split / name / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).convert(mode).save(path)
    return root


def _save_tiny_resnet(folder: Path) -> Path:
    """A pretrained-style ResNet with the ConvNeXt processor the hub's ResNets ship (bicubic, crop_pct, own statistics)."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(
        size={"shortest_edge": 32}, crop_pct=0.9, image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3]
    ).save_pretrained(folder)
    return folder


RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}
CASES = {
    # the quickstart's kind: no image_size in the ResNet config (processor default 384), data.image_size 24 -> resize 27,
    # crop 24: an odd margin, where a rounding centre crop and the processor's would differ
    "resnet-scratch": lambda tmp: {"model": {"flavour": "resnet", "config": RESNET}, "data": {"image_size": 24}},
    "vit-scratch": lambda tmp: {"data": {"image_size": 16}},
    "convnext-scratch": lambda tmp: {
        "model": {"flavour": "convnext", "config": {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 1], "patch_size": 2}},
        "data": {"image_size": 20},
    },
    "vit-pretrained": lambda tmp: {
        "model": {"flavour": str(save_tiny_vit(tmp / "tiny-vit")), "pretrained": True, "config": {}},
        "data": {"image_size": None},
    },
    "resnet-pretrained-override": lambda tmp: {
        "model": {"flavour": str(_save_tiny_resnet(tmp / "tiny-resnet")), "pretrained": True, "config": {}},
        "data": {"image_size": 20},
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """(data root, {case: summary}) of one tiny run per case, trained once for this module."""
    from utp_dist.trainer import Trainer, reset_accelerate

    tmp = tmp_path_factory.mktemp("export")
    data = _write_data(tmp / "shapes")
    summaries = {}
    for name, sections in CASES.items():
        raw = tiny_config(data, tmp / "out", train={"epochs": 1}, output={"run_name": name})
        for section, values in sections(tmp).items():
            raw[section].update(values)
        reset_accelerate()
        summaries[name] = Trainer(from_dict(raw)).fit()
    reset_accelerate()
    return data, summaries


def _test_files(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "test").rglob("*.png"))


@pytest.mark.parametrize("case", list(CASES))
def test_the_pipeline_predicts_as_predict_and_reproduces_the_runs_test_accuracy(runs, case, tmp_path, capsys):
    from transformers import pipeline

    from utp_dist.predict import main

    data, summaries = runs
    export = summaries[case]["paths"]["best_model"]
    assert main([export, str(data / "test"), "--topk", "1", "--workers", "0", "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    files = _test_files(data)
    assert [r["path"] for r in rows] == files
    classifier = pipeline("image-classification", model=export, device="cpu")
    top1 = [classifier(f, top_k=1)[0] for f in files]
    assert [p["label"] for p in top1] == [r["label_1"] for r in rows]
    assert [p["score"] for p in top1] == pytest.approx([float(r["score_1"]) for r in rows], abs=1e-5)
    hits = sum(p["label"] == Path(f).parent.name for p, f in zip(top1, files, strict=True))
    assert hits / len(files) == pytest.approx(summaries[case]["test"]["test_acc@1"], abs=1e-6)  # summary.json holds float32 metrics


def test_the_export_records_the_input_and_evaluates_the_same_outside_its_run(runs, tmp_path, caplog):
    from utp_dist.evaluate import main
    from utp_dist.predict import main as predict

    data, summaries = runs
    export = Path(summaries["resnet-scratch"]["paths"]["best_model"])
    processor = json.loads((export / "preprocessor_config.json").read_text())
    # ResNet's processor is ConvNeXt's: its crop_pct rule resizes to 24 / 0.875 = 27 and crops 24, bilinear as training does
    assert processor["image_processor_type"] == "ConvNextImageProcessor" and processor["size"] == {"shortest_edge": 24}
    assert processor["crop_pct"] == 0.875 and processor["resample"] == 2
    assert processor["utp_dist_training_input"] == {"size": [24, 24], "resize": 27, "mean": [0.5] * 3, "std": [0.5] * 3}
    moved = shutil.copytree(export, tmp_path / "moved")  # no run around it: only its own files say how to feed it
    assert main([str(moved), str(data), "--workers", "0", "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metrics"]["acc@1"] == pytest.approx(summaries["resnet-scratch"]["test"]["test_acc@1"], abs=1e-6)
    assert "does not record the training input" not in caplog.text
    # an export of an older utp_dist (no record of the training input) outside its run: a warning says so
    del processor["utp_dist_training_input"]
    (moved / "preprocessor_config.json").write_text(json.dumps(processor))
    assert predict([str(moved), _test_files(data)[0], "--workers", "0"]) == 0
    assert f"{moved}: its preprocessor_config.json does not record the training input" in caplog.text


@pytest.mark.parametrize(
    ("name", "settings", "image_size"),
    [
        ("ConvNextImageProcessor", {}, 384),  # crop_pct at 384 px, where ConvNeXt's own rule would warp instead
        ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}}, 32),
        ("ViTImageProcessor", {}, None),
        ("ViTImageProcessor", {"size": {"height": 40, "width": 30}}, None),
        ("DeiTImageProcessor", {"size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32}}, None),
        ("CLIPImageProcessor", {"size": {"shortest_edge": 35}, "crop_size": {"height": 33, "width": 33}}, None),
        ("CLIPImageProcessor", {}, 20),
    ],
)
def test_the_exported_processor_computes_the_pixels_of_training_eval_transform(name, settings, image_size):
    import torch
    import transformers

    from utp_dist.data.device_input import ModelInput
    from utp_dist.data.loaders import build_transforms
    from utp_dist.model import exported_processor, input_spec

    original = getattr(transformers, name)(**settings)
    spec = input_spec(original, image_size)
    exported = exported_processor(original, spec)
    assert input_spec(exported, None) == spec  # what predict and evaluate read back from the export alone
    for height, width in [(401, 517), (517, 399), (45, 61)]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(height))
        trained = ModelInput(spec)(build_transforms(spec, "none")[1](image)[None])
        assert torch.allclose(exported(image, return_tensors="pt")["pixel_values"], trained, atol=1e-5), (height, width)
