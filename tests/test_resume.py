"""Exact resume: real signals to real processes, kill -9 during a save, refused and allowed config changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, make_image_folder, run_here, tiny_config, wait_for
from conftest import torchrun as torchrun_cmd
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utp_dist.preemption import EXIT_RESUMABLE
from utp_dist.train_command import main

# bit-identical float results need the same thread count in every segment: pin it for all runs here
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("resume") / "shapes", per_class={"train": 24, "val": 7, "test": 4})


def _config(root: Path, out: Path, **sections) -> Path:
    base = {
        "data": {"augment": "standard", "num_workers": 2, "image_size": None},
        "train": {"epochs": 2, "log_every_n_steps": 1, "callbacks": ["tests.hooks:SlowSave", "tests.hooks:SlowSteps"]},
        "checkpoint": {"every_n_steps": 4, "every_n_minutes": None, "keep_last": 2},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    raw = tiny_config(root, out, **base)
    raw["model"]["config"]["image_size"] = 16  # the size comes from the model's processor, not data.image_size
    path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(cmd: list[str], slow_save: float = 0.0) -> subprocess.Popen:
    env = {**ENV, "UTP_TEST_SLOW_SAVE": str(slow_save)}
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(out: Path) -> tuple[Path, Path]:
    (logs,) = (out / "logs" / "shapes").iterdir()
    (ckpt,) = (out / "checkpoints" / "shapes").iterdir()
    return logs, ckpt


def _states(ckpt: Path) -> list[Path]:
    return sorted((ckpt / "state").glob("step-*/COMPLETE"))


def _scalars(logs: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _metrics(logs: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput, which differs between any two runs."""
    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "train_img_per_s"} for line in lines]


def _assert_same_run(reference: Path, resumed: Path) -> None:
    """Bit-identical weights, identical metrics.jsonl, each TensorBoard step exactly once with the same value."""
    (ref_logs, ref_ckpt), (res_logs, res_ckpt) = _run(reference), _run(resumed)
    for name in ("best/model.safetensors", sorted(p.name for p in (ref_ckpt / "state").iterdir())[-1] + "/model.safetensors"):
        a, b = (
            load_file(ref_ckpt / "state" / name if name.startswith("step") else ref_ckpt / name),
            load_file(res_ckpt / "state" / name if name.startswith("step") else res_ckpt / name),
        )
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    assert _metrics(ref_logs) == _metrics(res_logs)
    for tag in ("train/loss", "train/lr", "epoch/train_loss", "val/acc@1", "val/loss"):
        assert _scalars(ref_logs, tag) == _scalars(res_logs, tag), tag


