"""predict and evaluate on a trained tiny run: the same top-1 as transformers.pipeline, the same test metrics as training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import make_image_folder, run_cli, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(output root, data root, summary) of a tiny run trained once for this module."""
    tmp = tmp_path_factory.mktemp("pe")
    data = make_image_folder(tmp / "shapes", per_class={"train": 16, "val": 6, "test": 7})
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp / "out", train={"epochs": 3, "eval_topk": [1, 2]}, output={"run_name": "tiny"})))
    result = run_cli(str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp / "out" / "logs" / "shapes" / "tiny" / "summary.json").read_text())
    return tmp / "out", data, summary


def test_predict_matches_the_pipeline_top1_and_skips_unreadable_files(trained, tmp_path):
    from transformers import pipeline

    out, data, summary = trained
    export = Path(summary["paths"]["best_model"])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    preds = tmp_path / "preds.csv"
    result = run_cli(
        str(export),
        str(data / "test"),
        str(tmp_path / "imgs"),
        "--topk",
        "2",
        "--out",
        str(preds),
        "--batch-size",
        "5",
        module="utp_dist.predict",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped 1 unreadable file(s): {tmp_path / 'imgs' / 'broken.png'}" in result.stderr
    rows = list(csv.DictReader(preds.open()))
    files = sorted(str(p) for p in (data / "test").rglob("*.*"))
    assert [r["path"] for r in rows] == files and list(rows[0]) == ["path", "label_1", "score_1", "label_2", "score_2"]
    classifier = pipeline("image-classification", model=str(export), device="cpu")
    expected = [classifier(f, top_k=1)[0] for f in files]
    assert [r["label_1"] for r in rows] == [e["label"] for e in expected]
    assert all(abs(float(r["score_1"]) - e["score"]) < 1e-3 for r, e in zip(rows, expected, strict=True))


def test_predict_finds_a_run_by_name_or_checkpoint_folder_and_writes_jsonl(trained, tmp_path):
    out, data, _ = trained
    image = str(data / "val" / "dog" / "0000.jpg")
    by_name = run_cli("tiny", image, "--root", str(out), "--out", str(tmp_path / "p.jsonl"), module="utp_dist.predict")
    by_folder = run_cli(str(out / "checkpoints" / "shapes" / "tiny"), image, "--topk", "9", module="utp_dist.predict")
    assert by_name.returncode == 0 and by_folder.returncode == 0, by_name.stderr + by_folder.stderr
    line = json.loads((tmp_path / "p.jsonl").read_text())
    assert line["path"] == image and len(line["predictions"]) == 3  # --topk 5 is cut to the 3 classes
    assert by_folder.stdout.startswith(f"{image}\t{line['predictions'][0]['label']} ")
    missing = run_cli("nope", image, "--root", str(out), module="utp_dist.predict")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope: no such folder, and no run of that name" in missing.stderr


def test_evaluate_on_the_test_split_equals_the_runs_test_metrics(trained, tmp_path):
    out, data, summary = trained
    result = run_cli("tiny", str(data), "--root", str(out), module="utp_dist.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "logs" / "shapes" / "tiny" / "evaluations" / "shapes_test"
    report = json.loads((folder / "report.json").read_text())
    assert {"confusion_matrix.png", "roc_micro.png"} <= {p.name for p in folder.iterdir()}
    test = {k.removeprefix("test_"): v for k, v in summary["test"].items()}
    assert set(test) == set(report["metrics"]) and test["images"] == 21
    for key, value in test.items():
        assert math.isclose(report["metrics"][key], value, rel_tol=1e-6, abs_tol=1e-7), key
    assert sum(map(sum, report["confusion_matrix"])) == 21


def test_evaluate_refuses_a_split_whose_classes_the_model_lacks(trained, tmp_path):
    out, _, summary = trained
    other = make_image_folder(tmp_path / "other", classes=("cat", "owl"), per_class={"test": 1})
    result = run_cli(summary["paths"]["best_model"], str(other / "test"), "--out", str(tmp_path / "r"), module="utp_dist.evaluate")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "class folder(s) owl do not match the model's classes cat, dog, fox" in result.stderr
