"""ASHA + TPE against the full grid of the same space, on the built-in data, both through `python -m utp_dist.submit`.

Run:
    python benchmarks/search_vs_grid.py [--out DIR] [--trials 12] [--max-epochs 9] [--parallel 1] [--cap 100]

The space is discrete (learning rate x weight decay), so the grid can walk all of it: the grid trains every point for
max-epochs (search method grid, no rungs); the search samples `--trials` points with TPE and trains them through ASHA
rungs (min 1 epoch, reduction 3). Printed: the best validation accuracy after max-epochs, the epochs trained in total,
and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SPACE = {"optim.lr": [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2], "optim.weight_decay": [0.0, 0.1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output root (default: a temporary folder)")
    parser.add_argument("--trials", type=int, default=12, help="the search's budget in trials")
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--parallel", type=int, default=1, help="trials training at once, for both")
    parser.add_argument("--cap", type=int, default=None, help="images per class in train and val (data.max_datapoints_per_class)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="search-vs-grid-"))
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    base["data"].update(num_workers=0, max_datapoints_per_class={"train": args.cap, "val": args.cap} if args.cap else None)
    base["output"]["root"] = str(out)
    base["checkpoint"] = {"keep_last": 1, "every_n_minutes": None}
    space = {key: {"choice": values} for key, values in SPACE.items()}
    grid_points = len(SPACE["optim.lr"]) * len(SPACE["optim.weight_decay"])
    runs = {
        "full grid": {"method": "grid", "trials": grid_points},
        f"ASHA + TPE ({args.trials} trials)": {
            "method": "tpe",
            "trials": args.trials,
            "asha": {"min_epochs": 1, "max_epochs": args.max_epochs, "reduction": 3},
        },
    }
    table = ["| | best val_acc@1 | epochs trained | wall time (s) | trials |", "|---|---|---|---|---|"]
    for number, (label, search) in enumerate(runs.items()):
        base["train"]["epochs"] = args.max_epochs
        path = out / f"search-{number}.yaml"
        block = {**search, "parallel": args.parallel, "space": space, "seed": 0, "metric": "val_acc@1", "mode": "max"}
        path.write_text(yaml.safe_dump({"name": f"bench{number}", "base": base, "search": block}))
        start = time.time()
        cmd = [sys.executable, "-m", "utp_dist.submit", str(path), "--executor", "local", "--wait", "--poll", "5"]
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        wall = time.time() - start
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        status = subprocess.run(
            [sys.executable, "-m", "utp_dist.submit", "status", str(out / "sweeps" / f"bench{number}"), "--json"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=True,
        )
        trials = json.loads(status.stdout)
        best = max(t["value"] for t in trials if t["state"] == "completed" and t["value"] is not None)  # at max-epochs
        epochs = sum(t["epochs"] for t in trials)
        table.append(f"| {label} | {best:.4f} | {epochs} | {wall:.0f} | {len(trials)} |")
        print(table[-1], flush=True)
    print(f"\nquickstart ResNet on builtin:fashion-mnist-mini, max {args.max_epochs} epochs, {args.parallel} at once, output {out}")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
