"""A search on agents: the server queues its trials, decides its rungs and resumes the promoted ones, with real processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_image_folder, run_cli, tiny_config
from dashboard_support import wait_until
from test_agents import dashboard  # noqa: F401 (the fixture)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("search-agents") / "shapes", per_class={"train": 8, "val": 4})


def _trials(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((sweep / "trials").glob("*.json"))]


def test_two_cpu_agents_run_an_asha_search_the_server_steps(tmp_path, dashboard, data):  # noqa: F811
    root = tmp_path / "root"
    server, client, group = dashboard([root])
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
    done = run_cli(str(path), "--executor", "dashboard", "--server", server.url, module="utp_dist.submit", **server.xdg_env())
    assert done.returncode == 0 and "submitted to the dashboard" in done.stdout, done.stdout + done.stderr
    sweep = root / "sweeps" / "tiny"

    def ended() -> bool:
        trials = _trials(sweep)
        return len(trials) == 3 and all(t["state"] in ("succeeded", "stopped-early", "failed") for t in trials)

    try:
        wait_until(ended, 150, "the search's trials to end", server.log)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{_trials(sweep)}\n{group.logs()}") from None

    trials = _trials(sweep)
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert sorted(t["state"] for t in trials) == ["stopped-early", "stopped-early", "succeeded"], trials
    # one queued run per trial, each in its own run folder; the promoted one continued its folder to epoch 2
    assert sorted(p.name for p in (root / "logs" / "shapes").iterdir()) == [f"tiny__trial-00{n}" for n in range(3)]
    (best,) = [t for t in trials if t["state"] == "succeeded"]
    assert list(best["values"]) == ["1", "2"] and best["attempts"] == 2
    run = client.get(f"/api/v1/runs/{best['run_id']}").json()
    assert run["state"] == "succeeded" and run["name"] == best["run"] and run["attempts"] == 2, run
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
