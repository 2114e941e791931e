"""predict and evaluate on a trained tiny run: the same top-1 as transformers.pipeline, the same test metrics as training."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from conftest import make_image_folder, run_here, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(output root, data root, summary) of a tiny run trained once for this module."""
    tmp = tmp_path_factory.mktemp("pe")
    data = make_image_folder(tmp / "shapes", per_class={"train": 16, "val": 6, "test": 7})
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp / "out", train={"epochs": 3, "eval_topk": [1, 2]}, output={"run_name": "tiny"})))
    result = run_here(str(config))
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
    result = run_here(
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


def test_predict_finds_a_run_by_name_or_checkpoint_folder_and_writes_jsonl(trained, tmp_path, capsys):
    from utp_dist.predict import main

    out, data, _ = trained
    image = str(data / "val" / "dog" / "0000.jpg")
    by_name = run_here("tiny", image, "--root", str(out), "--out", str(tmp_path / "p.jsonl"), module="utp_dist.predict")
    by_folder = run_here(str(out / "checkpoints" / "shapes" / "tiny"), image, "--topk", "9", module="utp_dist.predict")
    assert by_name.returncode == 0 and by_folder.returncode == 0, by_name.stderr + by_folder.stderr
    line = json.loads((tmp_path / "p.jsonl").read_text())
    assert line["path"] == image and len(line["predictions"]) == 3  # --topk 5 is cut to the 3 classes
    assert by_folder.stdout.startswith(f"{image}\t{line['predictions'][0]['label']} ")
    capsys.readouterr()
    assert main(["nope", image, "--root", str(out)]) == 2  # in this process: the read-only --out test runs the command end to end
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: no such folder, and no run of that name" in err


def test_evaluate_on_the_test_split_equals_the_runs_test_metrics(trained, tmp_path):
    out, data, summary = trained
    result = run_here("tiny", str(data), "--root", str(out), module="utp_dist.evaluate")
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
    result = run_here(summary["paths"]["best_model"], str(other / "test"), "--out", str(tmp_path / "r"), module="utp_dist.evaluate")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "class folder(s) owl do not match the model's classes cat, dog, fox" in result.stderr


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("folder", "--out {tmp}/folder: is a folder; name a file in it, e.g. {tmp}/folder/preds.csv"),
        ("file.csv/preds.csv", "--out {tmp}/file.csv/preds.csv: {tmp}/file.csv is a file, not a folder; choose another path"),
        ("file.csv/sub/preds.csv", "--out {tmp}/file.csv/sub/preds.csv: {tmp}/file.csv is a file, not a folder"),
        ("preds.txt", "--out {tmp}/preds.txt: write a .csv or a .jsonl file"),
    ],
)
def test_predict_checks_out_before_it_reads_the_model_or_any_image(tmp_path, capsys, out, message):
    from utp_dist.predict import main

    (tmp_path / "folder").mkdir()
    (tmp_path / "file.csv").write_text("old\n")
    # neither the model nor the image exists: the --out error comes first, before any work
    assert main(["no-such-model", "no-such-image.png", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"utp_dist: error: {message.format(tmp=tmp_path)}") and err.count("\n") == 1, err


def test_predict_out_in_a_read_only_folder_or_file_is_one_line_before_any_work(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "ro").mkdir()
    (tmp_path / "ro-file.csv").write_text("old\n")
    (tmp_path / "ro-file.csv").chmod(0o444)
    (tmp_path / "ro").chmod(0o555)
    # root writes everywhere: drop the capabilities that let it, as a normal user's process has none
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for out, reason in [
        (tmp_path / "ro" / "p.csv", f"in {tmp_path / 'ro'}: "),
        (tmp_path / "ro-file.csv", f"{tmp_path / 'ro-file.csv'}: "),
    ]:
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "utp_dist.predict", "no-such-model", "x.png", "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr == f"utp_dist: error: --out {out}: cannot write {reason}Permission denied\n"
    assert (tmp_path / "ro-file.csv").read_text() == "old\n"


def test_predict_replaces_out_whole_or_leaves_the_old_file(trained, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from utp_dist import predict

    out, data, summary = trained
    preds = tmp_path / "preds.csv"
    preds.write_text("the old predictions\n")
    image = str(data / "val" / "dog" / "0000.jpg")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predict.os, "fsync", full_disk)
    assert predict.main([summary["paths"]["best_model"], image, "--workers", "0", "--out", str(preds)]) == 2
    assert capsys.readouterr().err.endswith(f"cannot write {preds}: No space left on device; the file is as it was before this command\n")
    assert preds.read_text() == "the old predictions\n" and os.listdir(tmp_path) == ["preds.csv"]  # no temporary file left
    monkeypatch.undo()
    assert predict.main([summary["paths"]["best_model"], image, "--workers", "0", "--out", str(preds)]) == 0
    assert preds.read_text().splitlines()[1].startswith(f"{image},")


def test_a_symlink_loop_in_an_image_folder_lists_each_image_once(tmp_path):
    from utp_dist.inference import image_files

    make_image_folder(tmp_path / "imgs", classes=("cat",), per_class={"a": 2})
    (tmp_path / "imgs" / "a" / "cat" / "loop").symlink_to(tmp_path / "imgs")  # a link to a parent
    (tmp_path / "imgs" / "again").symlink_to(tmp_path / "imgs" / "a")  # a second link to a folder
    files = image_files([str(tmp_path / "imgs")])
    assert len(files) == 2 and sorted(map(os.path.realpath, files)) == sorted(
        str(p) for p in (tmp_path / "imgs" / "a" / "cat").iterdir() if p.is_file()
    )


def test_evaluate_on_a_split_where_no_image_can_be_read_is_one_line(trained, tmp_path, capsys):
    from utp_dist.evaluate import main

    _, _, summary = trained
    for name in ("cat", "dog"):
        (tmp_path / "split" / name).mkdir(parents=True)
        (tmp_path / "split" / name / "0.png").write_bytes(b"not a png")
    assert main([summary["paths"]["best_model"], str(tmp_path / "split"), "--workers", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[-1]
        == f"utp_dist: error: {tmp_path / 'split'}: none of its 2 images can be read (the lines above name each); fix or replace them"
    )
    assert "Traceback" not in "\n".join(err)
