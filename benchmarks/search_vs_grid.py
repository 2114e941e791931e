"""ASHA + TPE against the full grid of the same space, on the built-in data, both through `python -m utp_dist.submit`.

Run (each side one `submit --executor local --wait`; the figures of docs/search.md):
    nice -n 10 python benchmarks/search_vs_grid.py --seeds 0 1

The space is what a user searches for this model: optim.lr log-uniform over [--lr LOW HIGH] and optim.weight_decay
uniform over [--wd LOW HIGH]. The grid walks the same ranges, --grid-lr points evenly spaced in log(lr) and --grid-wd
points evenly spaced in wd (both ends included), every point trained for --max-epochs. The search samples --trials
points with TPE (--startup-trials random ones first) and trains them through ASHA rungs (--min-epochs, x --reduction,
up to --max-epochs). Both sides share train.seed (and the search its sampler seed) per --seeds value, run one trial at
a time, and are judged on what the user monitors: val_acc@1 after --max-epochs of the best trial. The epochs trained
are counted from the run folders (one validation per epoch trained, a retrained one counted again). Each side's
chosen point is then trained again with --retrain seeds that neither side tuned on (their mean is what a user gets
from the choice; the best of 18 grid points also holds the luckiest seed draw).

The data is the built-in Fashion-MNIST sample in full (2,500 train / 600 val images, 28x28); the model is the
quickstart ResNet, its widths scaled by --width (quickstart: 32) so that a grid point trains in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utp_dist.store.run_dir import find_runs  # noqa: E402 (after the repository is on the path)

METRIC = "val_acc@1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output root (default: a temporary folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed and search.seed; every one is reported")
    parser.add_argument("--lr", type=float, nargs=2, default=[1.0e-4, 3.0e-2], metavar=("LOW", "HIGH"), help="optim.lr, log-uniform")
    parser.add_argument("--wd", type=float, nargs=2, default=[0.0, 0.1], metavar=("LOW", "HIGH"), help="optim.weight_decay, uniform")
    parser.add_argument("--grid-lr", type=int, default=6, help="grid points over --lr (log-spaced)")
    parser.add_argument("--grid-wd", type=int, default=3, help="grid points over --wd (evenly spaced)")
    parser.add_argument("--trials", type=int, default=20, help="the search's budget in trials")
    parser.add_argument("--startup-trials", type=int, default=5, help="TPE's n_startup_trials: random draws before TPE models")
    parser.add_argument("--min-epochs", type=int, default=1, help="the first ASHA rung")
    parser.add_argument("--max-epochs", type=int, default=9, help="every grid point's epochs and the last ASHA rung")
    parser.add_argument("--reduction", type=int, default=3, help="ASHA keeps the top 1/reduction of each rung")
    parser.add_argument("--width", type=int, default=16, help="the ResNet's first width (stages: w, 2w, 4w)")
    parser.add_argument("--parallel", type=int, default=1, help="trials training at once, for both")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training (more oversubscribes a shared CPU)")
    parser.add_argument("--which", choices=("both", "grid", "search"), default="both", help="run only one side")
    parser.add_argument("--retrain", type=int, default=3, help="seeds each side's chosen point is trained again with")
    parser.add_argument("--cap", type=int, default=None, help="images per class in train and val (a quick smoke run only)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="search-vs-grid-"))
    out.mkdir(parents=True, exist_ok=True)

    base = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    base["data"].update(num_workers=0, max_datapoints_per_class={"train": args.cap, "val": args.cap} if args.cap else None)
    w = args.width
    base["model"]["config"].update(embedding_size=w, hidden_sizes=[w, 2 * w, 4 * w])
    base["output"]["root"] = str(out)
    base["checkpoint"] = {"keep_last": 1, "every_n_minutes": None}
    base["train"]["epochs"] = args.max_epochs
    grid = {
        "optim.lr": [float(f"{v:.3g}") for v in np.geomspace(args.lr[0], args.lr[1], args.grid_lr)],
        "optim.weight_decay": [float(f"{v:.3g}") for v in np.linspace(args.wd[0], args.wd[1], args.grid_wd)],
    }
    sides = {
        "grid": {"method": "grid", "space": {key: {"choice": values} for key, values in grid.items()}},
        "search": {
            "method": "tpe",
            "trials": args.trials,
            "sampler_options": {"n_startup_trials": args.startup_trials},
            "space": {"optim.lr": {"log_uniform": list(args.lr)}, "optim.weight_decay": {"uniform": list(args.wd)}},
            "asha": {"min_epochs": args.min_epochs, "max_epochs": args.max_epochs, "reduction": args.reduction},
        },
    }
    header = f"| seed | side | trials | TPE-modelled draws | best {METRIC} | its lr, wd | epochs trained | wall time (s) | its lr, wd retrained: mean (runs) |"
    table = [header, "|---|---|---|---|---|---|---|---|---|"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    for seed in args.seeds:
        for side, search in sides.items():
            if args.which not in ("both", side):
                continue
            base["train"]["seed"] = seed
            name = f"bench-{side}-s{seed}"
            wall = submit(out, name, base, {**search, "parallel": args.parallel, "seed": seed}, env)
            trials, epochs, best, (lr, wd), _ = measure(out, name, args.max_epochs)
            # The chosen point again with seeds neither side tuned on: what the user gets from the choice, without the
            # luck of the draw that made it the best of its side
            again = [100 * (seed + 1) + k for k in range(args.retrain)]
            submit(out, f"{name}-again", base, {**retrain_block(lr, wd, again), "parallel": args.parallel}, env)
            finals = measure(out, f"{name}-again", args.max_epochs)[-1]
            label = "full grid" if side == "grid" else f"ASHA + TPE ({args.reduction}x, rungs from {args.min_epochs})"
            drawn = "-" if side == "grid" else modelled(out / "sweeps" / name, args.startup_trials)
            table.append(
                f"| {seed} | {label} | {trials} | {drawn} | {best:.4f} | {lr:.2e}, {wd:.3f} | {epochs} | {wall:.0f} | "
                f"{np.mean(finals):.4f} ({', '.join(f'{v:.4f}' for v in finals)}) |"
            )
            print(table[-1], flush=True)
    print(
        f"\nbuiltin:fashion-mnist-mini in full{f' (capped at {args.cap}/class)' if args.cap else ''}, quickstart ResNet at width "
        f"{w}, max {args.max_epochs} epochs, {args.parallel} at once, {args.threads} thread(s); grid lr {grid['optim.lr']} x wd {grid['optim.weight_decay']}; "
        f"search {args.trials} trials, TPE n_startup_trials {args.startup_trials}, ASHA min {args.min_epochs} max {args.max_epochs} "
        f"reduction {args.reduction}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; output {out}"
    )
    print("\n".join(table))
    return 0


def submit(out: Path, name: str, base: dict, block: dict, env: dict) -> float:
    """Write the search file NAME.yaml and run it with `submit --executor local --wait`; its wall time in seconds."""
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "search": {**block, "metric": METRIC, "mode": "max"}}, sort_keys=False))
    start = time.time()
    cmd = [sys.executable, "-m", "utp_dist.submit", str(path), "--executor", "local", "--wait", "--poll", "5"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}: submit exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.time() - start


def retrain_block(lr: float, wd: float, seeds: list[int]) -> dict:
    """A grid of one (lr, wd) point over training seeds."""
    space = {"optim.lr": [lr], "optim.weight_decay": [wd], "train.seed": seeds}
    return {"method": "grid", "seed": 0, "space": {key: {"choice": values} for key, values in space.items()}}


def measure(out: Path, sweep: str, max_epochs: int) -> tuple[int, int, float, tuple[float, float], list[float]]:
    """From the trials' run folders: how many trials, the epochs trained in all (validations), the best trial's
    METRIC after max_epochs with its (lr, weight decay), and every trial's METRIC after max_epochs."""
    runs = [run for run in find_runs(out) if run.name.startswith(f"{sweep}__trial-")]
    epochs, best, params, finals = 0, float("-inf"), (float("nan"), float("nan")), []
    for run in runs:
        lines = [m for m in run.read_metrics() if m.get("split") == "val"]
        epochs += len(lines)
        final = [m[METRIC] for m in lines if m.get("epoch") == max_epochs - 1]
        finals += final[-1:]
        if final and final[-1] > best:
            optim = (run.read_config() or {}).get("optim", {})
            best, params = final[-1], (optim.get("lr"), optim.get("weight_decay"))
    return len(runs), epochs, best, params, finals


def modelled(folder: Path, startup: int) -> int:
    """How many of the search's draws TPE made from its model: those that knew `startup` trials with a result (a rung
    value or an end), as the study records for each draw."""
    import optuna

    trials = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}").get_trials(deepcopy=False)
    return sum(1 for t in trials if t.user_attrs.get("drawn_from_trials", 0) >= startup)


if __name__ == "__main__":
    sys.exit(main())
