"""The Python API and the extension points: Config from dicts, train(cfg), registries, built-in losses, MixUp/CutMix, and a
user's module (loss, dataset, model, metric, callback) under 2-process DDP with exact resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, free_port, make_image_folder, run_here, tiny_config, wait_for
from safetensors.torch import load_file
from test_resume import ENV, _assert_same_run, _config, _scalars, _start, _states, _workers

from utp_dist import Config, ConfigError, register_callback, register_loss, train
from utp_dist.callbacks import Callbacks
from utp_dist.config import DataConfig, TrainConfig, load_config
from utp_dist.data.batch_transforms import build_batch_transform
from utp_dist.data.loaders import IGNORE_LABEL, DataError, Splits
from utp_dist.data.user_datasets import build_splits
from utp_dist.losses import build_loss, cross_entropy, focal, soft_cross_entropy
from utp_dist.preemption import EXIT_RESUMABLE
from utp_dist.registry import DATASETS, LOSSES
from utp_dist.store.resume import ResumeError, check, identity
from utp_dist.train_command import main

API_SCRIPT = """
import json, sys
from utp_dist import Config, train

summary = train(Config.from_yaml(sys.argv[1], overrides=sys.argv[2:]))
print("SUMMARY", json.dumps(summary["best"]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("api") / "shapes", per_class={"train": 24, "val": 7, "test": 4})


def _api_run(tmp_path: Path, *args: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    """A user's script that calls train(Config.from_yaml(CONFIG, overrides)), started by `launcher`."""
    (tmp_path / "script.py").write_text(API_SCRIPT)
    proc = subprocess.run(
        [*launcher, str(tmp_path / "script.py"), *args], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(out: Path) -> dict[str, torch.Tensor]:
    (ckpt,) = (out / "checkpoints" / "shapes").iterdir()
    return load_file(ckpt / "best" / "model.safetensors")


# --- the Python API --------------------------------------------------------------------------------------------------


def test_config_sections_as_dicts_are_validated_like_yaml(tmp_path):
    raw = {"data": {"batch_size": 4, "batch_transforms": ["mixup"]}, "optim": {"lr": "3e-4"}, "train": {"loss": "focal"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert Config(**raw) == Config.from_yaml(tmp_path / "c.yaml") == load_config(None, ["data.batch_size=4", "optim.lr=3e-4"] + [
        "data.batch_transforms=[mixup]", "train.loss=focal"
    ])  # fmt: skip
    assert Config(data=DataConfig(batch_size=4)).data.batch_size == 4  # sections as dataclasses still work
    for bad, expect in [
        ({"optim": {"lrr": 1}}, "unknown key 'optim.lrr'; did you mean 'optim.lr'? valid keys: optim.name, optim.lr"),
        ({"optimizer": {}}, "unknown key 'optimizer'; did you mean 'optim'? valid keys: data, model, optim, train, output, checkpoint"),
        ({"data": {"batch_size": "big"}}, "data.batch_size must be int; got 'big' (string)"),
        ({"train": {"monitor_metric": "val_nope"}}, "train.monitor_metric 'val_nope' is never produced"),
        ({"data": {"batch_transform_options": {"cutmix": {}}}}, "data.batch_transform_options.cutmix: 'cutmix' is not configured"),
    ]:
        with pytest.raises(ConfigError) as err:
            Config(**bad)
        assert str(err.value).startswith(expect) and "\n" not in str(err.value)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=f"^{tmp_path / 'bad.yaml'}: ") as from_yaml:
            Config.from_yaml(tmp_path / "bad.yaml")
        assert str(from_yaml.value).endswith(str(err.value))  # the same line, with the file in front
    late = Config()
    late.optim.lr = -1.0
    with pytest.raises(ConfigError, match="^config: optim.lr must be > 0"):
        train(late)  # checked again before anything is built
    with pytest.raises(TypeError, match="train\\(\\) takes a Config, got dict; build one with Config"):
        train(raw)


def test_python_api_run_equals_the_cli_run(data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "cli", train={"epochs": 1}, data={"batch_transforms": ["cutmix"]})))
    cli = run_here(str(config), OMP_NUM_THREADS="1")
    assert cli.returncode == 0, cli.stderr[-3000:]
    api = _api_run(tmp_path, str(config), f"output.root={tmp_path / 'api'}")
    assert json.loads(api.stdout.split("SUMMARY ")[1])["metric"] == "val_acc@1"
    a, b = _weights(tmp_path / "cli"), _weights(tmp_path / "api")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- registries --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("train.loss=hinge", "train.loss: unknown loss 'hinge'; registered: cross_entropy, focal, soft_cross_entropy (or an import"),
        ("model.builder=timm", "model.builder: unknown model builder 'timm'; registered: transformers (or an import path"),
        ("data.dataset=csv", "data.dataset: unknown dataset 'csv'; registered: image_folder (or an import path module:attr)"),
        ("data.batch_transforms=[mixpu]", "data.batch_transforms: unknown batch transform 'mixpu'; registered: cutmix, mixup (or"),
        ("train.metrics=[ece]", "train.metrics: unknown metric 'ece'; registered: calibration_error, precision_macro (or an"),
        ("train.callbacks=[timer]", "train.callbacks: unknown callback 'timer'; registered: none (or an import path module:attr)"),
        ("train.loss=no_such_module:fn", "train.loss: cannot import 'no_such_module'"),
        ("train.loss_options.gamma=2", "train.loss_options: cross_entropy: got an unexpected keyword argument 'gamma'"),
        ("data.batch_transforms=[mixup] data.batch_transform_options.mixup.beta=1", "data.batch_transform_options: MixUp: got an"),
        ("train.loss=test_api:NOT_CALLABLE", "train.loss: 'test_api:NOT_CALLABLE' is a value of type float, not a function or class"),
        (
            "train.metrics=[test_api:NOT_CALLABLE]",
            "train.metrics: 'test_api:NOT_CALLABLE' is a value of type float, not a function or class",
        ),
        (
            "train.metrics=[test_api:not_a_metric]",
            "train.metrics: 'test_api:not_a_metric' returned a value of type int; a metric factory returns",
        ),
        (
            "train.callbacks=[test_api:NOT_CALLABLE]",
            "train.callbacks: 'test_api:NOT_CALLABLE' is a value of type float, not a function or class",
        ),
    ],
)
def test_unknown_names_and_options_are_one_line_listing_the_registered_ones(data, tmp_path, capsys, fresh_accelerate, override, expect):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "out")))
    assert main([str(config), *override.split(" ")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"utp_dist: error: {expect}") and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # found before anything was written


NOT_CALLABLE = 0.5  # named by import paths in the tests above and below


def vector_loss(logits, targets):
    return F.cross_entropy(logits, targets if targets.ndim == 1 else targets.argmax(-1), reduction="none")


def not_a_metric(num_classes):
    return num_classes


def float_loss(logits, targets):
    return 1.0


def nan_loss(logits, targets):
    return cross_entropy(logits, targets) * float("nan")


@pytest.mark.parametrize(
    ("loss", "expect"),
    [
        ("vector_loss", "train.loss: 'test_api:vector_loss' returned a tensor of shape (8,); a loss returns one number as a 0-dim"),
        ("float_loss", "train.loss: 'test_api:float_loss' returned a value of type float; a loss returns one number"),
        ("nan_loss", "the training loss is not finite (NaN or inf) at step 1, before any weight update: train.loss 'test_api:nan_loss'"),
    ],
)
def test_a_loss_that_is_not_one_finite_number_is_one_line_naming_train_loss(data, tmp_path, capsys, fresh_accelerate, loss, expect):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "out", train={"loss": f"test_api:{loss}"})))
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar's line, then the error
    assert err[-1].startswith(f"utp_dist: error: {expect}") and "Traceback" not in err, err


