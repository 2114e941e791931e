"""The sweep board's study view of a search: a real search (the debug executor) under a real dashboard process."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import make_image_folder, run_cli, tiny_config
from dashboard_support import serving, wait_until

SPACE = {"optim.lr": {"log_uniform": [1.0e-4, 3.0e-2]}, "optim.weight_decay": {"uniform": [0.0, 0.1]}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An output root holding one finished search: 3 trials, rungs at 1 and 2 epochs."""
    base = tmp_path_factory.mktemp("study")
    images = make_image_folder(base / "shapes", per_class={"train": 8, "val": 4})
    root = base / "root"
    search = {"method": "tpe", "trials": 3, "parallel": 1, "space": SPACE, "asha": {"min_epochs": 1, "max_epochs": 2, "reduction": 2}}
    path = base / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": tiny_config(images, root, data={"num_workers": 0}), "search": search}))
    done = run_cli(str(path), "--executor", "debug", module="utp_dist.submit", timeout=600, OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    with serving(root, tmp_path_factory, "study-db") as running:
        yield running


@pytest.fixture(scope="module")
def api(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def sweep_id(api) -> int:
    found: list[dict] = []
    wait_until(lambda: found.extend(s for s in api.get("/api/v1/sweeps").json() if s["name"] == "tiny") or found, 30, "the search indexed")
    return found[0]["id"]


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "sweeps" / "tiny" / "trials").glob("*.json"))]


@contextlib.contextmanager
def _edited(root: Path, change) -> None:
    """Trial records changed by `change(record)` for the length of a test (the records are what the view reads)."""
    paths = sorted((root / "sweeps" / "tiny" / "trials").glob("*.json"))
    saved = {p: p.read_text() for p in paths}
    try:
        for path in paths:
            record = json.loads(saved[path])
            change(record)
            path.write_text(json.dumps(record))
        yield
    finally:
        for path, text in saved.items():
            path.write_text(text)


def test_the_board_of_a_search_returns_its_trials_with_their_curves(api, root, sweep_id):
    board = api.get(f"/api/v1/sweeps/{sweep_id}")
    assert board.status_code == 200, board.text
    body = board.json()
    assert body["error"] is None and [r["run"] for r in body["rows"]] == ["worker-0"]  # the tasks are the workers
    study = body["study"]
    assert (study["metric"], study["mode"], study["budget"], study["rungs"]) == ("val_acc@1", "max", 3, [1, 2])
    assert [p["key"] for p in study["params"]] == list(SPACE)
    records = _records(root)
    assert [t["number"] for t in study["trials"]] == [r["number"] for r in records] == [0, 1, 2]
    for trial, record in zip(study["trials"], records, strict=True):
        assert trial["state"] == record["state"] and trial["params"] == record["params"]
        assert trial["rung"] == record["rung"] + 1 and trial["epochs"] == [1, 2][record["rung"]]
        assert trial["value"] == record["values"][str(trial["epochs"])]
        # the rung chart's curve: the metric after each epoch the trial trained, the last one its rung value
        assert trial["curve"]["x"] == list(range(1, trial["epochs"] + 1)) and trial["curve"]["y"][-1] == trial["value"]
        assert trial["logs"] == str(root.resolve() / "logs" / "shapes" / record["run"])
    assert sorted(t["state"] for t in study["trials"]) == ["stopped-early", "succeeded", "succeeded"]


def test_importances_come_from_optuna_once_two_trials_have_values(api, root, sweep_id):
    def spread(record: dict) -> None:  # a metric that follows the learning rate only
        record["values"]["1"] = 0.5 + 0.1 * math.log10(record["params"]["optim.lr"])

    with _edited(root, spread):
        study = api.get(f"/api/v1/sweeps/{sweep_id}").json()["study"]
    importances = study["importances"]
    assert set(importances) == set(SPACE) and abs(sum(importances.values()) - 1) < 1e-6, study
    assert importances["optim.lr"] > importances["optim.weight_decay"]
    assert study["importance_note"] == "fANOVA (optuna) over 3 trials' val_acc@1 at epoch 1 (the first rung)."

    def same(record: dict) -> None:
        record["values"]["1"] = 0.25

    with _edited(root, same):
        study = api.get(f"/api/v1/sweeps/{sweep_id}").json()["study"]
    assert study["importances"] is None
    assert (
        study["importance_note"]
        == "All 3 trials have the same val_acc@1 at epoch 1 (the first rung): nothing tells the parameters apart yet."
    )

    def unstarted(record: dict) -> None:  # only trial 0 has reached a rung
        if record["number"]:
            record.update(rung=-1, values={}, state="running", pid=None)

    with _edited(root, unstarted):
        board = api.get(f"/api/v1/sweeps/{sweep_id}")
        page = api.get(f"/web/sweeps/{sweep_id}")
    assert board.status_code == 200 and page.status_code == 200
    study = board.json()["study"]
    assert study["importances"] is None
    assert study["importance_note"] == "Parameter importances need at least 2 trials with val_acc@1 at epoch 1 (the first rung); 1 so far."
    # a trial whose worker is gone is never shown running
    assert [(t["state"], t["rung"], t["value"]) for t in study["trials"][1:]] == [("paused", 0, None)] * 2
    assert "need at least 2 trials" in page.text


