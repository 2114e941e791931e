"""The grid launcher against a real private Slurm (slurmctld, slurmd, slurmdbd, MariaDB, munge) started for this module.

Never skipped: when Slurm cannot start, these tests fail with the daemon's message.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_image_folder, run_cli, tiny_config
from safetensors.torch import load_file

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # bit-identical resume needs the same thread count everywhere


def submit(slurm: dict, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m utp_dist.submit ...` with the private cluster's config."""
    return run_cli(*args, module="utp_dist.submit", timeout=timeout, **slurm, **THREADS, **env)


def submit_in_background(slurm: dict, *args: str) -> subprocess.Popen:
    """`python -m utp_dist.submit ...` started, not awaited: two submissions whose jobs may run side by side."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **slurm, **THREADS}
    command = [sys.executable, "-m", "utp_dist.submit", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sacct(slurm: dict, job: str, fields: str = "JobID,State,Start,End") -> list[dict]:
    """Accounting rows of a job (array tasks included), retried while sacct lags."""
    for _ in range(20):
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", f"--format={fields}", "-j", job],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **slurm},
        )
        rows = [dict(zip(fields.split(","), line.split("|"), strict=True)) for line in out.stdout.splitlines()]
        if rows and all(r["State"] not in ("PENDING", "RUNNING", "REQUEUED") for r in rows):
            return rows
        time.sleep(1)
    return rows


def grid_file(folder: Path, base: dict, sweep: dict, resources: dict, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "sweep": sweep, "resources": resources}))
    return path


def ledger(out: Path, name: str) -> tuple[Path, dict]:
    folder = out / "sweeps" / name
    return folder, json.loads((folder / "sweep.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class={"train": 16, "val": 4})


# 60 steps: still training when the timeout warning comes (the timeout run sleeps 0.9 s per step, the preempted one 0.4 s)
REQUEUE_BASE = {"train": {"epochs": 5, "seed": 5, "callbacks": ["tests.hooks:SlowSteps"]}, "data": {"batch_size": 4}}


def _scontrol(slurm: dict, *args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, timeout=30, env={**os.environ, **slurm}, capture_output=True)


def _stopped(out: Path, kind: str) -> bool:
    record = out / "sweeps" / kind / "tasks" / "0.json"
    return record.is_file() and json.loads(record.read_text())["state"] == "stopped"


def _job(out: Path, kind: str) -> str:
    return json.loads((out / "sweeps" / kind / "sweep.json").read_text())["tasks"][0]["jobs"][0]


def _training(out: Path) -> bool:
    return any((out / "logs").glob("*/*/events.out.tfevents.*"))


def _interrupt(slurm: dict, sweeps: dict[str, Path], submitted: float) -> None:
    """Preempt one run with USR2 once it trains; bring the other's time limit near once it trains, so that it times out
    once, then give it time to finish. Once a run has stopped, its resumed attempt goes at full speed (the slow steps
    only have to outlast the first attempt's signal)."""
    deadline, preempted, shortened, extended = time.time() + 240, False, False, False
    while time.time() < deadline and not (preempted and extended and all(_fast(out).exists() for out in sweeps.values())):
        if not shortened and _training(sweeps["timeout"]):
            # slurmctld checks limits every 30 s and sends USR2 once the end is within signal_delay_s + 30 s: a limit
            # 2 to 3 minutes after the start brings it at the next check, while the run trains, and no kill comes before
            minutes = math.ceil((time.time() - submitted) / 60) + 2
            _scontrol(slurm, "update", f"JobId={_job(sweeps['timeout'], 'timeout')}", f"TimeLimit={minutes}")
            shortened = True
        if not preempted and _training(sweeps["preempt"]):
            time.sleep(3)  # inside the training loop now
            subprocess.run(
                ["scancel", "--signal=USR2", _job(sweeps["preempt"], "preempt")], check=True, timeout=30, env={**os.environ, **slurm}
            )
            preempted = True
        if not extended and _stopped(sweeps["timeout"], "timeout"):
            # the short limit would time the resumed run out again: the second attempt gets 20 minutes
            _scontrol(slurm, "update", f"JobId={_job(sweeps['timeout'], 'timeout')}", "TimeLimit=20")
            extended = True
        for kind, out in sweeps.items():
            if _stopped(out, kind):
                _fast(out).touch()
        time.sleep(0.5)


def _fast(out: Path) -> Path:
    """The file that ends the slow steps of the run in `out` (tests.hooks:SlowSteps)."""
    return out.parent / f"{out.name}.resumed"


@pytest.fixture(scope="module", autouse=True)
def requeue_sweeps(slurm, data, tmp_path_factory):
    """Submitted first, checked last: a run that hits its time limit, and one preempted by USR2 (they mostly sleep)."""
    folder = tmp_path_factory.mktemp("requeue")
    sweeps = {}
    # the timeout run's limit is cut short once it trains (_interrupt); submitit counts a signal as a time-out when the
    # job asked for 10 minutes or less
    submitted = time.time()
    for kind, resources, sleep in (("timeout", {"time_min": 10, "signal_delay_s": 200}, "0.9"), ("preempt", {"time_min": 20}, "0.4")):
        base = tiny_config(data, folder / kind, **{k: dict(v) for k, v in REQUEUE_BASE.items()})
        grid = grid_file(folder, base, {"train.label_smoothing": [0.0]}, {**resources, "max_requeues": 2}, kind)
        result = submit(slurm, str(grid), UTP_TEST_STEP_SLEEP=sleep, UTP_TEST_STEP_SLEEP_UNTIL=str(_fast(folder / kind)))
        assert result.returncode == 0, result.stderr
        sweeps[kind] = folder / kind
    interrupter = threading.Thread(target=_interrupt, args=(slurm, sweeps, submitted), daemon=True)
    interrupter.start()
    return folder, sweeps, interrupter


def test_grid_of_four_is_one_array_job_with_parallelism_and_resubmit_failed(slurm, data, tmp_path):
    base = tiny_config(data, tmp_path / "out", train={"epochs": 1})
    sweep = {"zip": [{"data.root": [str(data)] * 3 + [str(tmp_path / "later")], "train.seed": [1, 2, 3, 4]}]}
    grid = grid_file(tmp_path, base, sweep, {"array_parallelism": 2, "cpus_per_task": 1, "time_min": 20}, "four")
    # the port submitit gives a job (MASTER_PORT when the submitting shell has one, else drawn from the job id) is held
    # by another program of the node: a job of one task is one process, which must not listen on it
    taken = socket.create_server(("", 0))
    slurm = {**slurm, "MASTER_PORT": str(taken.getsockname()[1])}
    result = submit(slurm, str(grid), "--wait", "--poll", "1")
    assert result.returncode == 1, result.stdout + result.stderr  # the fourth point's data does not exist yet
    why = f"task 3 failed: data.root: folder '{tmp_path / 'later'}' does not exist; point it at an ImageFolder root with train/ and val/"
    assert result.stdout.splitlines()[-1] == why, result.stdout  # the task's own one-line error, not "see the log"
    folder, record = ledger(tmp_path / "out", "four")
    jobs = [t["jobs"][-1] for t in record["tasks"]]
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_{i}" for i in range(4)]  # one array job, one task per grid point
    pickles = list((folder / "slurm").glob(f"{array}_*_submitted.pkl"))
    assert pickles and all(b"utp_dist.sweep.task" in p.read_bytes() for p in pickles)  # the task class as submitit unpickles it

    rows = sacct(slurm, array)
    assert sorted(r["JobID"] for r in rows) == jobs
    assert [r["State"] for r in sorted(rows, key=lambda r: r["JobID"])] == ["COMPLETED"] * 3 + ["FAILED"]
    spans = [(datetime.fromisoformat(r["Start"]), datetime.fromisoformat(r["End"])) for r in rows]
    running_at = [sum(s <= start < e for s, e in spans) for start, _ in spans]
    assert max(running_at) == 2, spans  # array_parallelism=2: two at once, never more
    for task in record["tasks"][:3]:
        logs = next((tmp_path / "out" / "logs" / "shapes").glob(task["name"]))
        assert json.loads((logs / "summary.json").read_text())["steps"] == 6
        assert (tmp_path / "out" / "checkpoints" / "shapes" / task["name"] / "best" / "model.safetensors").is_file()

    status = submit(slurm, "status", str(folder)).stdout.splitlines()
    assert "| failed | 0 | - | - | - | - |" in status[5] and "| succeeded | 0 | 0 | 6 |" in status[2], status
    assert status[6:] == [why], status
    failed = json.loads(submit(slurm, "status", str(folder), "--json").stdout)[3]
    assert why.split(": ", 1)[1] in Path(failed["log"]).read_text()  # submitit's log of that task, for a failure without a line

    make_image_folder(tmp_path / "later", per_class={"train": 16, "val": 4})
    again = submit(slurm, "resubmit", str(folder), "--failed", "--wait", "--poll", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    _, record = ledger(tmp_path / "out", "four")
    new_job = record["tasks"][3]["jobs"][-1]
    assert new_job.split("_")[0] != array and [t["jobs"] for t in record["tasks"][:3]] == [[j] for j in jobs[:3]]
    assert [r["State"] for r in sacct(slurm, new_job)] == ["COMPLETED"]
    assert "| succeeded | 1 | 0 | 6 |" in submit(slurm, "status", str(folder)).stdout.splitlines()[5]
    taken.close()


def test_sbatch_refusing_the_job_is_one_line_with_slurms_message(slurm, data, tmp_path):
    grid = grid_file(tmp_path, tiny_config(data, tmp_path / "out"), {"train.seed": [1, 2]}, {"partition": "nope"}, "refused")
    result = submit(slurm, str(grid))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "utp_dist: error: sbatch refused the job: invalid partition specified: nope; "
        "Batch job submission failed: Invalid partition name specified"
    )
    assert not (tmp_path / "out" / "sweeps" / "refused").exists()


def test_fake_gpus_fail_with_the_reason_and_two_tasks_per_node_train_as_world_size_two(slurm, data, tmp_path):
    # the cluster's two GPUs are fake (gres on a CPU machine): a GPU task must refuse to train on the CPU
    gpu_grid = grid_file(
        tmp_path,
        tiny_config(data, tmp_path / "gpu-out", train={"epochs": 1}),
        {"train.seed": [7]},
        {"gpus_per_node": 2, "time_min": 20},
        "gpu",
    )
    gpu_job = submit_in_background(slurm, str(gpu_grid), "--wait", "--poll", "1")
    # the same world of two, as CPU processes (submitted meanwhile: the cluster runs both jobs at once)
    base = tiny_config(data, tmp_path / "out", train={"epochs": 1})
    grid = grid_file(tmp_path, base, {"train.seed": [7]}, {"tasks_per_node": 2, "time_min": 20}, "ddp")
    result = submit(slurm, str(grid), "--wait", "--poll", "1")
    out, err = gpu_job.communicate(timeout=300)
    assert gpu_job.returncode != 0 and "| failed |" in out, out + err
    rank_logs = [p.read_text() for p in (tmp_path / "gpu-out" / "sweeps" / "gpu" / "slurm").glob("*_log.err")]
    reason = "utp_dist: error: this job was given 1 GPU(s) but this process sees 0 CUDA device(s)"
    assert len(rank_logs) == 2 and all(reason in log for log in rank_logs)
    assert result.returncode == 0, result.stdout + result.stderr
    _, record = ledger(tmp_path / "out", "ddp")
    (job,) = record["tasks"][0]["jobs"]
    assert "_" not in job  # a grid of one is a plain job, not an array
    logs = next((tmp_path / "out" / "logs" / "shapes").iterdir())
    summary = json.loads((logs / "summary.json").read_text())
    assert (summary["world_size"], summary["distributed_type"], summary["backend"]) == (2, "MULTI_CPU", "gloo")
    assert summary["global_batch"] == 16
    task_logs = sorted((tmp_path / "out" / "sweeps" / "ddp" / "slurm").glob(f"{job}_*_log.out"))
    assert len(task_logs) == 2


@pytest.fixture(scope="module", autouse=True)
def reference_run(requeue_sweeps, data, tmp_path_factory):
    """The same run, never interrupted: started with the module, it trains while the tests above wait on the cluster."""
    folder = tmp_path_factory.mktemp("reference")
    config = tiny_config(data, folder, **{k: dict(v) for k, v in REQUEUE_BASE.items()})
    (folder / "reference.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **THREADS}
    with open(folder / "train.log", "wb") as log:  # a file, not a pipe nobody reads while it trains
        proc = subprocess.Popen(
            [sys.executable, "-m", "utp_dist.train", str(folder / "reference.yaml")], cwd=REPO, env=env, stdout=log, stderr=log
        )
    yield folder, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference_weights(reference_run) -> dict:
    folder, proc = reference_run
    assert proc.wait(timeout=600) == 0, (folder / "train.log").read_text()[-3000:]
    (run,) = (folder / "checkpoints" / "shapes").iterdir()
    return load_file(run / "best" / "model.safetensors")


@pytest.mark.parametrize("kind, case", [("timeout", "timed-out"), ("preempt", "preempted")])
def test_requeued_task_resumes_and_ends_with_the_uninterrupted_weights(requeue_sweeps, reference_weights, slurm, kind, case):
    _, sweeps, interrupter = requeue_sweeps
    interrupter.join(timeout=240)
    out = sweeps[kind]
    sweep_dir, record = ledger(out, kind)
    deadline = time.time() + 300
    while time.time() < deadline:
        state = submit(slurm, "status", str(sweep_dir)).stdout.splitlines()[2]
        if "| succeeded |" in state or "| failed |" in state:
            break
        time.sleep(3)
    assert "| succeeded |" in state, state
    assert int(state.split("|")[4]) == 1, state  # the ledger shows the restart
    (job,) = record["tasks"][0]["jobs"]
    log = "".join(p.read_text() for p in (sweep_dir / "slurm").glob(f"{job}_0_log.*"))
    assert f"this job is {case}" in log and "Requeued job" in log
    assert "the saved state continues the run" in log  # the run itself took the signal and saved at a step boundary
    (logs,) = (out / "logs" / "shapes").iterdir()  # resumed in the same run folder
    assert json.loads((logs / "summary.json").read_text())["restarts"] == 1
    weights = load_file(out / "checkpoints" / "shapes" / logs.name / "best" / "model.safetensors")
    assert weights.keys() == reference_weights.keys() and all(weights[k].equal(reference_weights[k]) for k in weights)


def test_scancel_of_an_array_task_with_workers_stops_it_resumably_and_resubmit_continues_exactly(slurm, data, reference_weights, tmp_path):
    # scancel sends SIGTERM to every process of the task's step (DataLoader workers included), SIGKILL KillWait later
    base = tiny_config(data, tmp_path / "out", **{k: dict(v) for k, v in REQUEUE_BASE.items()})
    base["data"]["num_workers"] = 2  # the reference trained without workers: they change nothing in the result
    base["checkpoint"] = {"every_n_steps": 4, "every_n_minutes": None}
    grid = grid_file(tmp_path, base, {"train.label_smoothing": [0.0, 0.1]}, {"time_min": 20}, "cancel")
    result = submit(slurm, str(grid), UTP_TEST_STEP_SLEEP="0.4")
    assert result.returncode == 0, result.stderr
    folder, record = ledger(tmp_path / "out", "cancel")
    job = record["tasks"][0]["jobs"][-1]
    assert "_" in job  # an array task
    ckpt = tmp_path / "out" / "checkpoints" / "shapes" / record["tasks"][0]["name"]
    deadline = time.time() + 240
    while not list(ckpt.glob("state/step-*/COMPLETE")):
        assert time.time() < deadline, "the task never saved a state"
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True, timeout=30, env={**os.environ, **slurm})
    assert [r["State"].split()[0] for r in sacct(slurm, job)] == ["CANCELLED"]
    task_record = folder / "tasks" / "0.json"
    deadline = time.time() + 30  # Slurm calls the job CANCELLED at once; the task writes its record as it ends
    while json.loads(task_record.read_text())["state"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    log = "".join(p.read_text() for p in (folder / "slurm").glob(f"{job}_0_log.*"))
    assert json.loads(task_record.read_text())["state"] == "stopped", log[-3000:]
    assert "DataLoader worker" not in log and "cannot write" not in log, log[-3000:]
    stopped = int(log.split("stopped by signal at step ")[1].split(";")[0])
    assert sorted(p.name for p in (ckpt / "state").glob("step-*"))[-1] == f"step-{stopped:08d}"  # saved at the stop

    again = submit(slurm, "resubmit", str(folder), "--tasks", "0", "--wait", "--poll", "1", UTP_TEST_STEP_SLEEP="0")
    assert again.returncode == 0, again.stdout + again.stderr
    (logs,) = (tmp_path / "out" / "logs" / "shapes").glob(record["tasks"][0]["name"])  # the same run folder, continued
    assert json.loads((logs / "summary.json").read_text())["restarts"] == 1
    weights = load_file(ckpt / "best" / "model.safetensors")
    assert weights.keys() == reference_weights.keys() and all(weights[k].equal(reference_weights[k]) for k in weights)
