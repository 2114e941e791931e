"""What a sweep is made of: fixed `set:` overrides, run names that show only what differs, Python experiments files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_image_folder, run_here, tiny_config
from test_hparams import read_hparams

from utp_dist.config import ConfigError
from utp_dist.sweep.grid import load_grid
from utp_dist.sweep.status import seed_groups


def _grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


def test_set_overrides_the_base_and_names_leave_out_fixed_and_single_valued_keys(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"flavour": "vit"}, "train": {"epochs": 3}}))
    grid = load_grid(
        _grid(
            tmp_path / "g.yaml",
            {
                "base": "base.yaml",
                "set": {"output.root": str(tmp_path / "out"), "train.max_steps": 10},
                "sweep": {"optim.lr": [0.1, 0.01], "train.seed": [7], "zip": [{"data.batch_size": [16], "optim.weight_decay": [0.0]}]},
            },
        )
    )
    assert [t.name for t in grid.tasks] == ["vit__cross_entropy__scratch__lr=0.1", "vit__cross_entropy__scratch__lr=0.01"]
    cfg = grid.tasks[0].config
    assert (cfg.train.max_steps, cfg.train.epochs, cfg.train.seed, cfg.data.batch_size) == (10, 3, 7, 16)
    assert cfg.output.root == str(tmp_path / "out")
    assert grid.tasks[0].swept == {"optim.lr": 0.1, "train.seed": 7, "data.batch_size": 16, "optim.weight_decay": 0.0}


@pytest.mark.parametrize(
    "fixed, message",
    [
        ([1], "set must be a mapping of dotted keys to values"),
        ({"train.max_stepz": 1}, "set: unknown key 'train.max_stepz'; did you mean 'train.max_steps'?"),
        ({"train.max_steps": 0}, "set: train.max_steps must be > 0"),
    ],
)
def test_bad_set_blocks_are_one_line_errors(tmp_path, fixed, message):
    path = _grid(tmp_path / "bad.yaml", {"set": fixed, "sweep": {"optim.lr": [1.0]}})
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


EXPERIMENTS = """
from utp_dist.config import from_dict

BASE = {base!r}
name = "py-exp"
training_configurations = [
    {{**BASE, "optim": {{"lr": lr}}}} for lr in (0.003, 0.001)
] + [from_dict({{**BASE, "optim": {{"lr": 0.003}}, "train": {{**BASE["train"], "seed": 1}}}})]
"""


def _experiments(tmp_path: Path) -> Path:
    base = tiny_config(make_image_folder(tmp_path / "shapes", per_class={"train": 8, "val": 4}), tmp_path / "out", train={"epochs": 1})
    path = tmp_path / "experiments.py"
    path.write_text(EXPERIMENTS.format(base=base))
    return path


def test_an_experiments_file_is_a_list_of_configs_named_by_what_differs(tmp_path):
    grid = load_grid(_experiments(tmp_path))
    assert grid.name == "py-exp"
    assert [t.name for t in grid.tasks] == [
        "vit__cross_entropy__scratch__lr=0.003_seed=42",
        "vit__cross_entropy__scratch__lr=0.001_seed=42",
        "vit__cross_entropy__scratch__lr=0.003_seed=1",
    ]
    assert grid.tasks[2].swept == {"optim.lr": 0.003, "train.seed": 1} and grid.tasks[2].config.train.seed == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("x = 1", "define training_configurations = [config, ...]"),
        ("training_configurations = [3]", "training_configurations[0] must be a config mapping or a Config, got int"),
        ("training_configurations = [{'optim': {'lrr': 1}}]", "training_configurations[0]: unknown key 'optim.lrr'"),
        ("raise RuntimeError('boom')", "running the experiments file failed: RuntimeError: boom"),
    ],
)
def test_bad_experiments_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "exp.py"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_submit_runs_an_experiments_file_on_the_executors(tmp_path):
    path = _experiments(tmp_path)
    dry = run_here(str(path), "--dry-run", module="utp_dist.submit")
    assert dry.returncode == 0, dry.stderr
    assert (tmp_path / "out" / "sweeps" / ".dry-run" / "py-exp" / "array.sbatch").is_file()  # what Slurm would get
    done = run_here(str(path), "--executor", "debug", module="utp_dist.submit")
    assert done.returncode == 0, done.stderr[-3000:]
    ledger = json.loads((tmp_path / "out" / "sweeps" / "py-exp" / "sweep.json").read_text())
    assert ledger["grid"]["experiments"] == str(path) and len(ledger["tasks"]) == 3
    status = run_here("status", str(tmp_path / "out" / "sweeps" / "py-exp"), module="utp_dist.submit").stdout.splitlines()
    assert len(status) == 5 and all(" | succeeded | " in line for line in status[2:]), status
    # TensorBoard's HParams dashboard compares the runs by what differs between them
    for task in ledger["tasks"]:
        values, metrics, ended, scalars = read_hparams(tmp_path / "out" / "logs" / "shapes" / task["name"])
        assert values == task["swept"] and ended and "val/acc@1" in metrics
        assert {"val/acc@1", "best/val_acc@1"} <= set(scalars)
    board = run_here("leaderboard", str(tmp_path / "out" / "sweeps" / "py-exp"), module="utp_dist.submit")
    assert board.returncode == 0, board.stderr
    groups = board.stdout.split("over seeds (train.seed), mean ± std:")[1]
    assert "| rank | optim.lr | seeds | best val_acc@1 | test_acc@1 |" in groups and "| 0.003 | 42, 1 | " in groups


def test_runs_differing_only_in_their_seed_are_grouped_with_mean_and_std():
    board = [
        {"optim.lr": 0.1, "train.seed": 1, "best": 0.5, "test": 0.4},
        {"optim.lr": 0.01, "train.seed": 1, "best": 0.9, "test": None},
        {"optim.lr": 0.1, "train.seed": 2, "best": 0.7, "test": 0.6},
        {"optim.lr": 0.01, "train.seed": 2, "best": None, "test": None},
    ]
    groups = seed_groups(board, ["optim.lr"], ("best", "test"), "max")
    assert [(g["rank"], g["keys"], g["seeds"]) for g in groups] == [(1, {"optim.lr": 0.01}, [1, 2]), (2, {"optim.lr": 0.1}, [1, 2])]
    assert groups[0]["best"] == {"mean": 0.9, "std": 0.0, "n": 1} and groups[0]["test"] == {"mean": None, "std": None, "n": 0}
    assert groups[1]["best"]["mean"] == pytest.approx(0.6) and groups[1]["best"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert groups[1]["test"]["n"] == 2 and groups[1]["test"]["mean"] == pytest.approx(0.5)
