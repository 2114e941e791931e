"""How fast the run table answers with 10,000 runs: sorted by a metric, filtered by a parameter, in the database.

Run:
    python benchmarks/runs_table.py [--runs 10000] [--requests 20]

It writes RUNS runs straight into a SQLite database at the newest schema (each with its ~60 config keys and 4 metrics
in run_values, as the indexer stores them), starts `python -m utp_dist.dashboard` on it as a real process (uvicorn,
an empty output root), and measures over HTTP, median of REQUESTS:
  * GET /api/v1/runs?sort=-val_acc@1&where=optim.lr < 0.003&limit=50          (a metric sort + a parameter filter)
  * the same with two parameter columns shown and an `and` of a parameter and a metric
  * the same as CSV of every matching run (format=csv&limit=10000)
It also starts the server on a root of START_RUNS run folders and measures how soon the port answers, against how
long the first pass over that root takes (the server indexes in the background).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sqlalchemy import insert  # noqa: E402

from utp_dist.config import Config, flatten  # noqa: E402
from utp_dist.dashboard import migrate, runtable  # noqa: E402
from utp_dist.dashboard.db import Database, Run, RunValue  # noqa: E402

QUERY = {"sort": "-val_acc@1", "where": "optim.lr < 0.003", "limit": 50}
WIDE = {"sort": "-val_acc@1", "where": "optim.lr < 0.003 and val_loss < 0.9", "columns": "optim.lr,train.seed", "limit": 50}


def fill(url: str, count: int) -> None:
    """COUNT finished runs with their config keys and metrics, written in bulk."""
    database = Database(url)
    migrate.upgrade(database.engine)
    base = flatten(Config().to_dict())
    rng = random.Random(0)
    with database.sessions() as session:
        runs, values = [], []
        for i in range(1, count + 1):
            acc = rng.random()
            runs.append({"id": i, "source": "disk", "state": "succeeded", "root": "/bench", "dataset": f"data{i % 10}", "name": f"run{i}"})
            runs[-1].update(best_metric="val_acc@1", best=acc, created=1.7e9 + i, updated=1.7e9 + i)
            config = {**base, "optim.lr": rng.choice([1e-4, 3e-4, 1e-3, 3e-3, 1e-2]), "train.seed": i % 5}
            metrics = {"val_acc@1": acc, "val_loss": rng.random() * 2, "test_acc@1": acc * 0.95, runtable.DURATION: 60.0 + i}
            for key, value in {**config, **metrics}.items():
                row = {"run_id": i, "key": key, **runtable.cell(value)}
                if row["num"] is not None or row["text"] is not None:
                    values.append(row)
        session.execute(insert(Run), runs)
        session.execute(insert(RunValue), values)
        session.commit()
    database.engine.dispose()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def serve(tmp: Path, root: Path, db: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "utp_dist.dashboard", "--port", str(port), "--root", str(root), "--index-interval", "3600"]
    cmd += ["--no-token", "--db", db]  # a throw-away server on loopback
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def wait_port(client: httpx.Client) -> None:
    while True:
        try:
            if client.get("/static/app.css").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--start-runs", type=int, default=1000, help="run folders for the start-up measurement (0: skip it)")
    args = parser.parse_args()
    from dashboard_runs_list import generate  # the 1,000-folder root of the runs-list benchmark

    with tempfile.TemporaryDirectory(prefix="utp-table-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "empty" / "logs").mkdir(parents=True)
        db = f"sqlite:///{tmp / 'table.db'}"
        start = time.perf_counter()
        fill(db, args.runs)
        filled = time.perf_counter() - start
        port = _free_port()
        server = serve(tmp, tmp / "empty", db, port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                wait_port(client)
                first = client.get("/api/v1/runs", params=QUERY)
                matching = int(first.headers["x-total-count"])
                assert first.status_code == 200 and len(first.json()) == 50, first.text
                values = [r["best"] for r in first.json()]
                assert values == sorted(values, reverse=True)
                sorted_filtered = timed(lambda: client.get("/api/v1/runs", params=QUERY).raise_for_status(), args.requests)
                wide = timed(lambda: client.get("/api/v1/runs", params=WIDE).raise_for_status(), args.requests)
                export = {**QUERY, "format": "csv", "limit": args.runs}
                as_csv = timed(lambda: client.get("/api/v1/runs", params=export).raise_for_status(), max(3, args.requests // 4))
                newest = timed(lambda: client.get("/api/v1/runs", params={"limit": 50}).raise_for_status(), args.requests)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(f"{args.runs} runs in SQLite (filled in {filled:.1f} s); medians of {args.requests} requests (HTTP, real uvicorn)")
        print(f"  newest first, 50 rows                                    : {newest * 1000:7.1f} ms")
        print(f"  sort=-val_acc@1 where='optim.lr < 0.003', 50 of {matching:5d}   : {sorted_filtered * 1000:7.1f} ms")
        print(f"  + 'and val_loss < 0.9', two parameter columns            : {wide * 1000:7.1f} ms")
        print(f"  CSV of all {matching} matching runs                        : {as_csv * 1000:7.1f} ms")
        if args.start_runs:
            root = tmp / "folders"
            generate(root, args.start_runs)
            port = _free_port()
            start = time.perf_counter()
            server = serve(tmp, root, f"sqlite:///{tmp / 'start.db'}", port)
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                    wait_port(client)
                    answered = time.perf_counter() - start
                    shown = client.get("/api/v1/runs", params={"limit": 1})
                    while client.get("/api/v1/index").json()["indexing"]:
                        time.sleep(0.05)
                    indexed = time.perf_counter() - start
                    status = client.get("/api/v1/index").json()
            finally:
                server.terminate()
                server.wait(timeout=30)
            print(f"start with {args.start_runs} run folders (cold database):")
            print(f"  first answer (port open)                                 : {answered * 1000:7.0f} ms")
            print(f"  first /api/v1/runs said X-Indexing={shown.headers['x-indexing']} with {shown.headers['x-total-count']} runs so far")
            print(
                f"  first pass done (every run listed)                       : {indexed * 1000:7.0f} ms (the pass: {status['first_pass_s']} s)"
            )
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