def test_cli_prints_an_unknown_loss_as_one_line(data, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "out", train={"loss": "hinge"})))
    capsys.readouterr()
    assert main([str(config), "--dry-run"]) == 2  # in process: the train command's exit code and line are checked end to end elsewhere
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0, err
    assert "registered: cross_entropy, focal, soft_cross_entropy" in err


def test_register_adds_a_name_and_refuses_to_replace_another():
    @register_loss("test_api_double")
    def double(logits, targets):
        return 2 * cross_entropy(logits, targets)

    assert LOSSES.get("test_api_double") is double
    assert register_loss("test_api_double")(double) is double  # the same definition again: a re-imported module
    with pytest.raises(ValueError, match="'focal' is already registered"):
        register_loss("focal")(double)
    assert build_loss(TrainConfig(loss="test_api_double")).func is double

    @register_callback("test_api_everywhere")
    class Everywhere:
        ranks = "all"

    (callback,) = Callbacks(["test_api_everywhere"], main_process=False).callbacks  # by name, on a non-main rank too
    assert isinstance(callback, Everywhere)


def test_a_users_splits_are_checked_and_capped_like_the_image_folder_index(tmp_path):
    files = {split: [(str(tmp_path / f"{split}{i}.png"), i % 2) for i in range(10)] for split in ("train", "val")}
    returned = {}
    DATASETS.register("test_api_splits", lambda cfg, seed: returned["splits"])
    cfg = DataConfig(dataset="test_api_splits", max_datapoints_per_class={"train": 3, "val": {"b": 1}})
    returned["splits"] = Splits(tmp_path, ["a", "b"], files)
    capped = build_splits(cfg, seed=1)
    per_class = {split: [sum(y == c for _, y in capped.samples[split]) for c in (0, 1)] for split in ("train", "val")}
    assert per_class == {"train": [3, 3], "val": [5, 1]} and capped.samples == build_splits(cfg, seed=1).samples
    for splits, expect in [
        (files, "returned dict; return utp_dist.data.loaders.Splits(root, classes, samples)"),
        (Splits(tmp_path, ["a", "b"], {"train": files["train"]}), "returned no val images; train and val are required"),
        (Splits(tmp_path, ["a", "b"], {**files, "extra": files["val"]}), "returned a split 'extra'; splits are train, val, test"),
        (Splits(tmp_path, ["a"], files), "train has label 1; labels index the 1 classes (0 to 0)"),
        (Splits(tmp_path / "sub", ["a", "b"], files), f"'{tmp_path}/train0.png' is not under Splits.root"),
        (Splits(tmp_path, ["a"], {s: [(f, 0) for f, _ in v] for s, v in files.items()}), "returned one class ('a'); a classifier needs"),
    ]:
        returned["splits"] = splits
        with pytest.raises(DataError, match=f"^data.dataset: test_api_splits.*{re.escape(expect)}"):
            build_splits(cfg, seed=1)


