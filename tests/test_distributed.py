"""Real multi-process runs on CPU (gloo): torchrun, accelerate launch, two 'nodes' on localhost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, make_image_folder, tiny_config, torchrun
from safetensors.torch import load_file

from utp_dist.train_command import main

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _launch(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 21 val images: not a multiple of 2 ranks x eval batch 4, so the sampler pads and gather_for_metrics must drop it
    return make_image_folder(tmp_path_factory.mktemp("dist") / "shapes", per_class={"train": 24, "val": 7})


def _config(data: Path, out: Path, tmp_path: Path, batch: int) -> Path:
    raw = tiny_config(data, out, data={"batch_size": batch, "eval_batch_size": 4}, train={"epochs": 2})
    path = tmp_path / f"b{batch}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _only_run(out: Path) -> tuple[Path, Path]:
    (logs,) = (out / "logs" / "shapes").iterdir()
    (ckpt,) = (out / "checkpoints" / "shapes").iterdir()
    return logs, ckpt


def _val_lines(logs: Path) -> list[dict]:
    return [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines() if '"val"' in line]


def _accelerate_launch(config: Path) -> list[str]:
    """The ready-made 1-node config, asked for 2 processes, on a machine without GPUs (CPU processes over gloo)."""
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/1node_multi_gpu.yaml", "--num_processes", "2"]
    return [*head, "--main_process_port", str(free_port()), "-m", "utp_dist.train", str(config)]


def test_two_processes_under_accelerate_launch_equal_one_process_with_the_same_global_batch(data, tmp_path, fresh_accelerate):
    # torchrun itself starts the 2-process runs of test_resume.py (through utp_dist.launch) and test_api.py
    assert main([str(_config(data, tmp_path / "one", tmp_path, 8))]) == 0
    double = _launch(_accelerate_launch(_config(data, tmp_path / "two", tmp_path, 4)))
    assert double.returncode == 0, double.stderr[-3000:]

    logs1, ckpt1 = _only_run(tmp_path / "one")
    logs2, ckpt2 = _only_run(tmp_path / "two")  # rank 1 created no second run folder
    summary = json.loads((logs2 / "summary.json").read_text())
    assert (summary["world_size"], summary["distributed_type"], summary["backend"]) == (2, "MULTI_CPU", "gloo")
    assert summary["global_batch"] == 8 and summary["steps"] == json.loads((logs1 / "summary.json").read_text())["steps"]
    assert summary["final_val"]["val_images"] == 21 and len(list(logs2.glob("events.out.tfevents.*"))) == 1

    for one, two in zip(_val_lines(logs1), _val_lines(logs2), strict=True):
        assert two["val_images"] == 21  # padding from the distributed sampler is not counted
        for key, value in one.items():
            if key == "train_img_per_s":  # wall-clock speed, not a result
                continue
            assert two[key] == pytest.approx(value, abs=1e-4), key
    w1 = load_file(ckpt1 / "best" / "model.safetensors")
    w2 = load_file(ckpt2 / "best" / "model.safetensors")
    assert all((w1[k] - w2[k]).abs().max() < 1e-4 for k in w1)


def _two_nodes(config: Path, node_args: tuple[list[str], list[str]]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank, extra in enumerate(node_args):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node_rank",
            str(rank),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "-m",
            "utp_dist.train",
            str(config),
            *extra,
        ]
        procs.append(subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_nodes_on_localhost_form_one_run(data, tmp_path):
    procs = _two_nodes(_config(data, tmp_path / "out", tmp_path, 4), (["train.epochs=1"], ["train.epochs=1"]))
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    logs, _ = _only_run(tmp_path / "out")
    assert json.loads((logs / "summary.json").read_text())["world_size"] == 2


def test_ranks_with_different_configs_stop_with_a_clear_error(data, tmp_path):
    procs = _two_nodes(_config(data, tmp_path / "out", tmp_path, 4), (["optim.lr=0.001"], ["optim.lr=0.002"]))
    results = [p.communicate(timeout=90) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode != 0
        assert "rank 1 was given a different config than rank 0" in err
    assert not (tmp_path / "out").exists()


def test_per_device_batch_larger_than_a_shard_is_refused(data, tmp_path, capsys, fresh_accelerate):
    assert main([str(_config(data, tmp_path / "out", tmp_path, 80))]) == 2
    assert "data.batch_size: 80 x 1 processes is more than the 72 training images" in capsys.readouterr().err


def test_a_failure_on_rank_0_alone_ends_both_ranks_within_seconds_with_one_message(data, tmp_path):
    # rank 0 alone fails at its first evaluation, as a full disk fails the best-model export; rank 1 goes on into the
    # epoch end's collective, where it would wait for rank 0 until torch's timeout
    raw = tiny_config(data, tmp_path / "out", data={"batch_size": 4}, train={"epochs": 2, "callbacks": ["tests.hooks:FullDiskOnMain"]})
    config = tmp_path / "full.yaml"
    config.write_text(yaml.safe_dump(raw))
    failed_at = tmp_path / "failed_at"
    proc = subprocess.run(
        torchrun(str(config), launcher="utp_dist.launch"),
        env={**ENV, "UTP_TEST_FULL_DISK": str(failed_at)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ended = time.time() - float(failed_at.read_text())
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("utp_dist: error:")]
    assert errors == [
        f"utp_dist: error: no space left on device writing {tmp_path / 'best'}; free some space and run the same command again"
    ]
    assert "utp_dist: rank 1 stopped: rank 0 failed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ended < 15, f"the ranks ended {ended:.1f} s after the failure"
    print(f"both ranks ended {ended:.1f} s after rank 0 failed")
