"""Training img/s of a 2-process gloo run, this checkout against a baseline commit, in interleaved rounds.

Run:
    python benchmarks/ddp_flag_sync.py --baseline f3bd7f1 [--rounds 3] [key=value overrides]

It measures what the stop/save-flag agreement costs: until f3bd7f1 every rank all-reduced its flags and read them on
the host after every optimizer step; now the ranks agree at log points, step saves and epoch ends only. Both trees
train the same config (a tiny ViT on the built-in Fashion-MNIST sample, 2 processes, gloo, one thread each) with
`torchrun --nproc_per_node 2 -m utp_dist.train`; train img/s comes from each run's summary.json. Rounds alternate
baseline, current, baseline, ... so machine noise hits both; the best round of each is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "data": {"root": "builtin:fashion-mnist-mini", "batch_size": 16, "num_workers": 0, "image_size": 16, "augment": "none"},
    "model": {
        "flavour": "vit",
        "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 4},
    },
    "train": {"epochs": 1, "log_every_n_steps": 10, "eval_topk": [1]},
    "checkpoint": {"every_epoch": False, "every_n_minutes": 30},
}


def train_img_per_s(tree: Path, config: Path, out: Path, overrides: list[str]) -> float:
    """One 2-process run of `tree`'s utp_dist; its summary's training img/s."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "utp_dist.train",
    ]
    proc = subprocess.run(
        [*cmd, str(config), *overrides, f"output.root={out}"], env=env, cwd=tree, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: training failed:\n{proc.stderr[-3000:]}")
    (summary,) = out.glob("logs/*/*/summary.json")
    return json.loads(summary.read_text())["train_img_per_s"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Interleave rounds of both trees and print each round, the best of each and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="commit to compare against, e.g. f3bd7f1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the benchmark config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="utp-ddp-sync-") as tmp:
        tmp = Path(tmp)
        baseline = tmp / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(baseline), args.baseline], check=True)
        try:
            config = tmp / "bench.yaml"
            config.write_text(yaml.safe_dump(CONFIG))
            best = {"baseline": 0.0, "current": 0.0}
            for round_ in range(args.rounds):
                for name, tree in (("baseline", baseline), ("current", REPO)):
                    value = train_img_per_s(tree, config, tmp / f"out-{name}-{round_}", args.overrides)
                    best[name] = max(best[name], value)
                    print(f"round {round_ + 1} {name:8s} {value:8.1f} img/s", flush=True)
            print(f"best of {args.rounds}: baseline {best['baseline']:.1f} img/s, current {best['current']:.1f} img/s, "
                  f"ratio current/baseline {best['current'] / best['baseline']:.3f}")  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)


if __name__ == "__main__":
    main()
