"""Where each task of a sweep stands (its executor's job states + the run's own files), and the leaderboard of its runs."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from utp_dist import states
from utp_dist.store import runfiles
from utp_dist.sweep import executors
from utp_dist.sweep.ledger import find_run
from utp_dist.sweep.task import TaskRecord

COLUMNS = ("task", "run", "state", "restarts", "epoch", "step", "best", "img/s", "job")
SEED = "train.seed"
# ended without succeeding, and not because a user stopped or cancelled it: status says why, or where the output is
UNEXPLAINED = states.RESUBMITTABLE - {states.STOPPED, states.CANCELLED}


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
            state = states.SUCCEEDED  # its record is gone (deleted, another disk), but the run says it trained to its end
        row = {
            "task": task["index"],
            "run": task["name"],
            "state": state,
            "restarts": restarts.get(task["index"], 0),
            **_progress(task, submitted, within),
            "job": jobs.get(task["index"], "-"),
            "error": None,
            "log": None,
        }
        if state in UNEXPLAINED and task["index"] in jobs:
            row["error"] = TaskRecord(folder, task["index"]).read().get("error")
            row["log"] = executor.log_of(folder, task["index"], jobs[task["index"]])
        out.append(row)
    return out


def failures(table: list[dict]) -> str:
    """Why each task of a status table that ended UNEXPLAINED ended so: its one-line error, else where its output is."""
    lines = []
    for row in table:
        if row.get("error"):
            lines.append(f"task {row['task']} {row['state']}: {row['error']}")
        elif row.get("log"):
            lines.append(f"task {row['task']} {row['state']} without an error line (killed, or a crash): see {row['log']}")
    return "\n".join(lines)


def _finished_since(task: dict, submitted: float, within: tuple[Path, ...] = ()) -> bool:
    """Whether the task's run (of its exact config) trained to its end after the task's newest submission."""
    found = find_run(task["output_root"], task["name"], task["config_hash"], within)
    finished = runfiles.finished_at(found) if found is not None else None
    return finished is not None and finished >= submitted


def _progress(task: dict, submitted: float, within: tuple[Path, ...] = ()) -> dict:
    """Epoch, step, best monitored value so far, train img/s and test accuracy, as the run's files say (runfiles)."""
    found = find_run(task["output_root"], task["name"], task["config_hash"], within)
    result = {"epoch": None, "step": None, "best": None, "img/s": None, "test": None, "logs": None}
    if found is None:
        return result
    written = runfiles.summary_at(found)
    if written is not None and written < submitted:
        return result  # a rerun that has not made its own run folder yet: the run finished before it is not its progress
    shown = runfiles.progress(found, monitor=tuple(task["monitor"]))
    result.update(epoch=shown["epoch"], step=shown["step"], best=shown["best"], test=shown["test"].get("test_acc@1"), logs=str(found.logs))
    result["img/s"] = shown["img_per_s"]
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


def leaderboard_rows(folder: Path, ledger: dict, within: tuple[Path, ...] = ()) -> tuple[list[str], list[dict]]:
    """(columns, rows) of the runs ranked by their monitored metric, runs without an evaluation last; the values are the
    numbers themselves, and each row also names its run's log folder ("logs") for links."""
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
    return ["rank", "run", *swept, f"best {metric}", "epoch", "test_acc@1", "state"], board


def seed_grouping(ledger: dict) -> tuple[list[str], tuple[str, str], str] | None:
    """(the swept keys other than train.seed, the number columns to average, the monitor's mode) of a sweep whose runs
    differ in train.seed; None when it does not sweep it."""
    swept = list(dict.fromkeys(k for t in ledger["tasks"] for k in t["swept"]))
    if SEED not in swept:
        return None
    metric, mode = ledger["tasks"][0]["monitor"]
    return [k for k in swept if k != SEED], (f"best {metric}", "test_acc@1"), mode


def seed_groups(board: list[dict], keys: list[str], values: tuple[str, ...], mode: str) -> list[dict]:
    """One group per combination of `keys` (runs differing only in their seed): {"keys", "seeds", "rank", and per name
    in `values` {"mean", "std", "n"} over the runs that have a number}; ranked by the mean of the first."""
    groups: dict[str, list[dict]] = {}
    for row in board:
        groups.setdefault(repr([row.get(k) for k in keys]), []).append(row)
    out = []
    for runs in groups.values():
        group = {"keys": {k: runs[0].get(k) for k in keys}, "seeds": [r.get(SEED) for r in runs]}
        for name in values:
            numbers = [r[name] for r in runs if isinstance(r.get(name), (int, float))]
            std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0 if numbers else None
            group[name] = {"mean": statistics.fmean(numbers) if numbers else None, "std": std, "n": len(numbers)}
        out.append(group)
    first, sign = values[0], -1 if mode == "max" else 1
    out.sort(key=lambda g: (g[first]["mean"] is None, sign * (g[first]["mean"] or 0)))
    for rank, group in enumerate(out, 1):
        group["rank"] = rank
    return out


def leaderboard(folder: Path, ledger: dict, within: tuple[Path, ...] = ()) -> tuple[str, str]:
    """(Markdown, CSV) of leaderboard_rows; when runs differ only in train.seed, a second table ranks those groups by
    mean ± std over their seeds."""
    if "search" in ledger:
        return trial_leaderboard(folder, ledger)
    columns, board = leaderboard_rows(folder, ledger, within)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, "logs"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(board)
    text = markdown(board, tuple(columns))
    grouping = seed_grouping(ledger)
    if grouping is not None:
        keys, values, _ = grouping
        shown = [
            {**g["keys"], "rank": g["rank"], "seeds": ", ".join(map(str, g["seeds"])), **{v: _spread(g[v]) for v in values}}
            for g in seed_groups(board, *grouping)
        ]
        text += f"\n\nover seeds ({SEED}), mean ± std:\n\n" + markdown(shown, ("rank", *keys, "seeds", *values))
    return text, buffer.getvalue()


def _spread(stats: dict) -> str | None:
    """mean ± std (n=N), as the seed table shows a column's numbers (None: no run has one)."""
    if not stats["n"]:
        return None
    spread = f" ± {stats['std']:.4f}" if stats["n"] > 1 else ""
    return f"{stats['mean']:.4f}{spread} (n={stats['n']})"


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
