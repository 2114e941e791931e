"""How long `python -m utp_dist.dashboard` takes from process start until its port answers, with a root full of runs.

Run:
    python benchmarks/dashboard_start.py [--runs 1000] [--repeat 5]

It writes RUNS generated run folders into a temp output root (as benchmarks/dashboard_runs_list.py does), then starts
the server REPEAT times on it, each with a new SQLite database and again on the database the previous start left
(migrated, indexed), and measures from Popen until `GET /web/login` answers (any status: the port is open and the app
serves), and the CPU time the server's main thread used by then (what other jobs on a busy machine change least). Prints the medians.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from dashboard_runs_list import generate  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def login_page(port: int) -> int:
    """GET /web/login's status (OSError while the port is closed), by plain http.client: a new httpx client per try
    builds a TLS context first, which would be counted as the server's time."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/web/login")
        return connection.getresponse().status
    finally:
        connection.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process's main thread has used so far (Linux /proc): a figure that other jobs' load
    changes little, without the indexer's thread (which reads the roots meanwhile)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_answer(root: Path, db: Path) -> tuple[float, float]:
    """(wall seconds from Popen of the server until its login page answers, the server's CPU seconds by then)."""
    port = free_port()
    cmd = [sys.executable, "-m", "utp_dist.dashboard", "--port", str(port), "--root", str(root), "--index-interval", "3600"]
    cmd += ["--no-token", "--db", f"sqlite:///{db}"]  # a throw-away server on loopback
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                login_page(port)
                return time.perf_counter() - start, cpu_seconds(server.pid)
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"the dashboard exited with {server.returncode}") from None
                time.sleep(0.005)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="utp-dash-start-") as tmp:
        root = Path(tmp) / "experiments"
        generate(root, args.runs)
        new, again = [], []
        for i in range(args.repeat):
            db = Path(tmp) / f"dashboard-{i}.db"
            new.append(time_to_answer(root, db))
            again.append(time_to_answer(root, db))
    print(f"{args.runs} runs on disk; {args.repeat} starts each; load average {os.getloadavg()[0]:.1f}")
    for name, times in (("new database", new), ("existing database", again)):
        wall, cpu = zip(*times, strict=True)
        print(
            f"  {name:18s}: median {statistics.median(wall):.2f} s ({', '.join(f'{t:.2f}' for t in wall)}); main thread's CPU {statistics.median(cpu):.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
