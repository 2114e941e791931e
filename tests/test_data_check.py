"""`python -m utp_dist.data check ROOT` and `submit --preflight`: what would stop or spoil a run, before it starts."""

from __future__ import annotations

import shutil

import yaml
from conftest import make_image_folder, run_cli, tiny_config

from utp_dist.data.check import check, inspect_file


def test_a_clean_root_passes_with_a_count_per_split_and_class(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 4, "val": 2})
    result = run_cli("check", str(root), "--decode", "--min-size", "8", module="utp_dist.data")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["split", "class", "images", "damaged", "tiny"] and lines[2].split() == ["train", "cat", "4", "0", "0"]
    assert lines[-1] == "ok: nothing would stop a run"


def test_problems_are_listed_and_the_blocking_ones_exit_1(tmp_path, capsys):
    from utp_dist.data.check import main  # in this process: the clean root above runs the command end to end

    root = make_image_folder(tmp_path / "d", per_class={"train": 4, "val": 2, "test": 2})
    shutil.copy(root / "train" / "cat" / "0000.jpg", root / "test" / "dog" / "leak.jpg")
    (root / "train" / "cat" / "cut.png").write_bytes((root / "train" / "cat" / "0001.png").read_bytes()[:200])
    (root / "val" / "dog" / "text.jpg").write_text("not an image")
    shutil.rmtree(root / "test" / "fox")
    code = main(["check", str(root)])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert f"ERROR train: 1 unreadable or truncated file(s): {root / 'train' / 'cat' / 'cut.png'}: truncated" in out
    assert f"ERROR val: 1 unreadable or truncated file(s): {root / 'val' / 'dog' / 'text.jpg'}: unreadable" in out
    assert "WARNING test: no images of class(es) fox" in out
    assert f"byte-identical to train files: {root / 'test' / 'dog' / 'leak.jpg'} = {root / 'train' / 'cat' / '0000.jpg'}" in out
    assert "WARNING train: 12 image(s) smaller than 32 px" in out  # the test images are 20x20
    assert out.splitlines()[-1] == "2 problem(s) would stop a run"


def test_the_index_rules_and_a_full_decode(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 2})
    assert check(str(root)).errors == [f"data.root: '{root / 'val'}' is missing; an ImageFolder root needs train/ and val/ folders"]
    assert check(str(tmp_path / "nowhere")).errors[0].startswith("data.root: folder")
    # a JPEG whose header and end marker are intact but whose data is not: only a full decode finds it
    data = bytearray((root / "train" / "cat" / "0000.jpg").read_bytes())
    data[200:-2] = b"\x00" * (len(data) - 202)
    (root / "train" / "cat" / "0000.jpg").write_bytes(bytes(data))
    assert inspect_file(str(root / "train" / "cat" / "0000.jpg"), full=False) == (None, (20, 20))
    assert inspect_file(str(root / "train" / "cat" / "0000.jpg"), full=True)[0].startswith("cannot decode (")


def test_submit_preflight_checks_each_data_root_and_submits_nothing_when_one_fails(tmp_path, capsys):
    from utp_dist.sweep.submit import main  # in this process: tests/test_grid.py runs the submit command end to end

    good = make_image_folder(tmp_path / "good", per_class={"train": 4, "val": 2})
    bad = make_image_folder(tmp_path / "bad", per_class={"train": 4})  # no val/: a run would stop at its start
    grid = tmp_path / "grid.yaml"
    base = tiny_config(good, tmp_path / "out")
    grid.write_text(yaml.safe_dump({"name": "pre", "base": base, "sweep": {"data.root": [str(good), str(bad)]}}))
    assert main([str(grid), "--preflight", "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert "preflight failed: nothing submitted" in err
    assert f"data root {good}" in out and f"ERROR data.root: '{bad / 'val'}' is missing" in out
    assert not (tmp_path / "out" / "sweeps").exists()
    grid.write_text(yaml.safe_dump({"name": "pre", "base": base, "sweep": {"optim.lr": [0.1, 0.01]}}))
    assert main([str(grid), "--preflight", "--dry-run"]) == 0