# --- built-in losses and batch transforms ----------------------------------------------------------------------------


def test_builtin_losses_agree_with_torch():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 3, 1, IGNORE_LABEL, 2, 2])
    keep = labels != IGNORE_LABEL
    one_hot = F.one_hot(labels.clamp(min=0), 4).float() * keep.unsqueeze(-1)
    for ls in (0.0, 0.1):
        expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, label_smoothing=ls)
        assert torch.equal(cross_entropy(logits, labels, ls), expected)
        for loss in (soft_cross_entropy(logits, one_hot, ls), cross_entropy(logits, one_hot, ls), focal(logits, labels, 0.0, ls)):
            torch.testing.assert_close(loss, expected)
    p = logits.softmax(-1)[keep, labels[keep]]
    torch.testing.assert_close(focal(logits, labels, gamma=2.0), (-((1 - p) ** 2) * p.log()).mean())
    assert build_loss(TrainConfig(loss="focal", loss_options={"gamma": 3.0}, label_smoothing=0.1)).keywords == {
        "gamma": 3.0,
        "label_smoothing": 0.1,
    }


def test_batch_transforms_are_seeded_by_their_key_and_ignore_skipped_images():
    cfg = DataConfig(batch_transforms=["mixup", "cutmix"], batch_transform_options={"mixup": {"alpha": 0.4}})
    transform = build_batch_transform(cfg, num_classes=3, seed=7, rank=0)
    images, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, IGNORE_LABEL, 1, 2, 0])
    state = torch.get_rng_state()
    a, b = transform(images, labels, (1, 5)), transform(images, labels, (1, 5))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {tuple(transform(images, labels, (1, i))[1][1].tolist()) for i in range(8)}
    assert len(draws) > 4  # other micro-batches draw other mixes
    mass = a[1].sum(-1)
    assert a[1].shape == (8, 3) and torch.all(mass <= 1 + 1e-6) and mass[4] < 1 and mass[5] < 1  # skipped image's share dropped
    assert build_batch_transform(DataConfig(), 3, 7, 0)(images, labels, (0, 0))[1] is labels


# --- resume with MixUp/CutMix, and a user's module under DDP ---------------------------------------------------------


def _stop_and_resume(config: Path, cut: Path, command: list[str], rank_of: int | None = None) -> None:
    """Start `command`, SIGTERM it once a state is saved (one rank of a torchrun), then run it again to the end."""
    proc = _start(command, slow_save=0.3)
    ckpt_parent = cut / "checkpoints" / "shapes"
    wait_for(lambda: ckpt_parent.exists() and any(_states(p) for p in ckpt_parent.iterdir()), proc)
    target = proc if rank_of is None else sorted(_workers(proc, rank_of), key=lambda p: p.environ().get("RANK", ""))[0]
    target.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert f"exit {EXIT_RESUMABLE} = stopped to be resumed" in err, err[-3000:]
    if rank_of is None:  # one process: the resume needs no process of its own
        final = run_here(*command[3:])
    else:
        final = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]


def test_mixup_and_cutmix_resume_bit_identical(data, tmp_path):
    sections = {"data": {"batch_transforms": ["mixup", "cutmix"], "batch_transform_options": {"cutmix": {"alpha": 0.5}}}}
    reference = run_here(str(_config(data, tmp_path / "ref", **sections)), OMP_NUM_THREADS="1")
    assert reference.returncode == 0, reference.stderr[-3000:]
    config = _config(data, tmp_path / "cut", **sections)
    _stop_and_resume(config, tmp_path / "cut", [sys.executable, "-m", "utp_dist.train", str(config)])
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")


