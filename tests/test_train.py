"""End-to-end runs: real images, real models, TensorBoard's reader, transformers.pipeline on the export."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_image_folder, run_cli, run_here, save_tiny_vit, tiny_config, write_image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageClassification

from utp_dist.config import from_dict
from utp_dist.store.run_dir import RunDir, sanitize
from utp_dist.train_command import main


def _fit(raw: dict) -> dict:
    from utp_dist.trainer import Trainer

    return Trainer(from_dict(raw)).fit()


def _events(log_dir: Path) -> EventAccumulator:
    files = list(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def test_cli_run_writes_every_output(image_root, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image_root, tmp_path / "out")))
    proc = run_here(str(cfg), "train.eval_topk=[1,2]", "output.suffix=e2e", "train.peak_tflops=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]

    logs = tmp_path / "out" / "logs" / "shapes" / "vit__cross_entropy__scratch__e2e"
    ckpt = tmp_path / "out" / "checkpoints" / "shapes" / "vit__cross_entropy__scratch__e2e"
    saved = yaml.safe_load((logs / "config.yaml").read_text())
    assert saved["train"]["eval_topk"] == [1, 2] and saved["data"]["root"] == str(image_root)

    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [(line["split"], line["epoch"]) for line in lines] == [("val", 0), ("val", 1), ("test", 1)]
    for key in (
        "val_loss",
        "val_acc@1",
        "val_acc@2",
        "val_f1_macro",
        "val_map_macro",
        "val_auroc_macro",
        "val_kappa",
        "val_recall_micro",
        "val_recall_macro",
    ):
        assert 0 <= lines[0][key] <= (10 if key == "val_loss" else 1), key
    assert lines[0]["val_images"] == 24 and lines[2]["test_images"] == 18

    summary = json.loads((logs / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 2 * (72 // 8)
    position = json.loads((logs / "progress.json").read_text())  # rewritten at every log point, for dashboards and agents
    assert (position["epoch"], position["step"], position["total_steps"]) == (1, 18, 18)
    assert "epoch=2," in proc.stderr and "epoch=0," not in proc.stderr  # the bar counts epochs from 1, as the epoch lines do
    assert summary["best"]["value"] == max(line["val_acc@1"] for line in lines[:2])
    assert summary["train_img_per_s"] > 0 and summary["wall_time_s"] > 0
    # FLOPs are counted once on a meta-device twin; they must equal a count on the real model (eager attention: the
    # counter has no formula for the CPU's fused attention kernel, and would leave attention out)
    model = AutoModelForImageClassification.from_pretrained(ckpt / "best", attn_implementation="eager")
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.zeros(1, 3, 16, 16)).logits.sum().backward()
    assert summary["train_gflops_per_image"] * 1e9 == pytest.approx(counter.get_total_flops()) and counter.get_total_flops() > 0
    assert summary["mfu"] == pytest.approx(summary["train_img_per_s"] * counter.get_total_flops() / 0.5e12)
    assert 0 <= summary["data_wait_fraction"] < 1
    assert json.loads((ckpt / "_best_meta.json").read_text())["value"] == summary["best"]["value"]

    events = _events(logs)
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 2 and steps[-1] == summary["steps"]
    assert [e.step for e in events.Scalars("train/mfu")] == [e.step for e in events.Scalars("train/data_wait")] == steps
    assert all(0 <= e.value <= 1 for e in events.Scalars("train/data_wait"))
    assert [e.step for e in events.Scalars("val/acc@1")] == [9, 18]
    assert [e.step for e in events.Images("val/confusion_matrix")] == [9, 18]
    assert [e.step for e in events.Images("test/roc_micro")] == [18]
    text = events.Tensors("val/confusion_matrix/text_summary")[-1].tensor_proto.string_val[0].decode()
    counts = [int(v) for row in text.splitlines()[2:] for v in row.strip("|").split("|")[1:]]
    assert sum(counts) == 24  # every val image counted exactly once
    assert {p.name for p in (logs / "figures").iterdir()} >= {"confusion_matrix_val_epoch000.png", "roc_micro_test.png"}

    # one console line per evaluation, as Lightning and the HF Trainer print: the numbers are the logged ones
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2, proc.stdout
    best = max(line["val_acc@1"] for line in lines[:2])
    first = lines[0]
    assert epoch_lines[0].startswith(f"epoch 1/2, train_loss {events.Scalars('epoch/train_loss')[0].value:.4f}, ")
    assert (
        f"val_loss {first['val_loss']:.4f}, val_acc@1 {first['val_acc@1']:.4f}, best val_acc@1 {first['val_acc@1']:.4f} (epoch 1)"
        in epoch_lines[0]
    )
    assert f"best val_acc@1 {best:.4f}" in epoch_lines[1] and epoch_lines[1].endswith(" s")


def test_export_loads_in_pipeline_and_matches_training(image_root, tmp_path, fresh_accelerate):
    from transformers import pipeline

    summary = _fit(tiny_config(image_root, tmp_path / "out", train={"epochs": 3}))
    best = Path(summary["paths"]["best_model"])
    assert best.is_symlink() and (best / "model.safetensors").is_file()
    classifier = pipeline("image-classification", model=str(best), device="cpu")
    preds = classifier(str(next((image_root / "val" / "dog").iterdir())), top_k=3)
    assert {p["label"] for p in preds} == {"cat", "dog", "fox"}
    assert abs(sum(p["score"] for p in preds) - 1) < 1e-4
    # the pipeline's own preprocessing reproduces the accuracy measured during training
    files = sorted((image_root / "test").glob("*/*"))
    hits = sum(classifier(str(f), top_k=1)[0]["label"] == f.parent.name for f in files)
    assert hits / len(files) == pytest.approx(summary["test"]["test_acc@1"], abs=1.5 / len(files))


def test_pretrained_local_folder_replaces_head_and_freezes_backbone(image_root, tmp_path, fresh_accelerate):
    folder = save_tiny_vit(tmp_path / "tiny-vit", num_labels=5)
    before = load_file(folder / "model.safetensors")
    raw = tiny_config(
        image_root,
        tmp_path / "out",
        model={"flavour": str(folder), "pretrained": True, "freeze_backbone": True, "config": {}},
        data={"image_size": None},
    )
    summary = _fit(raw)
    assert summary["run_name"] == "tiny-vit__cross_entropy__pretrained"
    after = load_file(Path(summary["paths"]["best_model"]) / "model.safetensors")
    assert after["classifier.weight"].shape == (3, 32)  # 5-class head replaced by one for the 3 classes in the data
    frozen = [k for k in before if not k.startswith("classifier")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    config = json.loads((Path(summary["paths"]["best_model"]) / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
    processor = json.loads((Path(summary["paths"]["best_model"]) / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.4, 0.4, 0.4]  # the checkpoint's own processor is kept


def test_max_steps_and_accumulation_count_optimizer_steps(image_root, tmp_path, fresh_accelerate):
    raw = tiny_config(image_root, tmp_path / "out", optim={"grad_accum_steps": 2}, train={"epochs": 3, "max_steps": 7})
    summary = _fit(raw)
    assert summary["steps"] == 7 and summary["global_batch"] == 16
    # 72 images = 9 batches of 8 = 5 optimizer steps per epoch (the last one after a single batch): stops in epoch 1
    assert summary["last_epoch"] == 1
    logs = Path(summary["paths"]["logs"])
    assert [e.step for e in _events(logs).Scalars("train/lr")][-1] == 7
    assert [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()] == [5, 7, 7]


def test_bad_image_error_and_skip(image_root, tmp_path, fresh_accelerate, caplog):
    bad = image_root / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_root / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image_root, tmp_path / "out", train={"epochs": 1}, data={"num_workers": 2})))
    proc = run_here(str(cfg))  # the error comes out of a DataLoader worker, wrapped by torch
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("utp_dist: error: cannot decode image") and str(bad) in err[-1]
    assert "Traceback" not in proc.stderr

    # one batch of all 73 train files, so the last-partial-batch drop cannot hide the bad one
    summary = _fit(tiny_config(image_root, tmp_path / "out", train={"epochs": 1}, data={"on_bad_image": "skip", "batch_size": 73}))
    assert summary["skipped_images"] == {"train": 1, "val": 1, "test": 0}
    assert summary["final_val"]["val_images"] == 24  # the 25th val file was unreadable
    assert str(bad) in caplog.text


def test_asking_sdpa_of_a_model_without_attention_is_one_line(image_root, tmp_path, capsys, fresh_accelerate):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image_root, tmp_path / "out")))
    assert main([str(cfg), "model.flavour=resnet", "model.config={}", "model.attention=sdpa", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("utp_dist: error: model.attention: sdpa is not available for resnet") and err.endswith("use auto")
    assert "\n" not in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.root=/nonexistent/folder", "data.root: folder '/nonexistent/folder' does not exist"),
        ("optim.lrr=0.1", "did you mean 'optim.lr'"),
        ("data.batch_size=0", "data.batch_size must be > 0"),
        ("train.monitor_metric=val_acc@5", "train.monitor_metric 'val_acc@5' is never produced"),
        ("model.flavour=notamodel", "model.flavour: 'notamodel' is neither a local folder nor a known model type"),
        pytest.param(
            "data.decode=gpu",
            "data.decode: gpu decodes JPEGs with nvjpeg and needs CUDA; this run is on cpu: set data.decode: cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine data.decode=gpu is no error"),
        ),
        ("data.gpu_augment=[flip]", "data.gpu_augment: unknown op 'flip'; choose from random_resized_crop, horizontal_flip"),
        ("data.gpu_augment=[horizontal_flip]", "data.gpu_augment replaces the CPU augmentation: set data.augment: none"),
    ],
)
def test_user_errors_are_one_line(image_root, tmp_path, override, message, capsys, fresh_accelerate):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image_root, tmp_path / "out", data={"augment": "standard"})))
    assert main([str(cfg), override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("utp_dist: error: ") and message in err
    assert not (tmp_path / "out").exists()  # nothing was created for a run that never started


@pytest.mark.parametrize("args", [["--dry-run"], ["data.batch_transforms=[mixup,cutmix]"]])
def test_one_class_data_is_one_line_naming_the_split(tmp_path, args, capsys, fresh_accelerate):
    data = make_image_folder(tmp_path / "one", classes=("cat",), per_class={"train": 4, "val": 2})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "out")))
    assert main([str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"utp_dist: error: data.root: '{data / 'train'}' has one class folder ('cat'); a classifier needs at least two classes\n"
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_counts_after_caps(image_root, tmp_path, capsys, fresh_accelerate):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image_root, tmp_path / "out")))
    assert main([str(cfg), "--dry-run", "data.max_datapoints_per_class={train: 10, val: {cat: 2}}", "optim.grad_accum_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "train 30, val 18, test 18" in out
    assert "optimizer steps: 4 over 2 epochs" in out  # 30 images -> 3 batches of 8 -> 2 steps per epoch
    assert "3 classes: cat, dog, fox" in out
    assert not (tmp_path / "out").exists()


def test_bad_yaml_names_line(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("data:\n  root: x\n  batch_size: [1, 2\n")
    assert main([str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "line 4" in err


def _claim(args):
    root, queue = args
    queue.put(RunDir.create(root, "data", "same").name)


def test_run_folders_are_unique_under_races(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Manager().Queue()
    with ctx.Pool(4) as pool:
        pool.map(_claim, [(str(tmp_path), queue)] * 8)
    names = sorted(queue.get() for _ in range(8))
    assert names == sorted(["same"] + [f"same-v{i}" for i in range(1, 8)])
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "data").iterdir()) == names


def test_run_names_cannot_escape_the_output_root():
    assert sanitize("../../etc/passwd", "output.run_name") == "etc-passwd"
    assert "/" not in sanitize("google/vit-base", "k")
    with pytest.raises(Exception, match="output.run_name"):
        sanitize("../..", "output.run_name")


def test_quickstart_reaches_its_accuracy_bar(tmp_path):
    proc = run_cli(str(REPO / "configs" / "quickstart.yaml"), f"output.root={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("logs/fashion-mnist-mini/*/summary.json")).read_text())
    assert summary["best"]["value"] >= 0.78
    assert summary["test"]["test_acc@1"] >= 0.75


def test_grayscale_rgba_and_cmyk_train_together(tmp_path, fresh_accelerate):
    import numpy as np

    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("val", 4)):
        for label, name in enumerate(("a", "b")):
            for i, (mode, ext) in enumerate([("L", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("L", "jpg")] * (n // 4)):
                write_image(tmp_path / "mixed" / split / name / f"{i}.{ext}", rng, label, mode=mode, size=12 + i)
    summary = _fit(tiny_config(tmp_path / "mixed", tmp_path / "out", train={"epochs": 1}, data={"batch_size": 4}))
    assert summary["final_val"]["val_images"] == 8 and summary["test"] == {}


def test_epochs_have_their_own_order_and_skip_resumes_mid_epoch(image_root, tmp_path, fresh_accelerate):
    from utp_dist.trainer import Trainer

    trainer = Trainer(from_dict(tiny_config(image_root, tmp_path / "out", data={"augment": "standard"})))
    loader, sampler = trainer.loaders["train"], trainer.samplers["train"]

    def epoch(n: int, skip: int = 0) -> list[torch.Tensor]:
        loader.set_epoch(n)
        sampler.skip_once(skip)
        return [images for images, _ in loader]

    first, second = epoch(0), epoch(1)
    assert len(first) == len(second) == 9
    assert not all(a.equal(b) for a, b in zip(first, second, strict=True))  # a new shuffle (and augmentation) per epoch
    resumed = epoch(0, skip=2 * 8)  # two batches were trained before the stop
    assert len(resumed) == 7 and all(a.equal(b) for a, b in zip(first[2:], resumed, strict=True))
    assert all(a.equal(b) for a, b in zip(first, epoch(0), strict=True))  # the skip applied once only


def test_compile_failure_warns_once_and_trains_eager(caplog):
    from utp_dist.data.device_input import ModelInput
    from utp_dist.data.loaders import InputSpec
    from utp_dist.trainer import compiled

    class NoCompiler(torch.nn.Module):
        def forward(self, pixel_values):
            raise RuntimeError("no C compiler found")

    spec = InputSpec(size=(8, 8), resize=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    model = NoCompiler()
    assert compiled(model, ModelInput(spec), spec, batch_size=2) is model
    warnings = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert warnings == ["train.compile: torch.compile failed (RuntimeError: no C compiler found); training eager"]


def test_counted_flops_follow_frozen_parameters():
    from utp_dist.config import ModelConfig
    from utp_dist.flops import train_flops_per_image
    from utp_dist.model import build_model

    vit = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 4}
    full = train_flops_per_image(build_model(ModelConfig(flavour="vit", config=vit), ["a", "b"], 16)[0], (16, 16))
    probe = train_flops_per_image(build_model(ModelConfig(flavour="vit", config=vit, freeze_backbone=True), ["a", "b"], 16)[0], (16, 16))
    assert 0 < probe < full  # a linear probe does no backward through the backbone


def test_best_model_off_the_main_process_tracks_the_best_and_writes_nothing(tmp_path):
    from utp_dist.store.checkpoint import BestModel, Exports, NoExports

    run = RunDir(tmp_path, "data", "run")
    run.checkpoints.mkdir(parents=True)
    best = BestModel(run, "val_acc@1", "max", per_epoch=True, main=False)
    assert best.update(object(), object(), {"val_acc@1": 0.5}, epoch=0, step=10)  # the "model" is never touched
    assert not best.update(object(), object(), {"val_acc@1": 0.4}, epoch=1, step=20)
    assert best.best == {"metric": "val_acc@1", "mode": "max", "value": 0.5, "epoch": 0, "step": 10}
    assert best.state_dict() == {"best": best.best} and not list(run.checkpoints.iterdir())
    # the do-nothing side has every method of the writing side, so a new export cannot run on every rank unnoticed
    public = {cls: {name for name in vars(cls) if not name.startswith("_")} for cls in (Exports, NoExports)}
    assert public[Exports] - {"__init__"} == public[NoExports] and not issubclass(NoExports, Exports)


def test_a_log_point_agrees_the_checkpoint_flags_within_its_own_reduction(tmp_path):
    from utp_dist.config import CheckpointConfig, OptimConfig
    from utp_dist.preemption import Stopped, StopRequest
    from utp_dist.reporting import Reporter
    from utp_dist.store.checkpoint import Checkpointer
    from utp_dist.tracking import NullTracker
    from utp_dist.trainer import Progress

    class TwoRanks:  # what the loop asks of Accelerate, with the other rank's sums mirrored: every reduction counted
        device, num_processes, is_main_process, reductions = torch.device("cpu"), 2, True, []

        def reduce(self, tensor, op):
            self.reductions.append(op)
            return tensor * 2 if op == "sum" else tensor

    class Scalars(NullTracker):
        def log_scalars(self, values, step):
            self.values = values

    acc, stop, tracker = TwoRanks(), StopRequest(), Scalars()
    reporter = Reporter(acc, tracker, None, None, OptimConfig())
    checkpointer = Checkpointer(RunDir(tmp_path, "data", "run"), acc, CheckpointConfig(), stop, 5, None, None)
    checkpointer.progress = Progress(step=5)
    reporter.meter.add(torch.tensor([6.0, 2.0, 3.0, 0.0], dtype=torch.float64), step=5)
    agreed = reporter.log_train(5, 0, 0.1, riders=checkpointer.flags())
    checkpointer.maybe_save(agreed=agreed)
    assert acc.reductions == ["sum"] and agreed == [0.0, 0.0]
    assert tracker.values["train/loss"] == 12 / 6 and tracker.values["train/acc"] == 4 / 6 and reporter.meter.images == 6

    stop.signum = 15  # one rank was asked to stop: the sum says so to every rank, which saves and stops
    reporter.meter.add(torch.tensor([6.0, 2.0, 3.0, 0.0], dtype=torch.float64), step=10)
    checkpointer.progress.step, checkpointer.save = 10, lambda: None
    with pytest.raises(Stopped):
        checkpointer.maybe_save(agreed=reporter.log_train(10, 0, 0.1, riders=checkpointer.flags()))
    assert acc.reductions == ["sum", "sum"]
