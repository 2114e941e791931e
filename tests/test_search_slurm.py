"""A search on the private Slurm: one array of worker tasks; a worker preempted (USR2) is requeued and continues its trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import yaml
from conftest import tiny_config
from test_slurm import data, sacct, submit  # noqa: F401 - the module's data fixture

SPACE = {"optim.lr": {"log_uniform": [1.0e-4, 1.0e-2]}}


def test_search_workers_are_one_array_and_a_preempted_worker_continues_its_trial(slurm, data, tmp_path):  # noqa: F811
    base = tiny_config(data, tmp_path / "out", data={"num_workers": 0}, train={"callbacks": ["tests.hooks:SlowSteps"]})
    base["checkpoint"] = {"every_n_steps": 1, "every_n_minutes": None}  # states mid-epoch: the signal must find it training
    search = {"method": "random", "trials": 3, "parallel": 2, "space": SPACE, "asha": {"min_epochs": 1, "max_epochs": 3, "reduction": 3}}
    path = tmp_path / "search.yaml"
    resources = {"time_min": 20, "cpus_per_task": 1, "max_requeues": 2}
    path.write_text(yaml.safe_dump({"name": "ssearch", "base": base, "search": search, "resources": resources}))
    result = submit(slurm, str(path), UTP_TEST_STEP_SLEEP="0.3")
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = tmp_path / "out" / "sweeps" / "ssearch"
    jobs = [t["jobs"][-1] for t in json.loads((sweep / "sweep.json").read_text())["tasks"]]
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_0", f"{array}_1"]  # one array job, one task per worker

    def trial_of_worker_0() -> dict | None:
        for path in (sweep / "trials").glob("*.json") if (sweep / "trials").is_dir() else []:
            trial = json.loads(path.read_text())
            state = tmp_path / "out" / "checkpoints" / "shapes" / trial["run"] / "state"
            mid_epoch = [p for p in state.glob("step-*/COMPLETE") if int(p.parent.name.split("-")[1]) in (1, 2, 3)]
            if trial["state"] == "running" and trial["rung"] == -1 and trial.get("job") == jobs[0] and mid_epoch:
                return trial
        return None

    deadline = time.time() + 300
    while trial_of_worker_0() is None:
        assert time.time() < deadline, "worker 0 never trained a trial past its first state"
        time.sleep(0.5)
    preempted = trial_of_worker_0()
    subprocess.run(["scancel", "--signal=USR2", jobs[0]], check=True, timeout=30, env={**os.environ, **slurm})

    waited = submit(slurm, "resubmit", str(sweep), "--failed", timeout=30)  # nothing to do while the workers run
    assert waited.returncode == 0 and "workers still run" in waited.stdout, waited.stdout + waited.stderr
    deadline = time.time() + 400
    while not all(r["State"] == "COMPLETED" for r in sacct(slurm, array)):
        assert time.time() < deadline, sacct(slurm, array)
        time.sleep(2)
    trials = [json.loads(p.read_text()) for p in sorted((sweep / "trials").glob("*.json"))]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert sorted(t["state"] for t in trials) == ["stopped-early", "stopped-early", "succeeded"]
    again = next(t for t in trials if t["number"] == preempted["number"])
    # continued from its state, under its number: by the requeued worker 0, or by worker 1 when it was free first
    assert again["attempts"] >= preempted["attempts"] + 1 and again["job"] in jobs
    log = "".join(p.read_text() for p in (sweep / "slurm").glob(f"{jobs[0]}_0_log.*"))
    assert f"stopped by signal {int(signal.SIGUSR2)} in trial {preempted['number']}" in log, log[-3000:]
    assert sorted(p.name for p in (tmp_path / "out" / "logs" / "shapes").iterdir()) == [f"ssearch__trial-00{n}" for n in range(3)]
    status = json.loads(submit(slurm, "status", str(sweep), "--json").stdout)
    assert sorted(r["state"] for r in status) == ["stopped-early", "stopped-early", "succeeded"]


def test_a_search_worker_of_two_processes_trains_each_trial_as_world_size_two(slurm, data, tmp_path):  # noqa: F811
    base = tiny_config(data, tmp_path / "out", data={"num_workers": 0})
    search = {"method": "random", "trials": 2, "parallel": 1, "space": SPACE, "asha": {"min_epochs": 1, "max_epochs": 2, "reduction": 2}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({"name": "ddp", "base": base, "search": search, "resources": {"tasks_per_node": 2, "time_min": 20}}))
    result = submit(slurm, str(path), "--wait", "--poll", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = tmp_path / "out" / "sweeps" / "ddp"
    trials = [json.loads(p.read_text()) for p in sorted((sweep / "trials").glob("*.json"))]
    assert sorted(t["state"] for t in trials) == ["stopped-early", "succeeded"]  # rank 0 alone took work: two trials, not four
    (done,) = [t for t in trials if t["state"] == "succeeded"]
    summary = json.loads((tmp_path / "out" / "logs" / "shapes" / done["run"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["restarts"] == 1  # paused at epoch 1 on both ranks, then continued
    logs = [p.read_text() for p in (sweep / "slurm").glob("*_log.err")]
    assert len(logs) == 2 and all(log.count("paused at epoch 1 (train.stop_at_epoch)") == 2 for log in logs), logs