def _train_cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "utp_dist.train", str(config), *overrides]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One uninterrupted run that the interrupted ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "ref"
    proc = run_here(str(_config(data, out)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_kill_9_during_a_save_keeps_the_previous_state(data, reference, tmp_path):
    config = _config(data, tmp_path / "cut")
    proc = _start(_train_cmd(config), slow_save=2.0)

    def state_dir() -> Path:  # the run's state folder; a path that does not exist before the run folder does
        runs = sorted((tmp_path / "cut" / "checkpoints" / "shapes").glob("*"))
        return runs[0] / "state" if runs else tmp_path / "cut" / "no-run-yet" / "state"

    wait_for(
        lambda: (
            (tmp_path / "cut" / "checkpoints" / "shapes").exists()
            and state_dir().is_dir()
            and len(_states(state_dir().parent)) >= 1
            and any(state_dir().glob(".tmp-step-*"))
        ),
        proc,
    )
    time.sleep(0.5)  # inside the slowed save: the model and optimizer files are written, COMPLETE is not
    proc.kill()
    proc.communicate()
    assert any(state_dir().glob(".tmp-step-*"))  # the cut save is there, incomplete
    complete_before = _states(state_dir().parent)
    final = run_here(str(config))
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming" in final.stderr and complete_before[-1].parent.name in final.stderr
    assert not any(state_dir().glob(".tmp-step-*"))
    _assert_same_run(reference, tmp_path / "cut")


def test_changed_config_is_refused_with_a_diff_unless_allowed(data, tmp_path, capsys, fresh_accelerate):
    config = _config(data, tmp_path / "run", train={"epochs": 1}, data={"num_workers": 0})
    assert main([str(config)]) == 0
    logs, ckpt = _run(tmp_path / "run")
    state = _states(ckpt)[-1].parent
    capsys.readouterr()
    assert main([str(config), f"checkpoint.resume={state}", "optim.lr=0.5", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.003 -> 0.5" in err and "checkpoint.allow_changes=true" in err and err.count("\n") == 1

    assert main([str(config), f"checkpoint.resume={ckpt}", "optim.lr=0.5", "train.epochs=2", "checkpoint.allow_changes=true"]) == 0
    assert _run(tmp_path / "run") == (logs, ckpt)  # the same run continued, no -v1
    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [(line["split"], line["epoch"]) for line in lines] == [("val", 0), ("val", 1), ("test", 1)]
    assert json.loads((logs / "summary.json").read_text())["restarts"] == 1

    # that run is finished now: checkpoint.resume=auto starts a new one instead of continuing it
    assert main([str(config), "train.epochs=2"]) == 0
    assert sorted(p.name for p in logs.parent.iterdir()) == ["vit__cross_entropy__scratch", "vit__cross_entropy__scratch-v1"]


def _workers(torchrun: subprocess.Popen, n: int) -> list[psutil.Process]:
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = []
        for child in psutil.Process(torchrun.pid).children():  # the ranks; their DataLoader workers are grandchildren
            try:
                if "utp_dist.train" in " ".join(child.cmdline()):
                    kids.append(child)
            except psutil.Error:
                pass
        if len(kids) == n:
            return kids
        time.sleep(0.1)
    raise AssertionError("workers did not start")


# augmentation on the device (Kornia) in the 2-process runs, on the CPU workers in the single-process ones: both resume exactly
DDP = {
    "train": {"epochs": 2},
    "data": {"batch_size": 4, "augment": "none", "gpu_augment": ["random_resized_crop", "horizontal_flip", "color_jitter"]},
}


def launch(config: Path) -> list[str]:
    """2 processes through utp_dist.launch, which exits with the ranks' own code (75 when they stopped to be resumed)."""
    return torchrun_cmd(str(config), launcher="utp_dist.launch")


@pytest.fixture(scope="module")
def reference_ddp(data, tmp_path_factory) -> Path:
    """One uninterrupted 2-process run that the interrupted ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference_ddp") / "ref"
    proc = subprocess.run(launch(_config(data, out, **DDP)), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# --- a stop signal to the whole process group (scancel, timeout, systemd, a terminal): DataLoader workers get it too


def _start_group(cmd: list[str]) -> subprocess.Popen:
    """A training command in a session of its own, as a job step or a terminal's foreground job is."""
    # slow steps: a stop signal that comes just after a state still finds steps left to stop at, on a loaded machine
    env = {**ENV, "UTP_TEST_SLOW_SAVE": "0.3", "UTP_TEST_STEP_SLEEP": "0.25"}
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _newest_state(out: Path) -> str:
    ckpt_parent = out / "checkpoints" / "shapes"
    return max((p.parent.name for run in ckpt_parent.iterdir() for p in _states(run)), default="") if ckpt_parent.exists() else ""


def _stop_after_a_new_state(cmd: list[str], out: Path, sig: int, whole_group: bool = True) -> int:
    """Start `cmd`, wait for a state newer than any before, send `sig` to the whole group (or twice to the main process
    alone, the second during the save it starts): exit 75, a state at the stop step. Returns that step."""
    before = _newest_state(out)
    proc = _start_group(cmd)
    wait_for(lambda: _newest_state(out) > before, proc)
    if whole_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
        proc.send_signal(sig)  # a second signal during the save changes nothing
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUMABLE, err[-3000:]
    assert f"exit {EXIT_RESUMABLE} = stopped to be resumed" in err
    step = int(err.split("stopped by signal at step ")[1].split(";")[0])
    assert _newest_state(out) == f"step-{step:08d}" and "DataLoader worker" not in err and "Traceback" not in err, err[-3000:]
    return step


def test_stop_signals_to_the_process_and_its_group_stop_at_a_saved_step_and_resume_bit_identical(data, reference, tmp_path):
    """SIGTERM twice to the main process alone (`kill PID`), then SIGUSR1 and SIGUSR2 to the whole group with its
    DataLoader workers (scancel, `timeout`, a terminal): three stops, then one resume equal to the uninterrupted run."""
    config, out = _config(data, tmp_path / "cut"), tmp_path / "cut"  # data.num_workers: 2
    steps = [
        _stop_after_a_new_state(_train_cmd(config), out, signal.SIGTERM, whole_group=False),
        _stop_after_a_new_state(_train_cmd(config), out, signal.SIGUSR1),
        _stop_after_a_new_state(_train_cmd(config), out, signal.SIGUSR2),
    ]
    assert steps == sorted(set(steps))
    final = run_here(str(config))  # checkpoint.resume: auto continues the same run folder
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same_run(reference, out)
    summary = json.loads((_run(out)[0] / "summary.json").read_text())
    assert summary["restarts"] == 3
    assert summary["wall_time_s"] > json.loads((_run(reference)[0] / "summary.json").read_text())["wall_time_s"] * 0.5


def test_two_processes_stop_on_one_ranks_signal_then_on_a_group_sigterm_through_the_launcher_and_resume_bit_identical(
    data, reference_ddp, tmp_path, capsys, fresh_accelerate
):
    """2 processes with augmentation on the device: SIGUSR2 to rank 1 alone (both ranks agree, save once and stop), then
    SIGTERM to the launcher's whole group with the ranks' DataLoader workers; each exits 75, and the resume on 2
    processes equals the uninterrupted 2-process run."""
    config, out = _config(data, tmp_path / "cut", **DDP), tmp_path / "cut"
    proc = _start(launch(config), slow_save=0.3)
    ckpt_parent = out / "checkpoints" / "shapes"
    wait_for(lambda: ckpt_parent.exists() and any(_states(p) for p in ckpt_parent.iterdir()), proc)
    rank1 = sorted(_workers(proc, 2), key=lambda p: p.environ().get("RANK", ""))[1]
    rank1.send_signal(signal.SIGUSR2)  # only rank 1 is signalled
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == EXIT_RESUMABLE and err.count(f"exit {EXIT_RESUMABLE} = stopped to be resumed") == 2, err[-3000:]

    # a mid-epoch state cannot continue on another world size (here: this one process)
    assert main([str(config)]) == 2
    assert "mid-epoch" in capsys.readouterr().err

    _stop_after_a_new_state(launch(config), out, signal.SIGTERM)
    final = subprocess.run(launch(config), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same_run(reference_ddp, out)


def test_a_killed_dataloader_worker_is_one_line_not_a_write_error(data, tmp_path):
    config = _config(data, tmp_path / "cut")
    proc = _start_group(_train_cmd(config))
    ckpt_parent = tmp_path / "cut" / "checkpoints" / "shapes"
    wait_for(lambda: ckpt_parent.exists() and any(_states(p) for p in ckpt_parent.iterdir()), proc)
    worker = psutil.Process(proc.pid).children()[0]  # the main process's children are its DataLoader workers
    worker.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("utp_dist:")]
    # torch names the signal when its SIGCHLD handler sees the death first, else only that the worker "exited unexpectedly"
    assert line.startswith("utp_dist: error: data.num_workers: a data loading worker died (DataLoader worker (pid"), err[-3000:]
    assert str(worker.pid) in line and line.endswith(
        "lower data.num_workers, data.prefetch_factor or data.batch_size. The newest complete training state continues the run"
    )
    assert "Traceback" not in err and "cannot write" not in err


def test_resumed_tracker_drops_later_cut_and_malformed_metrics_lines(tmp_path):
    from utp_dist.store.run_dir import RunDir
    from utp_dist.tracking import TensorBoardTracker

    run = RunDir(tmp_path, "data", "run")
    run.logs.mkdir(parents=True)
    lines = [{"split": "val", "epoch": 0, "step": 9}, {"split": "val", "epoch": 1, "step": 18}, {"split": "test", "epoch": 1, "step": 18}]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    # an empty object, a list and a kill -9 that cut the last line short: none may block the resume
    run.metrics_file.write_text(text + "{}\n[1]\n" + '{"split": "val", "epo')
    tracker = TensorBoardTracker(run, total_steps=30, resume_step=18)
    tracker.close()
    kept = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert kept == lines[:2]  # later steps, the test split and the broken lines are gone
