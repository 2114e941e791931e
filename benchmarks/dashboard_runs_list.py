"""How fast the dashboard's runs list renders with 1,000 runs on disk, against re-reading every run folder per request.

Run:
    python benchmarks/dashboard_runs_list.py [--runs 1000] [--requests 20]

It writes RUNS generated run folders (config.yaml, metrics.jsonl with 5 evaluations, summary.json, FINISHED) into a
temp output root, starts `python -m utp_dist.dashboard` on it as a real process (uvicorn, SQLite), and measures over HTTP:
  * the cold index: the first pass over the root, at start, before the server answers (reads every folder once);
  * an incremental refresh with nothing changed, and with one run changed (only stat() per folder, one folder read);
  * GET /web/runs (50 rows, the default page) and GET /web/runs?size=1000 (every run in one page), median of REQUESTS;
and, as the baseline in the same run, what a runs list without the index costs per request: reading every folder
through RunDir (find_runs + read_config + read_summary + read_metrics). Prints the ratio baseline / page.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utp_dist.config import Config  # noqa: E402
from utp_dist.store.run_dir import FINISHED, RunDir, find_runs  # noqa: E402


def generate(root: Path, count: int) -> None:
    """COUNT finished run folders in the layout utp_dist.train writes (no weights: the list never reads them)."""
    config = Config().to_dict()
    for i in range(count):
        run = RunDir(root, f"data{i % 10}", f"resnet__cross_entropy__scratch__lr={i}")
        run.logs.mkdir(parents=True)
        run.checkpoints.mkdir(parents=True)
        config["output"]["run_name"] = run.name
        run.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        lines = [{"split": "val", "epoch": e, "step": 40 * (e + 1), "val_loss": 1.0 / (e + 1), "val_acc@1": 0.5 + e / 20} for e in range(5)]
        run.metrics_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
        summary = {"best": {"metric": "val_acc@1", "mode": "max", "value": 0.7, "epoch": 4, "step": 200}, "steps": 200, "last_epoch": 4}
        run.summary_file.write_text(json.dumps({**summary, "train_img_per_s": 1000.0 + i, "restarts": 0}))
        (run.checkpoints / FINISHED).write_text("done\n")


def read_everything(root: Path) -> int:
    """The baseline: what one runs-list request costs when it reads every run folder."""
    rows = 0
    for run in find_runs(root):
        run.read_config(), run.read_summary(), run.read_metrics()
        rows += 1
    return rows


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="utp-dash-bench-") as tmp:
        root = Path(tmp) / "experiments"
        generate(root, args.runs)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "utp_dist.dashboard", "--port", str(port), "--root", str(root), "--index-interval", "3600"]
        cmd += ["--no-token", "--db", f"sqlite:///{Path(tmp) / 'dashboard.db'}"]  # a throw-away server on loopback
        start = time.perf_counter()
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                while True:
                    try:
                        if client.get("/static/app.css").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.05)
                cold = time.perf_counter() - start
                assert client.get("/api/v1/runs", params={"limit": 1}).headers["x-total-count"] == str(args.runs)
                unchanged = timed(lambda: client.post("/api/v1/index/refresh").raise_for_status(), 5)
                one = next(find_runs(root))
                with open(one.metrics_file, "a") as fh:
                    fh.write(json.dumps({"split": "val", "epoch": 5, "step": 240, "val_acc@1": 0.8}) + "\n")
                changed = client.post("/api/v1/index/refresh").json()
                page50 = timed(lambda: client.get("/web/runs").raise_for_status(), args.requests)
                page_all = timed(lambda: client.get("/web/runs", params={"size": 1000}).raise_for_status(), args.requests)
                api = timed(lambda: client.get("/api/v1/runs", params={"limit": 500}).raise_for_status(), args.requests)
        finally:
            server.terminate()
            server.wait(timeout=30)
        baseline = timed(lambda: read_everything(root), 3)
    print(f"{args.runs} runs on disk; medians of {args.requests} requests (HTTP, real uvicorn + SQLite)")
    print(f"  start incl. cold index of every folder : {cold * 1000:8.0f} ms")
    print(f"  refresh, nothing changed               : {unchanged * 1000:8.1f} ms")
    print(f"  refresh, one run changed               : read {changed['runs_read']} folder(s)")
    print(f"  GET /web/runs (50 rows)                : {page50 * 1000:8.1f} ms")
    print(f"  GET /web/runs?size=1000 (every run)    : {page_all * 1000:8.1f} ms")
    print(f"  GET /api/v1/runs?limit=500             : {api * 1000:8.1f} ms")
    print(f"  baseline: read every folder per request: {baseline * 1000:8.1f} ms")
    print(f"  ratio baseline / page of 50            : {baseline / page50:8.1f}x")
    print(f"  ratio baseline / page of 1000          : {baseline / page_all:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
