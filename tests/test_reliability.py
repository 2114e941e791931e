"""What survives what: NaN losses, start-up errors, concurrent starts, moved and copied runs, a full disk, damaged
states, finished runs, and the small things a new user trips on. Real processes, real files, real signals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_image_folder, run_here, tiny_config, torchrun, wait_for
from safetensors.torch import load_file

from utp_dist.preemption import EXIT_RESUMABLE
from utp_dist.store.run_dir import RunDir, find_runs

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("reliability") / "shapes", per_class={"train": 16, "val": 4, "test": 4})


def _config(root: Path, out: Path, **sections) -> Path:
    """A tiny run of 2 epochs x 6 steps that saves every 2 steps and can be slowed down (UTP_TEST_STEP_SLEEP)."""
    base = {
        "train": {"epochs": 2, "log_every_n_steps": 1, "callbacks": ["tests.hooks:SlowSteps"]},
        "checkpoint": {"every_n_steps": 2, "every_n_minutes": None, "keep_last": 3},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_config(root, out, **base)))
    return path


def _start(config: Path, *overrides: str, sleep: float = 0.0, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [*prefix, sys.executable, "-m", "utp_dist.train", str(config), *overrides]
    env = {**ENV, "UTP_TEST_STEP_SLEEP": str(sleep)}
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _only_run(out: Path) -> RunDir:
    (run,) = find_runs(out)
    return run


def _stopped_run(data: Path, out: Path, **sections) -> tuple[Path, RunDir]:
    """A run stopped by SIGTERM after its second state: (config, run)."""
    config = _config(data, out, **sections)
    proc = _start(config, sleep=0.3)
    wait_for(lambda: any(len(run.states()) >= 2 for run in find_runs(out)), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUMABLE, err[-3000:]
    return config, _only_run(out)


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory) -> Path:
    """The output root of one run stopped by SIGTERM after its second state, made once for the module: each test
    continues its own copy (`_copy_of`), for a copied run folder is a run like any other."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    _stopped_run(data, out)
    return out


def _copy_of(stopped: Path, data: Path, out: Path) -> tuple[Path, RunDir]:
    """A fresh copy of the stopped run at `out` and a config of its own that points there: (config, run)."""
    shutil.copytree(stopped, out, symlinks=True)
    return _config(data, out), _only_run(out)


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _strict_json(path: Path):
    """json.loads that refuses NaN and Infinity, as every JSON reader but Python's does."""
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. non-finite losses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("monitor", [{}, {"monitor_metric": "val_loss", "monitor_mode": "min"}], ids=["acc", "val_loss"])
def test_a_nan_loss_stops_the_run_with_one_line_and_keeps_the_good_states(data, tmp_path, monitor):
    config = _config(data, tmp_path / "out", optim={"lr": 1e6}, checkpoint={"every_n_steps": 1}, train=monitor)
    proc = run_here(str(config))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _last_line(proc.stderr)
    assert line.startswith("utp_dist: error: the training loss is not finite") and "optim.lr" in line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    bad_step = int(line.split(" at step ")[1].split(":")[0])
    run = _only_run(tmp_path / "out")
    assert not run.summary_file.exists() and not run.is_finished() and not run.best.exists()
    states = run.states()
    assert states and all(_strict_json(s / "identity.json")["step"] < bad_step for s in states)
    for state in states:  # the saved weights are all finite: none trained on the NaN loss
        assert all(t.isfinite().all() for t in load_file(state / "model.safetensors").values())
    # the newest good state stays complete and loads (this lr diverges again: the same one line, no traceback)
    again = run_here(str(config))
    assert f"resuming {run.name} from {states[-1]}" in again.stderr, again.stderr[-3000:]
    assert again.returncode == 2 and _last_line(again.stderr).startswith("utp_dist: error: the training loss is not finite")
    fresh = run_here(str(config), "optim.lr=1e-3", "checkpoint.resume=never")
    assert fresh.returncode == 0, fresh.stderr[-3000:]


