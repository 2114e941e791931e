"""The predictions behind the numbers: the seeded sample, its order, the per-class table, and that keeping them changes
no training number."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utp_dist.config import ConfigError, from_dict
from utp_dist.predictions import most_confused_first, per_class, pick


def test_the_sample_is_fixed_by_the_seed_and_draws_from_no_global_generator():
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = pick(100, 8, seed=3)
    assert first == pick(100, 8, seed=3) != pick(100, 8, seed=4)
    assert first == sorted(set(first)) and len(first) == 8 and pick(5, 64, seed=3) == [0, 1, 2, 3, 4]
    assert (
        torch.equal(states[0], torch.get_rng_state()) and (states[1] == np.random.get_state()[1]).all() and states[2] == random.getstate()
    )


def test_per_class_precision_recall_f1_support_from_the_confusion_matrix():
    confusion = torch.tensor([[3, 1, 0], [2, 2, 0], [0, 0, 0]])  # rows true, columns predicted; class c never occurs or is predicted
    a, b, c = per_class(confusion, ["a", "b", "c"])
    assert a == {"class": "a", "precision": 0.6, "recall": 0.75, "f1": pytest.approx(2 / 3), "support": 4}
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 0.5 and b["support"] == 4
    assert c == {"class": "c", "precision": None, "recall": None, "f1": None, "support": 0}


def test_most_confused_pairs_come_first():
    confusion = torch.tensor([[5, 1, 4], [0, 5, 0], [2, 0, 5]])
    samples = [
        {"index": 0, "label": 0, "predicted": 0, "confidence": 0.9},
        {"index": 1, "label": 0, "predicted": 1, "confidence": 0.8},  # a pair seen once
        {"index": 2, "label": 0, "predicted": 2, "confidence": 0.6},  # the pair seen most (4 times)
        {"index": 3, "label": 0, "predicted": 2, "confidence": 0.7},
        {"index": 4, "label": 1, "predicted": 1, "confidence": 0.4},
    ]
    assert [s["index"] for s in most_confused_first(samples, confusion)] == [3, 2, 1, 4, 0]


def test_a_negative_count_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"output.prediction_samples must be an int >= 0"):
        from_dict({"data": {"root": str(tmp_path)}, "output": {"prediction_samples": -1}})


def _fit(raw: dict) -> Path:
    from utp_dist.trainer import Trainer, reset_accelerate

    reset_accelerate()
    return Path(Trainer(from_dict(raw)).fit()["paths"]["logs"])


def test_each_evaluation_keeps_its_sample_and_training_numbers_stay_the_same(image_root, tmp_path, fresh_accelerate):
    out = tmp_path / "out"
    kept = _fit(tiny_config(image_root, out, output={"root": str(out), "run_name": "kept", "prediction_samples": 10}))
    plain = _fit(tiny_config(image_root, out, output={"root": str(out), "run_name": "plain", "prediction_samples": 0}))
    # the same seed trains to the same numbers, with or without the sample
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "train_img_per_s"} for line in text.splitlines()]  # noqa: E731
    assert strip((kept / "metrics.jsonl").read_text()) == strip((plain / "metrics.jsonl").read_text())

    folder = kept / "predictions"
    assert sorted(p.name for p in folder.glob("*.json")) == ["test.json", "val_epoch000.json", "val_epoch001.json"]
    last = json.loads((folder / "val_epoch001.json").read_text())
    assert (last["split"], last["epoch"], last["classes"]) == ("val", 1, ["cat", "dog", "fox"])
    samples = last["samples"]
    assert len(samples) == 10 and len({s["index"] for s in samples}) == 10
    assert all(0 <= s["predicted"] < 3 and 1 / 3 <= s["confidence"] <= 1 for s in samples)
    wrong = [not s["label"] == s["predicted"] for s in samples]
    assert wrong == sorted(wrong, reverse=True)  # the mistakes first
    first = json.loads((folder / "val_epoch000.json").read_text())["samples"]
    assert {s["index"] for s in first} == {s["index"] for s in samples}  # the same images every evaluation
    thumbs = sorted((folder / "images").glob("*.png"))
    assert [f"images/{p.name}" for p in thumbs] == sorted(s["image"] for s in samples)
    assert max(Image.open(thumbs[0]).size) <= 96
    val_total = sum(row["support"] for row in last["per_class"])
    assert val_total == 24 and sum(map(sum, last["confusion"])) == 24  # 3 classes x 8 val images
    test = json.loads((folder / "test.json").read_text())
    assert test["samples"] == [] and sum(row["support"] for row in test["per_class"]) == 18
    assert not (plain / "predictions" / "images").exists() and json.loads((plain / "predictions" / "test.json").read_text())["per_class"]
    events = EventAccumulator(str(kept), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("val/predictions")] == [first_step(kept, 0), first_step(kept, 1)]


def first_step(logs: Path, epoch: int) -> int:
    return json.loads((logs / "predictions" / f"val_epoch{epoch:03d}.json").read_text())["step"]


# --- the run page's gallery and per-class table


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    from dashboard_support import private_root, serving

    with serving(private_root(tmp_path_factory, "predictions"), tmp_path_factory, "predictions-db") as server:
        with server.client(follow_redirects=False) as client:
            yield client


def test_the_run_page_shows_the_gallery_and_the_per_class_table(web):
    import re

    run = next(r for r in web.get("/api/v1/runs", params={"state": "succeeded"}).json() if r["source"] == "disk")
    html = web.get(f"/web/runs/{run['id']}").text
    tiles = re.findall(r'<figure class="tile( wrong)?" data-true="(\w+)" data-predicted="(\w+)"><img src="([^"]+)"', html)
    assert len(tiles) == 24  # the 24 val images: fewer than the default 64
    assert all(bool(wrong) == (true != predicted) for wrong, true, predicted, _ in tiles)
    wrong = [bool(w) for w, *_ in tiles]
    assert wrong == sorted(wrong, reverse=True)
    image = web.get(tiles[0][3])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    table = re.search(r'<table class="compact" id="per-class"><caption>per class \(test\)</caption>.*?</table>', html, re.S).group(0)
    assert [re.sub("<.*?>", "", row) for row in re.findall(r"<tr><td>(\w+)</td>", table)] == ["cat", "dog", "fox"]
    assert sum(int(n) for n in re.findall(r"<td>(\d+)</td></tr>", table)) == 18  # support: the 18 test images
    assert "<option>dog</option>" in html and 'id="filter-wrong"' in html
