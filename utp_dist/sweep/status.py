"""Where each task of a sweep stands (its executor's job states + the run's own files), and the leaderboard of its runs."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from utp_dist.sweep import executors, states
from utp_dist.sweep.ledger import find_run
from utp_dist.sweep.task import TaskRecord

COLUMNS = ("task", "run", "state", "restarts", "epoch", "step", "best", "img/s", "job")


def rows(folder: Path, ledger: dict) -> list[dict]:
    """One status row per task: state, restarts, epoch/step reached, best metric so far, img/s, job."""
    jobs = {t["index"]: t["jobs"][-1] for t in ledger["tasks"] if t["jobs"]}
    job_states = executors.of_ledger(folder, ledger).states(folder, ledger, jobs)
    out = []
    for task in ledger["tasks"]:
        record = TaskRecord(folder, task["index"]).read()
        submitted = max((sub["time"] for sub in ledger["submissions"] if str(task["index"]) in sub["tasks"]), default=0.0)
        out.append(
            {
                "task": task["index"],
                "run": task["name"],
                "state": job_states.get(task["index"], states.NOT_SUBMITTED),
                "restarts": max(0, record.get("attempts", 1) - 1),
                **_progress(task, submitted),
                "job": jobs.get(task["index"], "-"),
            }
        )
    return out


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