def test_under_ddp_every_rank_stops_at_the_same_nan_step(data, tmp_path):
    config = _config(data, tmp_path / "out", optim={"lr": 1e6}, data={"batch_size": 4})
    proc = subprocess.run(torchrun(str(config)), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("utp_dist: error: the training loss is not finite")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]  # both ranks, the same step, no hang
    assert str(REPO / "utp_dist") not in proc.stderr  # torchrun prints its own traceback for failed ranks; the ranks none


def test_json_files_hold_null_for_non_finite_values(tmp_path):
    from utp_dist.tracking import TensorBoardTracker

    run = RunDir.create(tmp_path, "data", "run")
    tracker = TensorBoardTracker(run, total_steps=4)
    confusion, roc = torch.eye(2, dtype=torch.long), (torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    tracker.log_eval("val", {"val_loss": float("nan"), "val_acc@1": 0.5}, 0, 2, confusion, roc, ["a", "b"], {"x": float("inf")})
    tracker.write_summary({"best": {"value": float("nan")}, "final_val": {"val_loss": float("-inf")}, "ok": [1.5, float("nan")]})
    tracker.close()
    assert _strict_json(run.summary_file) == {"best": {"value": None}, "final_val": {"val_loss": None}, "ok": [1.5, None]}
    (line,) = run.metrics_file.read_text().splitlines()
    assert json.loads(line, parse_constant=pytest.fail) == {
        "split": "val",
        "epoch": 0,
        "step": 2,
        "val_loss": None,
        "val_acc@1": 0.5,
        "x": None,
    }


# --- 2. errors the config and the index already show ----------------------------------------------------------


def test_eval_topk_beyond_the_classes_fails_at_start_and_in_dry_run(data, tmp_path):
    config = _config(data, tmp_path / "out")
    for extra in ((), ("--dry-run",)):
        proc = run_here(str(config), "train.eval_topk=[1,20]", *extra)
        assert proc.returncode == 2 and "train.eval_topk: acc@20 needs at least 20 classes" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_val_split_without_images_fails_at_start(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 2})
    for image in (root / "val").rglob("*.*"):
        image.unlink()
    for extra in ((), ("--dry-run",)):
        proc = run_here(str(_config(root, tmp_path / "out")), *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert _last_line(proc.stderr) == (
            f"utp_dist: error: data.root: '{root / 'val'}' holds no images in its class folders; add images or remove the folder"
        )


# --- 3. one writer per run ------------------------------------------------------------------------------------


def test_two_resumes_of_one_run_get_one_writer_and_a_killed_holder_blocks_nothing(data, stopped, tmp_path):
    config, run = _copy_of(stopped, data, tmp_path / "out")
    # an empty object and a cut line in metrics.jsonl must not block the resume either
    with open(run.metrics_file, "a") as fh:
        fh.write('{}\n{"split": "val", "ep')
    first, second = _start(config, sleep=0.2), _start(config, sleep=0.2)
    (_, err1), (_, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (err1[-2000:], err2[-2000:])
    refused = err1 if first.returncode == 2 else err2
    winner = first if first.returncode == 0 else second
    assert f"run '{run.name}' is being written by pid {winner.pid} on " in _last_line(refused), refused[-2000:]
    evaluations = [(r["split"], r["epoch"]) for r in run.read_metrics()]
    assert evaluations == [("val", 0), ("val", 1), ("test", 1)]  # each evaluation once
    assert len(list(run.logs.glob("events.out.tfevents.*"))) == 2  # the first segment and one resume

    # kill -9 of a holder (continuing the finished run for a third epoch): its lock dies with it, the next start resumes
    newest = run.states()[-1].name
    proc = _start(config, f"checkpoint.resume={run.checkpoints}", "train.epochs=3", sleep=0.3)
    wait_for(lambda: run.states()[-1].name > newest, proc)
    proc.kill()
    proc.communicate()
    final = run_here(str(config), "train.epochs=3")
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resuming {run.name}" in final.stderr and _strict_json(run.summary_file)["restarts"] == 3


# --- 4. moved and copied runs ---------------------------------------------------------------------------------


def test_a_moved_run_resumes_in_its_new_place(data, stopped, tmp_path):
    config, run = _copy_of(stopped, data, tmp_path / "old")
    shutil.move(tmp_path / "old", tmp_path / "new")
    proc = run_here(str(config), f"output.root={tmp_path / 'new'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "old").exists()
    moved = _only_run(tmp_path / "new")
    assert moved.name == run.name and _strict_json(moved.summary_file)["restarts"] == 1
    assert _strict_json(moved.summary_file)["paths"]["logs"] == str(moved.logs)


def test_continuing_a_copy_of_a_finished_run_leaves_the_original_untouched(data, tmp_path):
    config = _config(data, tmp_path / "orig", train={"epochs": 1})
    assert run_here(str(config)).returncode == 0
    original = _only_run(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy", symlinks=True)
    before = _tree_digest(tmp_path / "orig")
    copy = _only_run(tmp_path / "copy")
    proc = run_here(str(config), f"checkpoint.resume={copy.checkpoints}", "train.epochs=2", f"output.root={tmp_path / 'copy'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tree_digest(tmp_path / "orig") == before and original.is_finished()
    summary = _strict_json(copy.summary_file)
    assert summary["restarts"] == 1 and summary["last_epoch"] == 1 and summary["paths"]["logs"] == str(copy.logs)


# --- 6. a full disk --------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (root is available in CI, as in the tests' Slurm)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(data, small_disk):
    config = _config(data, small_disk / "out")
    proc = _start(config, sleep=0.3)
    wait_for(lambda: any(len(run.states()) >= 1 for run in find_runs(small_disk / "out")), proc)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # take every free byte
        while os.write(fd, b"\0" * (1 << 16)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    line = _last_line(err)
    assert line.startswith("utp_dist: error: no space left on device writing ") and "run the same command again" in line, err[-3000:]
    run = _only_run(small_disk / "out")
    kept = run.states()
    assert kept  # the states written before are intact
    from utp_dist.store.checkpoint import damage

    assert all(damage(state) is None for state in kept)
    filler.unlink()
    final = run_here(str(config))
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming" in final.stderr and _strict_json(run.summary_file)["restarts"] == 1


# --- 7. damaged states ----------------------------------------------------------------------------------------


def _tamper(state: Path, how: str) -> Path:
    if how == "pickle":
        target = state / "trainer.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif how == "truncated":
        target = state / "model.safetensors"
        target.write_bytes(target.read_bytes()[:-100])
    else:
        target = state / "identity.json"
        target.write_text('{"config": ')
    return target


@pytest.mark.parametrize("how", ["pickle", "truncated", "identity"])
def test_a_damaged_newest_state_is_named_and_auto_falls_back(data, stopped, tmp_path, how):
    config, run = _copy_of(stopped, data, tmp_path / "out")
    newest, previous = run.states()[-1], run.states()[-2]
    target = _tamper(newest, how)
    explicit = run_here(str(config), f"checkpoint.resume={newest}")
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr, explicit.stderr[-2000:]
    assert _last_line(explicit.stderr).startswith(f"utp_dist: error: checkpoint.resume: {target}: ")

    auto = run_here(str(config))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"{target}: " in auto.stderr and f"moved to {newest.with_name('damaged-' + newest.name)}" in auto.stderr
    assert f"resuming {run.name} from {previous}" in auto.stderr
    assert newest.with_name("damaged-" + newest.name).is_dir()


# --- 9. a finished run --------------------------------------------------------------------------------------------


def test_a_finished_run_continues_exactly_when_epochs_grow_and_refuses_otherwise(data, tmp_path):
    config = _config(data, tmp_path / "out", train={"epochs": 1})
    assert run_here(str(config)).returncode == 0
    run = _only_run(tmp_path / "out")
    finished = _strict_json(run.summary_file)
    best_before = _tree_digest(run.best.resolve())
    same = run_here(str(config), f"checkpoint.resume={run.checkpoints}")
    assert same.returncode == 2, same.stderr[-2000:]
    assert _last_line(same.stderr) == (
        f"utp_dist: error: checkpoint.resume: run '{run.name}' has nothing left to train (it finished 1 epochs, "
        f"{finished['steps']} steps); raise train.epochs or train.max_steps to continue it"
    )
    assert _strict_json(run.summary_file) == finished and _tree_digest(run.best.resolve()) == best_before
    more = run_here(str(config), f"checkpoint.resume={run.checkpoints}", "train.epochs=2")
    assert more.returncode == 0, more.stderr[-3000:]
    summary = _strict_json(run.summary_file)
    assert summary["steps"] == 2 * finished["steps"] and summary["restarts"] == 1 and summary["last_epoch"] == 1
    # the first epoch was not trained again: one val line per epoch, each once
    assert [(r["split"], r["epoch"]) for r in run.read_metrics()] == [("val", 0), ("val", 1), ("test", 1)]


# --- 10. smaller ones -------------------------------------------------------------------------------------------


def test_small_mistakes_get_clear_lines(data, tmp_path):
    file_root = tmp_path / "a_file"
    file_root.write_text("not a folder")
    proc = run_here(str(_config(file_root, tmp_path / "out")))
    assert _last_line(proc.stderr) == (
        f"utp_dist: error: data.root: '{file_root}' is a file, not a folder; point it at an ImageFolder root with train/ and val/"
    )
    bare = run_here()
    assert bare.returncode == 2 and _last_line(bare.stderr).startswith(
        "utp_dist: error: no config file given; run: python -m utp_dist.train"
    )
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    dry = run_here(str(empty), f"data.root={data}", "--dry-run")
    assert dry.returncode == 0 and f"{empty} is empty: every setting takes its default" in dry.stderr


def test_an_unreadable_image_says_permission_denied(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 2})
    locked = next((root / "train" / "cat").iterdir())
    locked.chmod(0)
    # root reads everything: drop the capabilities that let it, as a normal user's process would have none
    no_override = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    proc = _start(_config(root, tmp_path / "out"), prefix=no_override)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert _last_line(err) == (
        f"utp_dist: error: cannot decode image '{locked}' (permission denied); fix or delete it, or set data.on_bad_image=skip"
    )


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(data, tmp_path):
    config = _config(data, tmp_path / "out", optim={"lr": 1e6}, checkpoint={"every_n_steps": None, "every_epoch": True})
    proc = run_here(str(config))
    assert proc.returncode == 2 and "not finite" in proc.stderr, proc.stderr[-2000:]
    assert list(find_runs(tmp_path / "out")) == []
    assert run_here(str(config), "optim.lr=1e-3").returncode == 0
    assert [run.name for run in find_runs(tmp_path / "out")] == ["vit__cross_entropy__scratch"]  # not -v1


def test_the_progress_bar_ends_at_its_total_after_a_mid_epoch_resume(data, tmp_path):
    config, run = _stopped_run(data, tmp_path / "out", train={"log_every_n_steps": 4})
    proc = run_here(str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    bars = [part for part in proc.stderr.replace("\r", "\n").splitlines() if part.startswith("train:")]
    totals = {(int(b.split("|")[2].split("/")[0]), int(b.split("/")[1].split(" ")[0])) for b in bars if b.count("|") >= 2}
    assert totals and all(done <= total for done, total in totals), bars[-3:]
    assert max(done for done, _ in totals) == 12
