"""A search on agents: the server queues its trials, decides its rungs and resumes the promoted ones, with real processes
(a server, two CPU agents, their training children, one agent killed -9 mid-trial)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_image_folder, run_cli, tiny_config
from dashboard_support import wait_until
from test_agents import ENV, dashboard  # noqa: F401 (the fixture)

from utp_dist.store.run_dir import RunDir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("search-agents") / "shapes", per_class={"train": 8, "val": 4})


def _trials(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((sweep / "trials").glob("*.json"))]


def test_two_cpu_agents_run_an_asha_search_the_server_steps(tmp_path, dashboard, data):  # noqa: F811
    root = tmp_path / "root"
    # a lease long enough that agents on a loaded 2-core machine keep theirs: only the killed one loses its job
    server, client, group = dashboard([root], lease_s=15)
    search = {
        "method": "random",
        "trials": 3,
        "parallel": 2,
        "space": {"optim.lr": {"log_uniform": [1.0e-4, 1.0e-2]}},
        "asha": {"min_epochs": 1, "max_epochs": 2, "reduction": 3},  # rungs at 1 and 2 epochs; the best of three goes on
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": tiny_config(data, root, data={"num_workers": 0}), "search": search}))
    group.start("cpu-a")
    group.start("cpu-b")
    cmd = [sys.executable, "-m", "utp_dist.submit", str(path), "--executor", "dashboard", "--server", server.url, "--wait", "--poll", "1"]
    env = {**ENV, **server.xdg_env()}
    submit = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep = root / "sweeps" / "tiny"

    def promoted_training() -> dict | None:  # the promoted trial's second segment, the only job its agent holds
        trials = _trials(sweep) if sweep.is_dir() else []
        runs = {t["number"]: client.get(f"/api/v1/runs/{t['run_id']}").json() for t in trials if t.get("run_id")}
        for trial in trials:
            run = runs.get(trial["number"])
            if trial["state"] == "running" and trial["target"] == 2 and run and run["state"] == "running" and run["agent_id"]:
                others = [r for n, r in runs.items() if n != trial["number"] and r["agent_id"] == run["agent_id"]]
                if not any(r["state"] in ("claimed", "running", "stopping") for r in others):
                    return run
        return None

    try:
        wait_until(lambda: promoted_training() is not None, 150, "the promoted trial's second segment")
        holder = promoted_training()["agent_id"]
        name = next(a["name"] for a in client.get("/api/v1/agents").json() if a["id"] == holder)
        group.procs[name].kill()  # kill -9 of its agent mid-trial: the lease runs out, the other agent continues it
        out, err = submit.communicate(timeout=150)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}\n{_trials(sweep)}\n{group.logs()}"
    assert "submitted to the dashboard" in out and "| succeeded |" in out

    trials = _trials(sweep)
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert sorted(t["state"] for t in trials) == ["stopped-early", "stopped-early", "succeeded"], trials
    # one queued run per trial, each in its own run folder; the promoted one continued its folder to epoch 2
    # (a trial whose first segment died with the agent before its first save goes on as NAME-v1: still one folder)
    folders = sorted(p.name for p in (root / "logs" / "shapes").iterdir())
    assert folders == sorted(t["run"] for t in trials) and all(t["run"].startswith(f"tiny__trial-00{t['number']}") for t in trials)
    (best,) = [t for t in trials if t["state"] == "succeeded"]
    assert list(best["values"]) == ["1", "2"] and best["attempts"] == 2  # the same trial number after its agent died
    run = client.get(f"/api/v1/runs/{best['run_id']}").json()  # paused, then continued twice (killed, requeued)
    assert run["state"] == "succeeded" and run["name"] == best["run"] and run["attempts"] == 3 and run["agent_id"] != holder, run
    assert len({t["run_id"] for t in trials}) == 3
    checkpoints = root / "checkpoints" / "shapes"
    for trial in trials:
        if trial["state"] == "stopped-early":  # pruned to the best export
            assert not (checkpoints / trial["run"] / "state").exists() and (checkpoints / trial["run"] / "best").is_dir()
            assert client.get(f"/api/v1/runs/{trial['run_id']}").json()["attempts"] == 1

    status = run_cli("status", str(path), module="utp_dist.submit")  # the search file names its newest sweep
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("| trial | state |") and len(lines) == 5, status.stdout
    assert sorted(line.split(" | ")[1] for line in lines[2:]) == ["stopped-early", "stopped-early", "succeeded"]


def test_an_agent_lost_after_the_first_save_before_reporting_the_folder_leaves_the_trial_to_resume_in_it(tmp_path, dashboard, data):  # noqa: F811
    """The agent hangs (SIGSTOP) before it reports its trial's run folder, its child saves a state, then the agent dies:
    the next agent continues that state in the trial's own folder (no NAME-v1, no epoch trained twice)."""
    root = tmp_path / "root"
    server, client, group = dashboard([root])
    # three epochs of three steps, slowed down under the first agent only: its child is caught between two states
    base = tiny_config(data, root, train={"epochs": 3, "log_every_n_steps": 1, "callbacks": ["tests.hooks:SlowSteps"]})
    search = {"method": "random", "trials": 1, "parallel": 1, "space": {"optim.lr": {"log_uniform": [1.0e-4, 1.0e-2]}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "lost", "base": base, "search": search}))
    cmd = [sys.executable, "-m", "utp_dist.submit", str(path), "--executor", "dashboard", "--server", server.url]
    submitted = subprocess.run(cmd, cwd=REPO, env={**ENV, **server.xdg_env()}, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    sweep = root / "sweeps" / "lost"
    agent = group.start("cpu-a", UTP_TEST_STEP_SLEEP="0.5")

    def run() -> dict:
        (trial,) = _trials(sweep)
        return client.get(f"/api/v1/runs/{trial['run_id']}").json()

    wait_until(lambda: sweep.is_dir() and _trials(sweep) and _trials(sweep)[0].get("run_id") and run()["state"] == "running", 60, "its run")
    os.kill(agent.pid, signal.SIGSTOP)  # its child starts (imports, loads data) for seconds: it has not named its folder yet
    assert run()["root"] is None
    (trial,) = _trials(sweep)
    states = root / "checkpoints" / "shapes" / trial["run"] / "state"
    wait_until(lambda: any((s / "COMPLETE").exists() for s in states.glob("step-*")), 60, "the first state")
    agent.kill()  # its child dies with it (mid-epoch 2 at the latest); the lease runs out, the job is queued again
    agent.wait()
    group.start("cpu-b")
    wait_until(lambda: _trials(sweep)[0]["state"] == "succeeded", 90, "the trial's end")

    (trial,) = _trials(sweep)
    assert trial["run"] == "lost__trial-000" and [p.name for p in (root / "logs" / "shapes").iterdir()] == [trial["run"]]
    done = run()
    assert done["state"] == "succeeded" and done["name"] == trial["run"] and done["attempts"] == 2, done
    evaluated = [m for m in RunDir(root, "shapes", trial["run"]).read_metrics() if m.get("split") == "val"]
    assert [m["epoch"] for m in evaluated] == [0, 1, 2], evaluated  # each epoch evaluated once: none was trained again
    assert done["restarts"] == 1


def test_the_controller_is_idempotent_and_resubmit_failed_resumes_a_failed_trial(tmp_path, data):
    """The server's step, in process: no duplicate run on a repeated step; a failed trial fails; resubmit --failed resumes it."""
    from utp_dist.dashboard import jobqueue, migrate, searches
    from utp_dist.dashboard.db import Database, Run
    from utp_dist.sweep import ledger as ledgers
    from utp_dist.sweep.search import load_search
    from utp_dist.sweep.study import retry_failed

    root = tmp_path / "root"
    search = {"method": "random", "trials": 3, "parallel": 2, "space": {"optim.lr": {"log_uniform": [1.0e-4, 1.0e-2]}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": tiny_config(data, root), "search": search}))
    folder = ledgers.create_search(load_search(path), str(root), "dashboard", None, {"gpus_per_node": 0})
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate.upgrade(database.engine)
    with database.sessions() as session:
        for _ in range(2):
            searches.step_all(session, (root,))
        assert [t["run_id"] for t in _trials(folder)] == [1, 2] and session.query(Run).count() == 2  # parallel 2, once
        agent = jobqueue.register(session, "a", "host", [], drain=False, lease_s=30)
        claimed = jobqueue.claim(session, agent.id, 0, True, [], lease_s=30)
        jobqueue.start(session, claimed["job_id"], agent.id, claimed["attempt"], pid=1)
        jobqueue.finish(session, claimed["job_id"], agent.id, claimed["attempt"], 1, "boom", None)
        searches.step_all(session, (root,))
        trials = _trials(folder)
        assert [t["state"] for t in trials] == ["failed", "running", "running"] and trials[0]["error"] == "exit 1; see the worker's log"
        assert retry_failed(folder, ledgers.read(folder)) == 1
        searches.step_all(session, (root,))
        assert session.get(Run, 1, populate_existing=True).state == "queued" and session.query(Run).count() == 3
        assert [(t["state"], t.get("retry")) for t in _trials(folder)][0] == ("running", False)