def test_junk_in_a_search_folder_is_left_out_or_one_line(api, root, sweep_id):
    trials = root / "sweeps" / "tiny" / "trials"
    junk = {"900.json": "[]", "901.json": json.dumps({"number": "x", "rung": 0}), "902.json": "{", "903.json": json.dumps({
        "number": 903, "state": "running", "rung": 0, "params": {"optim.lr": [1]}, "values": {"1": "a"}, "pid": 10**30, "host": None,
        "output_root": 5, "run": None})}  # fmt: skip
    try:
        for name, text in junk.items():
            (trials / name).write_text(text)
        board = api.get(f"/api/v1/sweeps/{sweep_id}")
        assert board.status_code == 200, board.text
        assert [t["number"] for t in board.json()["study"]["trials"]] == [0, 1, 2, 903]
        assert api.get(f"/web/sweeps/{sweep_id}").status_code == 200
    finally:
        for name in junk:
            (trials / name).unlink()
    broken = root / "sweeps" / "broken"
    broken.mkdir()
    ledger = json.loads((root / "sweeps" / "tiny" / "sweep.json").read_text())
    (broken / "sweep.json").write_text(json.dumps({**ledger, "name": "broken", "search": 5}))
    found: list[dict] = []
    wait_until(lambda: found.extend(s for s in api.get("/api/v1/sweeps").json() if s["name"] == "broken") or found, 30, "indexed")
    board = api.get(f"/api/v1/sweeps/{found[0]['id']}")
    assert board.status_code == 200 and board.json()["error"] == "broken: its search cannot be read: search must be a mapping"
    assert api.get(f"/web/sweeps/{found[0]['id']}").status_code == 200


def test_the_study_view_draws_in_a_browser(server, sweep_id, root, tmp_path):
    from dashboard_support import logged_in_page
    from playwright.sync_api import expect

    with logged_in_page(server) as page:
        page.goto(f"/web/sweeps/{sweep_id}")
        expect(page.locator("#trials tbody tr")).to_have_count(3)
        expect(page.locator("#chart-rungs canvas").first).to_be_visible()
        lines = page.locator("#chart-parallel svg polyline")
        expect(lines).to_have_count(3)  # one line per trial with a value
        stopped = next(r["number"] for r in _records(root) if r["state"] == "stopped-early")
        assert page.locator(f'#chart-parallel polyline[data-trial="{stopped}"]').get_attribute("stroke-opacity") == "0.35"
        assert page.locator("#chart-rungs .u-legend").inner_text().count("trial") == 3
        page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        assert page.errors == []


def test_resubmit_failed_of_a_search_checks_its_trial_configs(api, root, sweep_id):
    done = api.post(f"/api/v1/sweeps/{sweep_id}/resubmit-failed")
    assert done.json() == {"exit_code": 0, "message": "nothing to resubmit: the search has no failed trial and nothing left to train"}
    path = root / "sweeps" / "tiny" / "configs" / "trial-002.yaml"
    saved = path.read_text()
    config = yaml.safe_load(saved)
    config["train"]["callbacks"] = ["os:system"]
    path.write_text(yaml.safe_dump(config))
    try:
        refused = api.post(f"/api/v1/sweeps/{sweep_id}/resubmit-failed").json()
    finally:
        path.write_text(saved)
    assert refused["exit_code"] == 2 and refused["message"].startswith("tiny: trial-002: train.callbacks"), refused
