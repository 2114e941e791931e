"""Where each task of a sweep stands (its executor's job states + the run's own files), and the leaderboard of its runs."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from utp_dist.sweep import executors, states
from utp_dist.sweep.ledger import find_run

COLUMNS = ("task", "run", "state", "restarts", "epoch", "step", "best", "img/s", "job")
SEED = "train.seed"


def rows(folder: Path, ledger: dict, within: tuple[Path, ...] = ()) -> list[dict]:
    """One status row per task: state, restarts, epoch/step reached, best metric so far, img/s, job.

    `within`: read only run folders that resolve inside these (the dashboard's output roots; a ledger names any root).
    """
    jobs = {t["index"]: t["jobs"][-1] for t in ledger["tasks"] if t["jobs"]}
    executor = executors.of_ledger(folder, ledger)
    job_states, restarts = executor.states(folder, ledger, jobs), executor.restarts(folder, ledger, jobs)
    if "search" in ledger:  # a search's tasks are its workers: no run of their own
        return [
            {
                "task": t["index"],
                "run": t["name"],
                "state": job_states.get(t["index"], states.NOT_SUBMITTED),
                "job": jobs.get(t["index"], "-"),
            }
            for t in ledger["tasks"]
        ]
    out = []
    for task in ledger["tasks"]:
        submitted = max((sub["time"] for sub in ledger["submissions"] if str(task["index"]) in sub["tasks"]), default=0.0)
        state = job_states.get(task["index"], states.NOT_SUBMITTED)
        if state == states.LOST and _finished_since(task, submitted, within):
            state = states.COMPLETED  # its record is gone (deleted, another disk), but the run says it trained to its end
        out.append(
            {
                "task": task["index"],
                "run": task["name"],
                "state": state,
                "restarts": restarts.get(task["index"], 0),
                **_progress(task, submitted, within),
                "job": jobs.get(task["index"], "-"),
            }
        )
    return out


def _finished_since(task: dict, submitted: float, within: tuple[Path, ...] = ()) -> bool:
    """Whether the task's run (of its exact config) wrote its FINISHED marker after the task's newest submission."""
    found = find_run(task["output_root"], task["name"], task["config_hash"], within)
    return found is not None and found.is_finished() and found.finished_marker.stat().st_mtime >= submitted


def _progress(task: dict, submitted: float, within: tuple[Path, ...] = ()) -> dict:
    """Epoch, step, best monitored value so far and train img/s, read from the run's metrics.jsonl and summary.json."""
    metric, mode = task["monitor"]
    found = find_run(task["output_root"], task["name"], task["config_hash"], within)
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


def leaderboard(folder: Path, ledger: dict, within: tuple[Path, ...] = ()) -> tuple[str, str]:
    """(Markdown, CSV) of the runs ranked by their monitored metric; runs without an evaluation come last. When runs
    differ only in train.seed, a second table ranks those groups by mean ± std over their seeds."""
    if "search" in ledger:
        return trial_leaderboard(folder, ledger)
    status = {row["task"]: row for row in rows(folder, ledger, within)}
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
    text = markdown(board, columns)
    if SEED in swept:
        keys = [k for k in swept if k != SEED]
        groups = seed_groups(board, keys, (f"best {metric}", "test_acc@1"), mode)
        text += f"\n\nover seeds ({SEED}), mean ± std:\n\n" + markdown(groups, ("rank", *keys, "seeds", f"best {metric}", "test_acc@1"))
    return text, buffer.getvalue()


def seed_groups(board: list[dict], keys: list[str], values: tuple[str, str], mode: str) -> list[dict]:
    """One row per group of runs with equal `keys` (differing only in their seed): how many seeds, and mean ± std of
    each of `values` over the runs that have it; ranked by the mean of the first."""
    groups: dict[str, list[dict]] = {}
    for row in board:
        groups.setdefault(repr([row.get(k) for k in keys]), []).append(row)
    out = []
    for runs in groups.values():
        row = {k: runs[0].get(k) for k in keys}
        row["seeds"] = ", ".join(str(r.get(SEED)) for r in runs)
        for name in values:
            numbers = [r[name] for r in runs if isinstance(r.get(name), (int, float))]
            row[f"_{name}"] = statistics.fmean(numbers) if numbers else None
            spread = f" ± {statistics.stdev(numbers):.4f}" if len(numbers) > 1 else ""
            row[name] = f"{statistics.fmean(numbers):.4f}{spread} (n={len(numbers)})" if numbers else None
        out.append(row)
    first, sign = f"_{values[0]}", -1 if mode == "max" else 1
    out.sort(key=lambda r: (r[first] is None, sign * (r[first] or 0)))
    for rank, row in enumerate(out, 1):
        row["rank"] = rank
    return out


TRIAL_COLUMNS = ("trial", "state", "rung", "epochs", "value", "params", "attempts", "run")


def trial_rows(folder: Path, ledger: dict) -> list[dict]:
    """One row per trial of a search: number, state, rung reached (its epochs), value there, params, run folder.

    A trial whose worker lost its lease shows as paused until a worker takes it again (it is never left running).
    """
    from utp_dist.sweep.search import parse_search
    from utp_dist.sweep.study import PAUSED, RUNNING, Study, alive, trial_run

    study = Study(folder, parse_search(Path(ledger["search_file"]), ledger["search"]))
    rungs, out = study.search.rungs, []
    for record in study.records():
        reached = record["rung"]
        run = trial_run(record)
        state = PAUSED if record["state"] == RUNNING and not alive(record) else record["state"]
        out.append(
            {
                "trial": record["number"],
                "state": state,
                "rung": reached + 1 if reached >= 0 else 0,
                "epochs": rungs[reached] if reached >= 0 else 0,
                "value": record["values"].get(str(rungs[reached])) if reached >= 0 else None,
                "params": ", ".join(f"{k}={_cell(v)}" for k, v in record["params"].items()),
                "param_values": record["params"],
                "attempts": record.get("attempts", 0),
                "run": str(run.logs) if run is not None else record["run"],
                "values": record["values"],
                "error": record.get("error"),
            }
        )
    return out


def workers_line(folder: Path, ledger: dict, table: list[dict] | None = None) -> str:
    """'workers: 0 RUNNING, 1 COMPLETED' — how the search's workers stand."""
    table = rows(folder, ledger) if table is None else table
    counts: dict[str, int] = {}
    for row in table:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return "workers: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def trial_leaderboard(folder: Path, ledger: dict) -> tuple[str, str]:
    """(Markdown, CSV) of a search's trials ranked by the metric at the highest rung each reached."""
    from utp_dist.sweep.search import parse_search

    search = parse_search(Path(ledger["search_file"]), ledger["search"])
    sign = -1 if search.mode == "max" else 1
    board = trial_rows(folder, ledger)
    board.sort(key=lambda r: (-r["rung"], r["value"] is None, sign * (r["value"] or 0)))
    keys = [p.key for p in search.space]
    for rank, row in enumerate(board, 1):
        row.update(rank=rank, **{search.metric: row["value"]}, **{k: row["param_values"].get(k) for k in keys})
    columns = ("rank", "trial", *keys, "epochs", search.metric, "state")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, "run"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(board)
    return markdown(board, columns), buffer.getvalue()
