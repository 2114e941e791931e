"""Shared fixtures: real image folders written to disk, tiny models saved with save_pretrained, subprocess runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# tests/run.sh spreads the test files over parallel pytest-xdist workers, one file per worker at a time (a file's
# module fixtures: servers, clusters, trained runs, are built once), handing files out in collection order. These
# files take the longest (each spends most of its time in real trainings, real Slurm and real agents): they start
# first, longest first as measured in a full run (docs/testing.md), so no worker is left with a long one at the end
# while the others idle (the CPU is busy throughout, so the end is where time is lost). The rest keep their order.
LONGEST_FIRST = (
    "test_agents.py",  # 373 s in the last measured run
    "test_slurm.py",  # 149 s, with test_search_slurm.py (121 s) on the same worker
    "test_search_slurm.py",
    "test_resume.py",  # 244 s
    "test_reliability.py",  # 165 s
    "test_search_agents.py",  # 132 s
    "test_api.py",  # 127 s
    "test_distributed.py",  # 111 s
    "test_train.py",  # 93 s
    "test_dashboard_browser.py",  # 68 s
    "test_docs.py",  # 68 s
    "test_search.py",  # 61 s
    "test_security_input.py",  # 51 s
    "test_grid.py",  # 38 s
    "test_dashboard_pages.py",  # 35 s
    "test_search_dashboard.py",  # 25 s
    "test_dashboard_security.py",  # 22 s
    "test_dashboard_api.py",  # 21 s
    "test_handshake.py",  # 19 s
)


# files that share one session fixture too costly to build twice run on one worker, one after the other
GROUPS = {"test_slurm.py": "slurm", "test_search_slurm.py": "slurm"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # sort is stable: the rest keep their order
    for item in items:  # a worker takes a file (a group) whole: its module fixtures are built once
        item.add_marker(pytest.mark.xdist_group(GROUPS.get(item.path.name, item.path.name)))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A private single-node Slurm with accounting and 2 fake GPUs, started once per session; the env that points
    clients at it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("utp_slurm_cluster", REPO / "slurm" / "cluster.py")
    cluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cluster)
    folder = tmp_path_factory.mktemp("slurm")
    env = cluster.start(folder, gpus=2)
    yield env
    cluster.stop(folder)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers share 2 cores: one thread per process (and per child, which inherits this) instead of each
    # spinning a pool over every core, which slows everything many times over
    os.environ["OMP_NUM_THREADS"] = "1"


def write_image(path: Path, rng: np.random.Generator, label: int, mode: str = "RGB", size: int = 20) -> None:
    """Write a learnable image: class `label` sets the brightness of one quadrant."""
    arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    q = size // 2
    r, c = divmod(label % 4, 2)
    arr[r * q : (r + 1) * q, c * q : (c + 1) * q] += np.uint8(150)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=None, seed: int = 0) -> Path:
    """An ImageFolder tree with train/val/test splits of small real PNG/JPEG files."""
    per_class = per_class or {"train": 24, "val": 8, "test": 6}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                write_image(root / split / name / f"{i:04d}.{ext}", rng, label)
    return root


@pytest.fixture
def image_root(tmp_path) -> Path:
    """A 3-class ImageFolder with train/val/test."""
    return make_image_folder(tmp_path / "shapes")


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, module: str = "utp_dist.train", **env_vars: str
) -> subprocess.CompletedProcess:
    """Run `python -m utp_dist.train ...` in a subprocess, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env_vars}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `predicate` until it holds; fail with the process's stderr if it ends first, or on the timeout."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port free on the loopback now (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, launcher: str = "torch.distributed.run") -> list[str]:
    """`torchrun --nproc_per_node N -m utp_dist.train ARGS` on a free loopback port (CPU: gloo); `launcher="utp_dist.launch"`
    for the torchrun that exits with the ranks' own code."""
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, "-m", launcher, "--nproc_per_node", str(nproc), *rendezvous, "-m", "utp_dist.train", *args]


def run_here(*args: str, module: str = "utp_dist.train", **env_vars: str) -> subprocess.CompletedProcess:
    """A command run in this process, as `run_cli` runs it in a child (same exit code, same stdout and stderr lines),
    without a child's seconds of importing torch. For what a process boundary does not change: one-line errors,
    resumes, files written, sweeps of the debug executor. Signals, locks held by other processes and DDP keep real
    children. Works in fixtures of any scope (no capsys)."""
    import contextlib
    import importlib
    import io
    import logging

    import torch

    from utp_dist.trainer import reset_accelerate

    out, err = io.StringIO(), io.StringIO()
    # the child's logging.basicConfig: INFO lines on stderr (pytest's own capture handler would swallow them)
    handler, root = logging.StreamHandler(err), logging.getLogger()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level, threads, saved_env = root.level, torch.get_num_threads(), {key: os.environ.get(key) for key in env_vars}
    os.environ.update(env_vars)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    torch.set_num_threads(1)  # as the children's OMP_NUM_THREADS=1: resumes compare bit-identical across both
    reset_accelerate()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if module == "utp_dist.train":
                from utp_dist import train_command

                code = train_command.run(list(args)).code
            else:
                code = importlib.import_module("utp_dist.sweep.submit" if module == "utp_dist.submit" else module).main(list(args))
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        torch.set_num_threads(threads)
        reset_accelerate()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide singletons: reset them so each in-process run configures its own."""
    from utp_dist.trainer import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()


def tiny_config(image_root: Path, out: Path, **sections) -> dict:
    """A raw config dict for a tiny ViT from scratch that trains in seconds on the test images."""
    raw = {
        "data": {"root": str(image_root), "batch_size": 8, "num_workers": 0, "image_size": 16, "augment": "none"},
        "model": {
            "flavour": "vit",
            "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 4},
        },
        "optim": {"lr": 3e-3},
        "train": {"epochs": 2, "log_every_n_steps": 2},
        "output": {"root": str(out)},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def save_tiny_vit(folder: Path, num_labels: int = 5) -> Path:
    """A tiny pretrained-style ViT (model + image processor) saved with save_pretrained, as a hub folder would be."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16, num_labels=num_labels
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.4, 0.4], image_std=[0.3, 0.3, 0.3]).save_pretrained(folder)
    return folder
