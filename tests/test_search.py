"""Adaptive search: the pause point, the search file, ASHA with pause and promote on real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_image_folder, run_here, tiny_config, torchrun, wait_for
from safetensors.torch import load_file

from utp_dist.config import from_dict
from utp_dist.preemption import Stopped


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("search") / "shapes", per_class={"train": 8, "val": 4})


def _weights(out: Path) -> dict:
    (run,) = (out / "checkpoints" / "shapes").iterdir()
    (state,) = sorted((run / "state").glob("step-*"))[-1:]
    return load_file(state / "model.safetensors")


def test_a_run_paused_at_an_epoch_and_continued_equals_one_trained_straight(data, tmp_path, fresh_accelerate):
    from utp_dist.api import train

    def config(out: str, **train_keys):
        return from_dict(tiny_config(data, tmp_path / out, train={"epochs": 3, **train_keys}, data={"num_workers": 0}))

    train(config("straight"))
    with pytest.raises(Stopped, match="paused at epoch 1"):
        train(config("paused", stop_at_epoch=1))
    assert [p.name for p in (tmp_path / "paused" / "checkpoints" / "shapes").glob("*/FINISHED")] == []
    summary = train(config("paused", stop_at_epoch=1))  # the same pause point again: it is behind the run, training goes on
    assert summary["restarts"] == 1
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "paused")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _search_file(tmp_path: Path, data: Path, search: dict, **sections) -> Path:
    base = tiny_config(data, tmp_path / "out", data={"num_workers": 0}, **sections)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": base, "search": search}))
    return path


SPACE = {"optim.lr": {"log_uniform": [1.0e-4, 1.0e-2]}}


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optim.lr": {"log_uniform": [-1, 0.1]}}, "search.space.optim.lr: log_uniform bounds must be > 0, got [-1, 0.1]"),
        ({"optim.lrr": {"uniform": [0, 1]}}, "search.space.optim.lrr=0.0: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"data.batch_size": {"int": [0, 64], "step": 8}}, "search.space.data.batch_size=0: data.batch_size must be > 0"),
        ({"train.epochs": {"int": [1, 3]}}, "search.space.train.epochs: the search sets train.epochs itself"),
        ({"optim.lr": {"between": [1, 2]}}, "search.space.optim.lr must be one of {log_uniform: [LOW, HIGH]}"),
    ],
)
def test_a_bad_space_is_one_line_before_anything_is_made(data, tmp_path, capsys, space, message):
    from utp_dist.sweep.submit import main

    path = _search_file(tmp_path, data, {"trials": 2, "space": space})
    assert main([str(path), "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"utp_dist: error: {path}: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_search_keys_are_checked_too(data, tmp_path, capsys):
    from utp_dist.sweep.search import load_search
    from utp_dist.sweep.submit import main

    example = load_search(REPO / "configs" / "searches" / "lr_search.yaml")
    assert example.rungs == [1, 3, 9] and example.trials == 24 and [p.kind for p in example.space][0] == "log_uniform"

    for search, message in (
        ({"trials": 2, "space": SPACE, "method": "annealing"}, "search.method 'annealing' is not a sampler; use tpe, random, grid"),
        ({"trials": 2, "space": SPACE, "asha": {"min_epochs": 1, "max_epochs": 3, "reduction": 1}}, "search.asha.reduction must be >= 2"),
        ({"space": SPACE}, "search.trials is required"),
        ({"trials": 2, "space": SPACE, "metric": "val_acc@5"}, "train.monitor_metric 'val_acc@5' is never produced"),
        ({"trials": 2, "space": SPACE, "budget": 3}, "unknown key 'search.budget'"),
        (
            {"trials": 2, "space": SPACE, "sampler_options": {"n_startup": 3}},
            "sampler_options.n_startup: TPESampler takes no such argument",
        ),
        ({"trials": 2, "space": SPACE, "sampler_options": {"seed": 3}}, "sampler_options.seed: the search sets it (search.seed"),
    ):
        assert main([str(_search_file(tmp_path, data, search)), "--executor", "debug"]) == 2
        assert message in capsys.readouterr().err

    options = {"trials": 2, "space": SPACE, "sampler_options": {"n_startup_trials": 3}}
    search = load_search(_search_file(tmp_path, data, options))
    assert search.sampler(1)._n_startup_trials == 3  # TPESampler's own argument, beside the seed the search gives


def test_tpe_under_asha_learns_from_the_rungs_of_paused_trials(data, tmp_path):
    """A trial paused at a rung is RUNNING to Optuna, which TPE ignores: the search draws from a copy of the study in
    which paused trials count as pruned at their rung, so TPE models as soon as n_startup_trials trials reported."""
    from optuna.trial import Trial, TrialState

    from utp_dist.sweep.search import load_search
    from utp_dist.sweep.study import Study

    search = {
        "trials": 5,
        "space": SPACE,
        "sampler_options": {"n_startup_trials": 3},
        "asha": {"min_epochs": 1, "max_epochs": 3, "reduction": 3},
    }
    study = Study(tmp_path / "sweep", load_search(_search_file(tmp_path, data, search)))
    with study.locked():
        for number, value in enumerate((0.2, 0.9, 0.5)):  # three trials paused at the first rung
            made = study._new(number)
            Trial(study.optuna, made["trial_id"]).report(value, 1)
        made = study._new(3)
    trials = study.optuna.get_trials(deepcopy=False)
    assert [t.user_attrs["drawn_from_trials"] for t in trials] == [0, 1, 2, 3]  # the fourth draw is TPE's own
    assert [t.state for t in trials] == [TrialState.RUNNING] * 4 and made["params"] == trials[3].params  # no trial left waiting


def _trials(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((sweep / "trials").glob("*.json"))]


def test_asha_on_local_workers_pauses_promotes_bit_exact_and_survives_a_kill_9(data, tmp_path):
    """Two worker processes, three trials, rungs at 1 and 3 epochs; one worker is killed -9 in the middle of a trial."""
    search = {"method": "tpe", "trials": 3, "parallel": 2, "space": SPACE, "asha": {"min_epochs": 1, "max_epochs": 3, "reduction": 3}}
    path = _search_file(
        tmp_path,
        data,
        search,
        train={"callbacks": ["tests.hooks:SlowSteps"]},
        checkpoint={"every_n_steps": 1, "every_n_minutes": None, "keep_last": 2},
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "UTP_TEST_STEP_SLEEP": "0.4"}
    cmd = [sys.executable, "-m", "utp_dist.submit", str(path), "--executor", "local", "--wait", "--poll", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "out" / "sweeps" / "tiny"
    checkpoints = tmp_path / "out" / "checkpoints" / "shapes"

    def mid_trial() -> dict | None:  # a trial that is training and has saved a state (so it is past its start)
        for trial in _trials(sweep) if sweep.is_dir() else []:
            if trial["state"] == "running" and trial.get("pid") and list((checkpoints / trial["run"] / "state").glob("step-*/COMPLETE")):
                return trial
        return None

    wait_for(lambda: mid_trial() is not None, proc, timeout=240)
    killed = mid_trial()
    os.kill(killed["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])

    trials = _trials(sweep)
    assert [t["number"] for t in trials] == [0, 1, 2]  # the budget, no duplicate
    assert sorted(t["state"] for t in trials) == ["stopped-early", "stopped-early", "succeeded"]
    assert next(t for t in trials if t["number"] == killed["number"])["attempts"] >= killed["attempts"] + 1
    assert sorted(p.name for p in (tmp_path / "out" / "logs" / "shapes").iterdir()) == [f"tiny__trial-00{n}" for n in range(3)]
    for trial in trials:
        if trial["state"] == "stopped-early":  # pruned to the best export
            assert not (checkpoints / trial["run"] / "state").exists() and (checkpoints / trial["run"] / "best").is_dir()
    # the promoted trial paused at epoch 1 and went on in the same run folder: the same weights as straight to epoch 3
    (done,) = [t for t in trials if t["state"] == "succeeded"]
    assert done["rung"] == 1 and list(done["values"]) == ["1", "3"]
    straight = yaml.safe_load(Path(done["config"]).read_text())
    straight["output"]["root"] = str(tmp_path / "straight")
    (tmp_path / "straight.yaml").write_text(yaml.safe_dump(straight))
    ref = run_here(str(tmp_path / "straight.yaml"), OMP_NUM_THREADS="1")
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = (
        _weights(tmp_path / "straight"),
        load_file(sorted((checkpoints / done["run"] / "state").glob("step-*"))[-1] / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # what the user reads: status (table and JSON), the leaderboard, the study itself
    status = run_here("status", str(path), "--json", module="utp_dist.submit")  # the search file names its newest sweep
    rows = json.loads(status.stdout)
    assert [(r["trial"], r["state"]) for r in rows] == [(t["number"], t["state"]) for t in trials]
    assert next(r for r in rows if r["state"] == "succeeded")["epochs"] == 3
    board = run_here("leaderboard", str(sweep), module="utp_dist.submit")
    assert board.stdout.splitlines()[0] == "| rank | trial | optim.lr | epochs | val_acc@1 | state |"
    assert f"| 1 | {done['number']} | " in board.stdout.splitlines()[2]
    again = run_here("resubmit", str(sweep), "--failed", module="utp_dist.submit")
    assert again.returncode == 0 and again.stdout.startswith("nothing to resubmit"), again.stdout + again.stderr
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep / 'study.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "PRUNED", "PRUNED"]


def test_a_two_process_trial_pauses_on_both_ranks(data, tmp_path):
    raw = tiny_config(data, tmp_path / "out", data={"num_workers": 0}, train={"epochs": 2})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    paused = subprocess.run(
        torchrun(str(config), "train.stop_at_epoch=1", launcher="utp_dist.launch"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert paused.returncode == 75, paused.stderr[-3000:]
    assert paused.stderr.count("paused at epoch 1 (train.stop_at_epoch)") == 2  # each rank stopped there, none went on alone
    (state,) = (tmp_path / "out" / "checkpoints" / "shapes").glob("*/state/step-*")
    assert {"rank0.pt", "rank1.pt", "COMPLETE"} <= {p.name for p in state.iterdir()}
    assert json.loads((state / "identity.json").read_text())["epoch"] == 1
    assert not list((tmp_path / "out" / "checkpoints" / "shapes").glob("*/FINISHED"))


def test_resubmit_failed_continues_a_search_in_the_debug_executor(data, tmp_path, capsys, fresh_accelerate):
    from utp_dist.sweep.submit import main

    later = tmp_path / "later"
    search = {"method": "grid", "space": {"data.root": {"choice": [str(data), str(later)]}}}
    path = _search_file(tmp_path, data, search, train={"epochs": 1})
    assert main([str(path), "--executor", "debug"]) == 1  # the second trial's data does not exist yet
    sweep = tmp_path / "out" / "sweeps" / "tiny"
    assert sorted(t["state"] for t in _trials(sweep)) == ["failed", "succeeded"]
    capsys.readouterr()
    make_image_folder(later, per_class={"train": 8, "val": 4})
    assert main(["resubmit", str(sweep), "--failed"]) == 0
    assert "1 failed trial(s) continue from their newest state" in capsys.readouterr().out
    trials = _trials(sweep)
    assert [t["state"] for t in trials] == ["succeeded", "succeeded"] and sorted(t["attempts"] for t in trials) == [1, 2]
