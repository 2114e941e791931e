"""Grid files, cluster profiles and the submit command without a cluster: expansion, names, bad input, dry run, executors."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_image_folder, run_cli, run_here, tiny_config

from utp_dist.config import ConfigError
from utp_dist.store.run_dir import RunDir
from utp_dist.sweep.grid import load_grid
from utp_dist.sweep.resources import load_resources

GOLDEN = Path(__file__).parent / "golden" / "lr_x_model.sbatch"


def write_grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


def test_cartesian_product_and_zip_groups_with_readable_unique_names(tmp_path):
    grid = load_grid(REPO / "configs" / "sweeps" / "lr_x_model.yaml")
    assert len(grid.tasks) == 6 and grid.name == "lr_x_model"
    names = [t.name for t in grid.tasks]
    assert names[:2] == ["resnet__cross_entropy__scratch__lr=0.001_bs=64", "vit__cross_entropy__scratch__lr=0.001_bs=128"]
    assert len(set(names)) == 6
    # zip keys vary together; every config is complete, validated and pinned to its name
    for task in grid.tasks:
        cfg = task.config
        assert (cfg.model.flavour, cfg.data.batch_size) in {("resnet", 64), ("vit", 128)}
        assert ("hidden_size" in cfg.model.config) == (cfg.model.flavour == "vit")
        assert cfg.output.run_name == task.name and os.path.isabs(cfg.output.root)
        assert cfg.optim.lr == task.swept["optim.lr"] and cfg.train.epochs == 5  # the rest comes from the base
    assert grid.resources == {"time_min": 30, "cpus_per_task": 3}


def test_base_path_is_relative_to_the_grid_and_inline_bases_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"root": "imgs"}, "train": {"epochs": 1}}))
    by_path = load_grid(write_grid(tmp_path / "sub" / "g.yaml", {"base": "../base.yaml", "sweep": {"train.seed": [1, 2]}}))
    inline = load_grid(write_grid(tmp_path / "g2.yaml", {"base": {"train": {"epochs": 1}}, "sweep": {"optim.lr": ["1e-3", 0.01]}}))
    assert [t.config.train.seed for t in by_path.tasks] == [1, 2]
    assert by_path.tasks[0].config.data.root == str(tmp_path / "imgs")  # relative data paths are fixed at submission
    assert [t.name.rsplit("__", 1)[1] for t in inline.tasks] == ["lr=0.001", "lr=0.01"]  # '1e-3' is shown as resolved


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"sweep": {"optim.lrr": [1, 2]}}, "sweep (optim.lrr=1): unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"sweep": {"optim.lr": []}}, "sweep.optim.lr is an empty list; give at least one value or remove the key"),
        ({"sweep": {"optim.lr": 0.1}}, "sweep.optim.lr must be a list of values, got 0.1; write [0.1] for a single value"),
        (
            {"sweep": {"zip": [{"optim.lr": [1, 2], "train.seed": [1]}]}},
            "the lists of a zip group must be equally long (optim.lr has 2, train.seed has 1)",
        ),
        ({"sweep": {"optim.lr": [0.1, 0.1]}}, "grid points 0 and 1 get the same run name 'vit__cross_entropy__scratch'"),
        ({"sweeps": {}}, "unknown top-level key 'sweeps'; valid keys: name, base, set, sweep, search, resources"),
        ({"base": "missing.yaml"}, "base config 'missing.yaml' not found"),
        ({"sweep": {"train.epochs": [0]}}, "sweep (train.epochs=0): train.epochs must be > 0"),
        (
            {"set": {"optim.lr": 0.1}, "sweep": {"optim.lr": [1, 2]}},
            "'optim.lr' is both in set: and sweep:; one would silently override the other: keep one",
        ),
        ({"set": {"model.config.patch_size": 4}, "sweep": {"model.config": [{}]}}, "'model.config.patch_size' and 'model.config' are both"),
        ({"sweep": {"train.seed": [1, 2], "zip": [{"train.seed": [3], "optim.lr": [1]}]}}, "'train.seed' is in sweep: twice"),
    ],
)
def test_bad_grids_are_one_line_errors_naming_the_file(tmp_path, grid, message):
    path = write_grid(tmp_path / "bad.yaml", {"base": {"model": {"flavour": "vit"}}, **grid})
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "profile, message",
    [
        ({"partitio": "gpu"}, "unknown key 'partitio'; did you mean 'partition'?"),
        ({"sbatch": {"mail-typ": "END"}}, "sbatch.mail-typ is not an sbatch option; valid ones: acctg-freq, "),
        ({"sbatch": {"time": "10"}}, "sbatch.time: set it with the profile key 'time_min', not in the sbatch block"),
        ({"gpus_per_node": -1}, "gpus_per_node must be >= 0"),
        ({"time_min": 1}, "signal_delay_s (120) must be shorter than the time limit (time_min 1 = 60 s)"),
    ],
)
def test_bad_profiles_name_the_file_and_the_valid_choices(tmp_path, profile, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(ConfigError) as err:
        load_resources(path, {}, "grid.yaml")
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_grid_resources_override_the_profile():
    resources = load_resources(REPO / "slurm" / "profiles" / "example.yaml", {"time_min": 30, "gpus_per_node": 4}, "g.yaml")
    params = resources.submitit_parameters("sweep")
    assert (params["time"], params["gpus_per_node"], params["ntasks_per_node"], params["partition"]) == (30, 4, 4, "gpu")
    assert params["additional_parameters"] == {"requeue": True, "mail-type": "FAIL"}
    assert params["srun_args"] == ["--cpus-per-task", "8"]  # srun of Slurm 22.05-23.02 does not inherit it from sbatch


def test_dry_run_writes_the_golden_sbatch_script_and_submits_nothing(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "slurm" / "profiles", tmp_path / "profiles")
    result = run_cli(
        "configs/sweeps/lr_x_model.yaml",
        "--profile",
        "profiles/example.yaml",
        "--dry-run",
        cwd=tmp_path,
        module="utp_dist.submit",
        PATH="/usr/bin:/bin",
    )  # no sbatch needed for a dry run
    assert result.returncode == 0, result.stderr
    assert "6 run(s), 6 to submit" in result.stdout and "| 5 | vit__cross_entropy__scratch__lr=0.01_bs=128 |" in result.stdout
    folder = tmp_path / "experiments" / "sweeps" / ".dry-run" / "lr_x_model"
    script = (folder / "array.sbatch").read_text().replace(str(folder), "{SWEEP}").replace(sys.executable, "{PYTHON}")
    assert script == GOLDEN.read_text()
    assert len(list(folder.glob("*.yaml"))) == 6
    assert [p.name for p in (tmp_path / "experiments" / "sweeps").iterdir()] == [".dry-run"]  # no sweep, no ledger


def test_without_a_slurm_client_nothing_is_created(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {"base": {"output": {"root": str(tmp_path / "out")}}, "sweep": {"optim.lr": [0.1]}})
    result = run_cli(str(grid), cwd=tmp_path, module="utp_dist.submit", PATH=f"{Path(sys.executable).parent}:/nonexistent")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "utp_dist: error: no Slurm client found ('sbatch' is not on PATH); install slurm-client or use --executor local"
    )
    assert not (tmp_path / "out" / "sweeps").exists()


def test_ledger_commands_on_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    from utp_dist.sweep.submit import main  # in this process: test_without_a_slurm_client runs the command end to end

    assert main(["status", str(tmp_path)]) == 2
    assert f"{tmp_path}: no sweep.json here" in capsys.readouterr().err


def test_ledger_commands_on_a_file_say_the_same_one_line(tmp_path, capsys):
    from utp_dist.sweep.submit import main

    grid = write_grid(tmp_path / "g.yaml", {"sweep": {"optim.lr": [0.1]}})
    for command in (["status"], ["resubmit", "--failed"], ["leaderboard"]):
        capsys.readouterr()
        code = main([command[0], str(grid), *command[1:]])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.strip() == (
            f"utp_dist: error: {grid}: no sweep.json here; give a sweep folder made by `python -m utp_dist.submit GRID.yaml` "
            "(OUTPUT_ROOT/sweeps/NAME)"
        )


def test_a_completed_run_with_an_unreadable_summary_is_named_before_it_runs_again(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {"base": {"output": {"root": str(tmp_path / "out")}}, "sweep": {"optim.lr": [0.1, 0.2]}})
    first, second = load_grid(grid).tasks
    for task, summary in ((first, '{"config_hash": "'), (second, json.dumps({"config_hash": second.config.fingerprint()}))):
        run = RunDir(tmp_path / "out", "shapes", task.name)  # what a finished run left, its summary.json cut short for the first
        run.logs.mkdir(parents=True)
        run.config_file.write_text(task.config.to_yaml())
        run.summary_file.write_text(summary)
    result = run_cli(str(grid), "--dry-run", module="utp_dist.submit", PATH="/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    assert "2 run(s), 1 to submit" in result.stdout and f"skipped task 1 ({second.name})" in result.stdout
    summary = RunDir(tmp_path / "out", "shapes", first.name).summary_file
    assert result.stderr.strip() == f"utp_dist: warning: task 0 ({first.name}) runs again: {summary} cannot be read; fix or delete it"


@pytest.fixture
def tiny_grid(tmp_path) -> Path:
    """A grid of two tiny runs: the second reads a data folder that does not exist yet."""
    make_image_folder(tmp_path / "shapes", per_class={"train": 8, "val": 4})
    base = tiny_config(tmp_path / "shapes", tmp_path / "out", train={"epochs": 1})
    return write_grid(
        tmp_path / "grid.yaml", {"name": "tiny", "base": base, "sweep": {"data.root": [str(tmp_path / "shapes"), str(tmp_path / "later")]}}
    )


def wait_until(predicate, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_local_executor_runs_each_task_in_its_own_process_and_the_ledger_tracks_it(tiny_grid, tmp_path, capsys):
    from utp_dist.sweep.submit import main as submit

    result = run_cli(str(tiny_grid), "--executor", "local", "--wait", "--poll", "1", module="utp_dist.submit", timeout=300)
    assert result.returncode == 1, result.stderr  # one of the two failed: its data is missing
    sweep = tmp_path / "out" / "sweeps" / "tiny"
    ledger = json.loads((sweep / "sweep.json").read_text())
    assert ledger["executor"] == "local" and [t["name"] for t in ledger["tasks"]] == [
        "vit__cross_entropy__scratch__root=shapes",
        "vit__cross_entropy__scratch__root=later",
    ]
    assert f"data.root: folder '{tmp_path / 'later'}' does not exist" in (sweep / "local" / "task-1.log").read_text()
    status = run_here("status", str(sweep), module="utp_dist.submit")
    lines = status.stdout.splitlines()
    assert " | succeeded | 0 | 0 | 3 | " in lines[2] and " | failed | 0 | - | - | - | - | " in lines[3], status.stdout
    why = f"task 1 failed: data.root: folder '{tmp_path / 'later'}' does not exist; point it at an ImageFolder root with train/ and val/"
    assert lines[4:] == [why], status.stdout  # the task's own line; and where its output is, for a failure without one
    assert submit(["status", str(sweep), "--json"]) == 0
    failed = json.loads(capsys.readouterr().out)[1]
    assert failed["error"] == why.split(": ", 1)[1] and failed["log"] == str(sweep / "local" / "task-1.log")

    # the missing data appears; resubmit --failed runs only that task (debug executor: same ledger, in-process)
    make_image_folder(tmp_path / "later", per_class={"train": 8, "val": 4})
    again = run_cli("resubmit", str(sweep), "--failed", "--wait", "--poll", "1", module="utp_dist.submit", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "submitted 1 task(s)" in again.stdout
    status = run_here("status", str(sweep), module="utp_dist.submit").stdout.splitlines()
    assert " | succeeded | 1 | 0 | 3 | " in status[3]  # one restart: the resubmission
    board = run_here("leaderboard", str(sweep), module="utp_dist.submit")
    assert board.returncode == 0 and board.stdout.startswith("| rank | run | data.root | best val_acc@1 | epoch | test_acc@1 | state |")
    assert (sweep / "leaderboard.csv").read_text().splitlines()[0] == "rank,run,data.root,best val_acc@1,epoch,test_acc@1,state,logs"

    # the task records are lost (deleted, another disk): the runs' FINISHED markers still say both completed, and
    # resubmit trains neither again (no -v1)
    shutil.rmtree(sweep / "tasks")
    runner = int(json.loads((sweep / "sweep.json").read_text())["tasks"][1]["jobs"][-1].removeprefix("pid:"))
    wait_until(lambda: not Path(f"/proc/{runner}").exists())  # the runner may still be exiting after --wait returned
    assert submit(["status", str(sweep)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert " | succeeded | 0 | 0 | 3 | " in table[2] and " | succeeded | 0 | 0 | 3 | " in table[3], table
    assert submit(["resubmit", str(sweep), "--failed"]) == 0
    assert capsys.readouterr().out.startswith("nothing to resubmit")
    assert submit(["resubmit", str(sweep), "--tasks", "0,1"]) == 0
    out = capsys.readouterr().out
    assert out.count("this exact config already completed in ") == 2 and "nothing to resubmit" in out, out

    # the same grid again: both exact configs completed, so nothing is submitted
    skip = run_here(str(tiny_grid), "--executor", "debug", module="utp_dist.submit")
    assert skip.returncode == 0 and "nothing to submit" in skip.stdout and skip.stdout.count("skipped task") == 2

    # --force reruns them in this process (debug executor), each in a new run folder (-v1)
    forced = run_here(str(tiny_grid), "--executor", "debug", "--force", module="utp_dist.submit")
    assert forced.returncode == 0, forced.stderr[-3000:]
    rows = [line for line in forced.stdout.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")][-2:]
    assert all(" | succeeded | 0 | 0 | 3 | " in row for row in rows), forced.stdout
    assert {p.name for p in (tmp_path / "out" / "logs" / "later").iterdir()} | {
        p.name for p in (tmp_path / "out" / "logs" / "shapes").iterdir()
    } >= {"vit__cross_entropy__scratch__root=shapes-v1", "vit__cross_entropy__scratch__root=later-v1"}


def test_runs_of_a_grid_point_continued_elsewhere_or_by_an_agent_stay_that_point(tmp_path, capsys, monkeypatch):
    from utp_dist.config import from_dict
    from utp_dist.sweep import ledger
    from utp_dist.sweep.executors import DashboardExecutor
    from utp_dist.sweep.submit import main

    out = tmp_path / "out"
    grid = write_grid(tmp_path / "g.yaml", {"base": {"output": {"root": str(out)}}, "sweep": {"optim.lr": [0.1, 0.2]}})
    first, second = load_grid(grid).tasks
    # the first finished on an agent (checkpoint.resume: never); the second was continued from a path, with other workers
    changes = ((first, {"checkpoint": {"resume": "never"}}), (second, {"checkpoint": {"resume": str(out)}, "data": {"num_workers": 0}}))
    for task, change in changes:
        raw = task.config.to_dict()
        for section, values in change.items():
            raw[section].update(values)
        ran = from_dict(raw, "run")
        run = RunDir(out, "shapes", task.name)
        run.logs.mkdir(parents=True)
        run.config_file.write_text(ran.to_yaml())
        if task is first:
            run.summary_file.write_text(json.dumps({"config_hash": ran.fingerprint()}))  # what the trainer writes
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no Slurm client: --dry-run only plans
    assert main([str(grid), "--dry-run"]) == 0
    assert "2 run(s), 1 to submit" in capsys.readouterr().out  # the agent's run is this grid point, done
    assert ledger.find_run(str(out), second.name, second.config.fingerprint()) == RunDir(out, "shapes", second.name)

    # status counts a dashboard task's restarts as the dashboard does (its agents keep no task record)
    answer = {"7": {"state": "running", "restarts": 2, "attempts": 3}}
    monkeypatch.setattr(DashboardExecutor, "_call", lambda self, client, method, path, body=None: answer)
    executor = DashboardExecutor(load_resources(None, {}, "grid"))
    jobs = {0: "http://127.0.0.1:1/web/runs/7", 1: "http://127.0.0.1:1/web/runs/8"}
    assert executor.restarts(tmp_path, {"tasks": []}, jobs) == {0: 2, 1: 0}
    assert executor.states(tmp_path, {"tasks": []}, jobs) == {0: "running", 1: "lost"}