USER_MODULE = '''
"""A user's extensions: splits listed in a CSV file, a weighted loss, a model builder, a metric and a callback."""

import csv
import os
from pathlib import Path

import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from utp_dist.data.loaders import Splits
from utp_dist.model import build_model


def csv_splits(cfg, seed):
    root = Path(cfg.root)
    with open(root / "labels.csv") as fh:
        rows = list(csv.reader(fh))
    classes = sorted({label for _, _, label in rows})
    samples = {}
    for split, path, label in rows:
        samples.setdefault(split, []).append((str(root / path), classes.index(label)))
    return Splits(root, classes, samples)


def weighted_ce(logits, targets, weight=1.0):
    return weight * F.cross_entropy(logits, targets, ignore_index=-100)


def tagged_vit(cfg, classes, image_size):
    model, processor = build_model(cfg, classes, image_size)
    model.config.built_by = "user_module"
    return model, processor


def balanced_accuracy(num_classes):
    return MulticlassAccuracy(num_classes=num_classes, average="macro")


class RankMarker:
    ranks = "all"

    def on_fit_start(self, step):
        Path(os.environ["MARKERS"], f"rank{os.environ['RANK']}-step{step}").touch()
'''


def test_user_module_trains_under_two_process_ddp_and_resumes_bit_identical(data, tmp_path, monkeypatch):
    (tmp_path / "user_ext.py").write_text(textwrap.dedent(USER_MODULE))
    rows = [f"{split},{p.relative_to(data)},{p.parent.name}" for split in ("train", "val") for p in sorted((data / split).rglob("*.*"))]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    sections = {
        "data": {"dataset": "user_ext:csv_splits", "batch_size": 4, "max_datapoints_per_class": {"train": 20, "val": 5}},
        "model": {"builder": "user_ext:tagged_vit"},
        "train": {
            "loss": "user_ext:weighted_ce",
            "loss_options": {"weight": 0.5},
            "metrics": ["user_ext:balanced_accuracy"],
            "monitor_metric": "val_balanced_accuracy",
            "callbacks": ["tests.hooks:SlowSave", "user_ext:RankMarker"],
        },
    }
    (tmp_path / "markers").mkdir()
    monkeypatch.setitem(ENV, "PYTHONPATH", f"{REPO}:{tmp_path}")  # the user's module, as a user puts it on the path
    monkeypatch.setitem(ENV, "MARKERS", str(tmp_path / "markers"))

    def torchrun(*args: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), *args]

    # the reference run through the Python API, each rank calling train(cfg); the stopped one through the CLI
    _api_run(tmp_path, str(_config(data, tmp_path / "ref", **sections)), launcher=tuple(torchrun()))
    config = _config(data, tmp_path / "cut", **sections)
    _stop_and_resume(config, tmp_path / "cut", torchrun("-m", "utp_dist.train", str(config)), rank_of=2)
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")

    (logs,) = (tmp_path / "cut" / "logs" / "shapes").iterdir()
    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if "val_balanced_accuracy" in line]
    assert val and all(line["val_images"] == 15 for line in val)  # the val cap applied to the user's splits
    assert _scalars(logs, "train/loss")[0][1] < 0.8  # half of ln(3) at the start: the user's loss with its option
    (ckpt,) = (tmp_path / "cut" / "checkpoints" / "shapes").iterdir()
    assert json.loads((ckpt / "best" / "config.json").read_text())["built_by"] == "user_module"
    markers = {p.name for p in (tmp_path / "markers").iterdir()}  # rankR-stepS: every segment starts on both ranks
    resumed_at = {int(m.split("step")[1]) for m in markers} - {0}
    assert len(resumed_at) == 1 and markers == {f"rank{r}-step{s}" for r in (0, 1) for s in (0, *resumed_at)}


def test_a_state_from_before_the_new_keys_resumes_while_they_keep_their_defaults():
    current = identity(Config(), "hash", 72, 8)
    saved = {**current, "config": {k: v for k, v in current["config"].items() if k not in ("data.dataset", "train.loss_options")}}
    assert check(Path("state"), saved, current, allow_changes=False, mid_epoch=False) == []
    changed = identity(Config(data={"dataset": "my_pkg:splits"}), "hash", 72, 8)
    with pytest.raises(ResumeError, match="data.dataset: 'image_folder' -> 'my_pkg:splits'"):
        check(Path("state"), saved, changed, allow_changes=False, mid_epoch=False)
