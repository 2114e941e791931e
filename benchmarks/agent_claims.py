"""Claims per second and double claims when 8 agents race for the dashboard's queue, on SQLite and on PostgreSQL.

Run:
    python benchmarks/agent_claims.py [--jobs 1000] [--agents 8] [--databases sqlite,postgresql]

For each database it starts `python -m utp_dist.dashboard` as a real process (uvicorn; PostgreSQL is a throw-away
cluster from Debian's package, as in the tests), queues JOBS runs through the API, registers AGENTS agents, then
starts AGENTS processes that each call POST /api/v1/jobs/claim over HTTP as fast as they can until the queue is
empty. It prints the wall time from the first claim to the last, claims per second, how many jobs were handed out
twice (must be 0) and how many were never handed out (must be 0).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dashboard_support import Postgres, Server  # noqa: E402

from utp_dist.agent.client import Client  # noqa: E402


def race(url: str, token: str, agent_id: int, start_at: float, out) -> None:
    """One racing agent: claim until nothing is left; send back (job id, attempt) of every claim and the time of the last."""
    client = Client(url, token)
    time.sleep(max(0.0, start_at - time.time()))
    claimed = []
    while True:
        job = client.post("/api/v1/jobs/claim", {"agent_id": agent_id, "free_gpus": 0, "cpu": True})["job"]
        if job is None:
            break
        claimed.append((job["job_id"], job["attempt"]))
    out.put((claimed, time.time()))


def measure(name: str, db_url: str, folder: Path, jobs: int, agents: int) -> dict:
    """Queue `jobs`, race `agents` processes over them; the numbers."""
    server = Server([folder / "root"], db_url, folder / f"{name}.log").start()
    try:
        with server.client() as api:
            project = api.post("/api/v1/projects", json={"name": "bench"}).json()["id"]
            config = {"data": {"root": str(folder / "images")}, "output": {"root": str(folder / "root")}}
            config_id = api.post("/api/v1/configs", json={"project_id": project, "name": "bench", "config": config}).json()["id"]
            for _ in range(jobs):
                api.post(f"/api/v1/runs/from-config/{config_id}", json={})
            ids = [api.post("/api/v1/agents/register", json={"name": f"bench-{i}"}).json()["agent_id"] for i in range(agents)]
        out = multiprocessing.Queue()
        start_at = time.time() + 2.0  # every process imported and waiting: they start together
        procs = [multiprocessing.Process(target=race, args=(server.url, server.token, agent_id, start_at, out)) for agent_id in ids]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
    finally:
        server.stop()
    claims = [claim for claimed, _ in results for claim in claimed]
    seconds = max(end for _, end in results) - start_at
    per_job = collections.Counter(job for job, _ in claims)
    return {
        "database": name,
        "jobs": jobs,
        "agents": agents,
        "claims": len(claims),
        "seconds": seconds,
        "claims/s": len(claims) / seconds,
        "double claims": sum(n - 1 for n in per_job.values() if n > 1),
        "never claimed": jobs - len(per_job),
        "per agent": sorted(len(claimed) for claimed, _ in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    for name in args.databases.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"agent-claims-{name}-"))
        if name == "postgresql":
            postgres = Postgres().start()
            try:
                rows.append(measure(name, postgres.url, folder, args.jobs, args.agents))
            finally:
                postgres.stop()
        else:
            rows.append(measure(name, f"sqlite:///{folder / 'db.sqlite'}", folder, args.jobs, args.agents))
        print(rows[-1], flush=True)
    print("\n| database | jobs | agents | claims/s | double claims | never claimed | claims per agent |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['database']} | {r['jobs']:,} | {r['agents']} | {r['claims/s']:,.0f} | {r['double claims']} | {r['never claimed']} "
            f"| {min(r['per agent'])}-{max(r['per agent'])} |"
        )
    return 0 if all(r["double claims"] == 0 and r["never claimed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
