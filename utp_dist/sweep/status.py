"""Where each task of a sweep stands (Slurm accounting + the run's own files), and the leaderboard of its runs."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from utp_dist.errors import UserError
from utp_dist.sweep.ledger import find_run
from utp_dist.sweep.task import TaskRecord

# task states that `resubmit --failed` continues; COMPLETED, RUNNING and PENDING are left alone
RESUBMITTABLE = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "STOPPED", "LOST"}
COLUMNS = ("task", "run", "state", "restarts", "epoch", "step", "best", "img/s", "job")


def slurm_client(command: str = "sbatch") -> str:
    """Path of a Slurm client command, or a one-line error saying what to install."""
    path = shutil.which(command)
    if path is None:
        raise UserError(f"no Slurm client found ('{command}' is not on PATH); install slurm-client or use --executor local")
    return path


def sacct_states(job_ids: list[str], attempts: int = 5) -> dict[str, str]:
    """State of each job id (123 or 123_4) from Slurm accounting; retried, since sacct lags a few seconds."""
    if not job_ids:
        return {}
    slurm_client("sacct")
    states: dict[str, str] | None = None
    error = "timed out"
    for attempt in range(attempts):
        try:
            out = subprocess.run(
                ["sacct", "-n", "-X", "-P", "--format=JobID,State", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            out = None
        if out is not None and out.returncode == 0:
            states = _parse_sacct(out.stdout)
            if all(j in states for j in job_ids):
                break
        elif out is not None:
            error = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        time.sleep(min(2.0, 0.5 * (attempt + 1)))
    if states is None:
        raise UserError(f"sacct failed ({error}); job states come from Slurm accounting: slurmdbd must be running")
    return states


def _parse_sacct(text: str) -> dict[str, str]:
    """'123_4|COMPLETED' lines; a pending array shows as '123_[5-7%2]|PENDING' and is expanded."""
    states = {}
    for line in text.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        ranged = re.fullmatch(r"(\d+)_\[([^\]%]+)(%\d+)?\]", job)
        if not ranged:
            states[job] = state
            continue
        for part in ranged.group(2).split(","):
            lo, _, hi = part.partition("-")
            for index in range(int(lo), int(hi or lo) + 1):
                states[f"{ranged.group(1)}_{index}"] = state
    return states


def rows(folder: Path, ledger: dict) -> list[dict]:
    """One status row per task: state, restarts, epoch/step reached, best metric so far, img/s, job."""
    jobs = {t["index"]: t["jobs"][-1] for t in ledger["tasks"] if t["jobs"]}
    slurm = ledger["executor"] == "slurm"
    states = sacct_states(sorted(set(jobs.values()))) if slurm else {}
    out = []
    for task in ledger["tasks"]:
        record = TaskRecord(folder, task["index"]).read()
        job = jobs.get(task["index"])
        state = states.get(job, "SUBMITTED") if slurm and job else _local_state(record, job)
        submitted = max((sub["time"] for sub in ledger["submissions"] if str(task["index"]) in sub["tasks"]), default=0.0)
        progress = _progress(task, submitted)
        out.append(
            {
                "task": task["index"],
                "run": task["name"],
                "state": state,
                "restarts": max(0, record.get("attempts", 1) - 1),
                **progress,
                "job": job or "-",
            }
        )
    return out


def _local_state(record: dict, job: str | None) -> str:
    """State of a local/debug task from its own record; a RUNNING record whose process is gone is LOST."""
    if not job:
        return "NOT_SUBMITTED"
    if not record or record["state"] == "PENDING":
        return "PENDING" if _alive(job) else "LOST"
    if record["state"] == "RUNNING" and not _alive(str(record.get("pid"))):
        return "LOST"
    return record["state"]


def _alive(pid: str) -> bool:
    """Whether the process runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        number = int(pid.removeprefix("pid:"))
        os.kill(number, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{number}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


def _progress(task: dict, submitted: float) -> dict:
    """Epoch, step, best monitored value so far and train img/s, read from the run's metrics.jsonl and summary.json."""
    metric, mode = task["monitor"]
    found = find_run(task["output_root"], task["name"], task["config_hash"])
    result = {"epoch": None, "step": None, "best": None, "img/s": None, "test": None, "logs": None}
    if found is None:
        return result
    if found.summary_file.is_file() and found.summary_file.stat().st_mtime < submitted:
        return result  # a rerun that has not made its own run folder yet: the run finished before it is not its progress
    result["logs"] = str(found.logs)
    lines = found.read_metrics()
    val = [line for line in lines if line.get("split") == "val"]
    if val:
        values = [line[metric] for line in val if isinstance(line.get(metric), (int, float))]
        result.update(
            epoch=val[-1]["epoch"],
            step=val[-1]["step"],
            best=(max if mode == "max" else min)(values) if values else None,
            **{"img/s": val[-1].get("train_img_per_s")},
        )
    test = [line for line in lines if line.get("split") == "test"]
    if test:
        result["test"] = test[-1].get("test_acc@1")
    return result


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(table: list[dict], columns: tuple[str, ...]) -> str:
    """A Markdown table of `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def leaderboard(folder: Path, ledger: dict) -> tuple[str, str]:
    """(Markdown, CSV) of the runs ranked by their monitored metric; runs without an evaluation come last."""
    status = {row["task"]: row for row in rows(folder, ledger)}
    metric, mode = ledger["tasks"][0]["monitor"]
    swept = list(dict.fromkeys(k for t in ledger["tasks"] for k in t["swept"]))
    board = [
        {
            "run": t["name"],
            **{k: t["swept"].get(k) for k in swept},
            f"best {metric}": status[t["index"]]["best"],
            "epoch": status[t["index"]]["epoch"],
            "test_acc@1": status[t["index"]]["test"],
            "state": status[t["index"]]["state"],
            "logs": status[t["index"]]["logs"],
        }
        for t in ledger["tasks"]
    ]
    sign = -1 if mode == "max" else 1
    board.sort(key=lambda r: (r[f"best {metric}"] is None, sign * (r[f"best {metric}"] or 0)))
    for rank, row in enumerate(board, 1):
        row["rank"] = rank
    columns = ("rank", "run", *swept, f"best {metric}", "epoch", "test_acc@1", "state")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, "logs"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(board)
    return markdown(board, columns), buffer.getvalue()
