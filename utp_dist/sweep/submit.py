"""`python -m utp_dist.submit GRID.yaml` and its ledger commands: status, resubmit, leaderboard."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from utp_dist import states
from utp_dist.errors import UserError, run_command
from utp_dist.store.run_dir import RunDir, is_version_of
from utp_dist.sweep import executors, ledger
from utp_dist.sweep.resources import Resources, as_dict, load_resources
from utp_dist.sweep.search import is_search, load_search, search_plan
from utp_dist.sweep.status import COLUMNS, TRIAL_COLUMNS, failures, leaderboard, markdown, rows, trial_rows, workers_line
from utp_dist.sweep.study import retry_failed, search_finished
from utp_dist.sweep.task import TaskRecord

COMMANDS = ("status", "resubmit", "leaderboard")
DRY_RUN_DIR = ".dry-run"
NOTHING_TO_RESUBMIT = "nothing to resubmit: no task failed, was cancelled, timed out or got lost"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Either GRID.yaml with submission flags, or one of the ledger commands on a sweep folder."""
    if argv and argv[0] in COMMANDS + ("_run-local", "_task"):
        parser = argparse.ArgumentParser(prog=f"python -m utp_dist.submit {argv[0]}")
        parser.add_argument("sweep_dir", help="OUTPUT_ROOT/sweeps/NAME, as printed by the submission (or a search file: its newest sweep)")
        if argv[0] == "resubmit":
            parser.add_argument("--failed", action="store_true", help="the failed, cancelled, timed-out and lost tasks")
            parser.add_argument("--tasks", help="comma-separated task indices, instead of --failed")
            parser.add_argument(
                "--force",
                action="store_true",
                help="also tasks whose exact config completed and, with --tasks, those still queued or running",
            )
            parser.add_argument("--wait", action="store_true", help="wait for the tasks, showing their status")
            parser.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
        if argv[0] == "_run-local":
            parser.add_argument("--tasks", required=True)
            parser.add_argument("--parallel", action="store_true")
        if argv[0] == "_task":
            parser.add_argument("index", type=int)
        if argv[0] == "status":
            parser.add_argument("--json", action="store_true", help="the same rows as JSON")
        args = parser.parse_args(argv[1:])
        args.command = argv[0]
        return args
    parser = argparse.ArgumentParser(
        prog="python -m utp_dist.submit",
        description=f"Run a config grid as one Slurm array job, local processes, in-process or on a dashboard's agents. Ledger commands: {', '.join(COMMANDS)} SWEEP_DIR.",
    )
    parser.add_argument("grid", help="grid YAML (base config + set + sweep block + resources) or experiments .py file")
    parser.add_argument("--executor", choices=list(executors.EXECUTORS), default="slurm", help="where the tasks run (default: slurm)")
    parser.add_argument("--profile", help="cluster profile YAML, e.g. slurm/profiles/example.yaml")
    parser.add_argument(
        "--dry-run", action="store_true", help="expand and validate, print the runs, write the sbatch script; submit nothing"
    )
    parser.add_argument("--wait", action="store_true", help="block until every task ended, showing a live status table")
    parser.add_argument("--parallel", action="store_true", help="local executor: one task per visible GPU at once")
    parser.add_argument("--server", help="dashboard executor: the dashboard's URL, e.g. http://127.0.0.1:8000 (its agents run the tasks)")
    parser.add_argument("--force", action="store_true", help="also rerun grid points whose exact config already completed")
    parser.add_argument(
        "--preflight",
        action="store_true",
        help="first check each distinct data root (python -m utp_dist.data check); submit nothing if one fails",
    )
    parser.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = "submit"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command; user errors become one line on stderr and exit code 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = {"submit": submit, "status": status, "resubmit": resubmit, "leaderboard": board, "_run-local": _run_local, "_task": _task}
    return run_command(lambda: command[args.command](args))


def submit(args: argparse.Namespace) -> int:
    """Expand, validate, skip what already completed, then submit (or with --dry-run only show and write the script)."""
    from utp_dist.sweep.grid import load_grid

    if is_search(args.grid):
        return submit_search(args)
    grid = load_grid(args.grid)
    resources = load_resources(args.profile, grid.resources, str(grid.path))
    executor = executors.EXECUTORS[args.executor](resources, args.parallel, args.server)
    todo, skipped = [], []
    for task in grid.tasks:
        done = None if args.force else _completed(task.config.output.root, task.name, task.config.fingerprint(), task.index)
        (skipped if done else todo).append((task, done))
    print(_plan(grid, todo, skipped, resources))
    if args.preflight and not _preflight([task for task, _ in todo]):
        return 1
    if args.dry_run:
        folder = ledger.sweeps_dir(grid.tasks[0].config.output.root) / DRY_RUN_DIR / grid.name
        folder.mkdir(parents=True, exist_ok=True)
        files = executor.dry_run_files(folder, grid.name, len(todo))
        for name, text in files.items():
            (folder / name).write_text(text)
        for task, _ in todo:
            (folder / f"{task.index:03d}_{task.name}.yaml").write_text(task.config.to_yaml())
        print(f"dry run: nothing submitted; {' and '.join([*files, 'the resolved configs'])} are in {folder}")
        return 0
    if not todo:
        print("nothing to submit: every grid point already completed (--force reruns them)")
        return 0
    executor.check_available()  # before the sweep folder is created: nothing is half-submitted
    folder = ledger.create_sweep(grid, executor.name, args.profile, as_dict(resources))
    record = ledger.read(folder)
    try:
        return _launch(folder, record, executor, [task.index for task, _ in todo], args)
    except UserError:
        if not ledger.read(folder)["submissions"]:
            shutil.rmtree(folder)  # refused before anything ran: no half-made sweep is left behind
        raise


def submit_search(args: argparse.Namespace) -> int:
    """Validate a search file, create its sweep folder and study, and start its workers."""
    search = load_search(args.grid)
    resources = load_resources(args.profile, search.resources, str(search.path))
    executor = executors.EXECUTORS[args.executor](resources, args.parallel, args.server)
    base = search.config({p.key: p.extremes()[0] for p in search.space}, "probe")
    print(search_plan(search, resources.summary()))
    if args.dry_run:
        folder = ledger.sweeps_dir(base.output.root) / DRY_RUN_DIR / search.name
        folder.mkdir(parents=True, exist_ok=True)
        files = executor.dry_run_files(folder, search.name, search.parallel)
        for name, text in files.items():
            (folder / name).write_text(text)
        print(f"dry run: nothing submitted; {', '.join(files) or 'nothing'} written to {folder}")
        return 0
    executor.check_available()
    folder = ledger.create_search(search, base.output.root, executor.name, args.profile, as_dict(resources))
    if args.executor == "dashboard":  # the server steps it (utp_dist.dashboard.searches): nothing to keep running here
        ledger.record_submission(folder, ledger.read(folder), executor.name, {})
        print(
            f"submitted to the dashboard at {args.server}: it queues the trials as runs of the project 'sweep {folder.name}' "
            f"once it indexes {folder} (the output root must be one of its --root)\nsweep folder: {folder}\n"
            f"  status:      python -m utp_dist.submit status {folder}"
        )
        return wait_trials(folder, ledger.read(folder), args.poll) if args.wait else 0
    try:
        return _launch(folder, ledger.read(folder), executor, list(range(search.parallel)), args)
    except UserError:
        if not ledger.read(folder)["submissions"]:
            shutil.rmtree(folder)
        raise


def _resubmit_search(folder: Path, record: dict, args: argparse.Namespace) -> int:
    """Continue a search: its failed trials go on from their newest state, and workers that ended start again."""
    if not args.failed:
        raise UserError("resubmit: a search continues as a whole: use --failed (failed trials and ended workers start again)")
    indices, line = _search_work(folder, record)
    print(line)
    return _launch(folder, record, executors.of_ledger(folder, record), indices, args) if indices else 0


def _search_work(folder: Path, record: dict) -> tuple[list[int], str]:
    """(the workers to start again, the line that says why or why not): failed trials are set to continue from their
    newest state, and every worker that ended starts again while the search has work left."""
    retried = retry_failed(folder, record)
    if record["executor"] == "dashboard":  # the server resumes the runs of the failed trials
        print(f"{retried} failed trial(s) continue from their newest state" if retried else "nothing to resubmit: no failed trial")
        return 0
    running = {r["task"] for r in rows(folder, record) if r["state"] not in states.DONE}
    indices = [task["index"] for task in record["tasks"] if task["index"] not in running]
    if search_finished(folder, record) or not indices:
        return [], "nothing to resubmit: the search has no failed trial and nothing left to train" if not running else "workers still run"
    return indices, f"{retried} failed trial(s) continue from their newest state"


def _preflight(tasks: list) -> bool:
    """Check each distinct data root of `tasks`; whether all would let a run start."""
    from utp_dist.data.check import check_roots

    ok = check_roots(sorted({task.config.data.root for task in tasks}))
    if not ok:
        print("preflight failed: nothing submitted; fix the data above (or drop --preflight)", file=sys.stderr)
    return ok


def _completed(root: str, name: str, config_hash: str, index: int) -> RunDir | None:
    """The completed run of a grid point's exact config; a warning names a summary.json that cannot be read."""
    done = ledger.completed_run(root, name, config_hash)
    if done is None:
        for summary in ledger.unreadable_summaries(root, name, config_hash):
            print(f"utp_dist: warning: task {index} ({name}) runs again: {summary} cannot be read; fix or delete it", file=sys.stderr)
    return done


def _skipped(index: int, name: str, done: RunDir) -> str:
    return f"skipped task {index} ({name}): this exact config already completed in {done.logs}"


def _plan(grid, todo: list, skipped: list, resources: Resources) -> str:
    """The table of runs: index, name, swept values, resources; then what is skipped."""
    table = [
        {
            "task": t.index,
            "run": t.name,
            "swept": ", ".join(f"{k}={'{...}' if isinstance(v, dict) else v}" for k, v in t.swept.items()) or "-",
            "resources": resources.summary(),
        }
        for t, _ in todo
    ]
    lines = [f"grid {grid.path}: {len(grid.tasks)} run(s), {len(todo)} to submit", markdown(table, ("task", "run", "swept", "resources"))]
    lines += [_skipped(t.index, t.name, done) for t, done in skipped]
    return "\n".join(lines)


def _launch(folder: Path, record: dict, executor: executors.Executor, indices: list[int], args) -> int:
    """Submit `indices` with `executor`, note it in the ledger, and report (or wait)."""
    print(_submitted(folder, record, executor, indices))
    print(
        f"sweep folder: {folder}\n  status:      python -m utp_dist.submit status {folder}\n"
        f"  leaderboard: python -m utp_dist.submit leaderboard {folder}"
    )
    ended = executor.run_here(folder, record, indices)  # the debug executor trains them now, in this process
    return wait(folder, indices, args.poll) if args.wait or ended else 0


def _submitted(folder: Path, record: dict, executor: executors.Executor, indices: list[int]) -> str:
    """Submit `indices` with `executor` and note it in the ledger; the line that says so."""
    for index in indices:  # before submitting: the new attempt may start (and finish) before sbatch even returns
        TaskRecord(folder, index).queued()
    jobs = executor.submit(folder, record, indices)
    ledger.record_submission(folder, record, executor.name, jobs)
    return f"submitted {len(indices)} task(s) with the {executor.name} executor: {', '.join(sorted(set(jobs.values())))}"


def wait(folder: Path, indices: list[int], poll: float) -> int:
    """Print the status table whenever it changes until every task in `indices` ended; 0 if all completed."""
    shown = None
    while True:
        record = ledger.read(folder)
        table = [r for r in rows(folder, record) if r["task"] in indices]
        text = markdown(table, COLUMNS)
        if "search" in record:  # the workers are the tasks; what to watch are the trials
            text = markdown(trial_rows(folder, record), TRIAL_COLUMNS) + "\n" + workers_line(folder, record, table)
        shown = _show(text, shown)
        if all(r["state"] in states.DONE for r in table):
            if "search" in record:
                return _search_outcome(folder, record)
            if why := failures(table):
                print(why, flush=True)
            return 0 if all(r["state"] == states.SUCCEEDED for r in table) else 1
        time.sleep(poll)


def wait_trials(folder: Path, record: dict, poll: float) -> int:
    """Print a search's trials whenever they change until every trial ended (the dashboard's server trains them); 0 if
    none failed."""
    shown = None
    while True:
        finished = search_finished(folder, record)  # before the table: the last table shown is then the final one
        shown = _show(markdown(trial_rows(folder, record), TRIAL_COLUMNS), shown)
        if finished:
            return _search_outcome(folder, record)
        time.sleep(poll)


def _show(text: str, shown: str | None) -> str:
    if text != shown:
        print(time.strftime("%H:%M:%S"), flush=True)
        print(text, flush=True)
    return text


def _search_outcome(folder: Path, record: dict) -> int:
    """0 when the search has every trial ended and none failed, else 1."""
    return 0 if search_finished(folder, record) and not any(t["state"] == states.FAILED for t in trial_rows(folder, record)) else 1


def status(args: argparse.Namespace) -> int:
    """Print one row per task: state, restarts, epoch/step, best metric so far, img/s, job id (a search: per trial)."""
    folder = sweep_folder(args.sweep_dir)
    record = ledger.read(folder)
    if "search" in record:
        table = trial_rows(folder, record)
        workers = "" if record["executor"] == "dashboard" else "\n" + workers_line(folder, record)  # the server's trials: no workers
        print(json.dumps(table, indent=1) if args.json else markdown(table, TRIAL_COLUMNS) + workers)
        return 0
    table = rows(folder, record)
    why = failures(table)
    print(json.dumps(table, indent=1, default=str) if args.json else markdown(table, COLUMNS) + (f"\n{why}" if why else ""))
    return 0


def resubmit(args: argparse.Namespace) -> int:
    """Submit again the failed (or the listed) tasks; each continues from its run's newest training state."""
    folder = sweep_folder(args.sweep_dir)
    record = ledger.read(folder)
    if "search" in record:
        return _resubmit_search(folder, record, args)
    if args.tasks:
        indices = _indices(args.tasks, len(record["tasks"]))
        busy = [r for r in rows(folder, record) if r["task"] in indices and r["state"] not in states.DONE]
        if busy and not args.force:
            raise UserError(
                f"resubmit: task {busy[0]['task']} is {busy[0]['state']}; a second job would write into the same run "
                "(wait for it, scancel it, or add --force)"
            )
    elif args.failed:
        indices = _failed(folder, record)
    else:
        raise UserError("resubmit: say which tasks: --failed, or --tasks 0,3")
    if not args.force:
        indices, skipped = _not_completed(record, indices)
        for line in skipped:
            print(line)
    if not indices:
        print(NOTHING_TO_RESUBMIT)
        return 0
    return _launch(folder, record, executors.of_ledger(folder, record), indices, args)


def resubmit_failed(folder: Path) -> str:
    """`resubmit FOLDER --failed` for a caller that must not train in its own process (the dashboard); the line it ends with.

    The tasks of a debug sweep go to the local runner instead: the debug executor would train them in this process.
    """
    record = ledger.read(folder)
    said = None
    if "search" in record:
        indices, said = _search_work(folder, record)
    else:
        indices, _ = _not_completed(record, _failed(folder, record))
    if not indices:
        return said or NOTHING_TO_RESUBMIT
    executor = executors.of_ledger(folder, record)
    if executor.in_process:
        executor = executors.LocalExecutor(executor.resources)
    submitted = _submitted(folder, record, executor, indices)
    return f"{said}; {submitted}" if said else submitted


def _failed(folder: Path, record: dict) -> list[int]:
    """The tasks that ended without completing."""
    return [r["task"] for r in rows(folder, record) if r["state"] in states.RESUBMITTABLE]


def _not_completed(record: dict, indices: list[int]) -> tuple[list[int], list[str]]:
    """`indices` without the tasks whose exact config completed (as submit does: they are not trained again as NAME-vN),
    and a line for each task left out."""
    todo, skipped = [], []
    for index in indices:
        task = record["tasks"][index]
        done = _completed(task["output_root"], task["name"], task["config_hash"], index)
        if done is None:
            todo.append(index)
        else:
            skipped.append(_skipped(index, task["name"], done))
    return todo, skipped


def sweep_folder(given: str) -> Path:
    """The sweep folder a ledger command names: the folder itself, or a search file (its newest sweep folder)."""
    path = Path(given)
    if not is_search(path):
        return path
    search = load_search(path)
    root = ledger.sweeps_dir(search.config({p.key: p.extremes()[0] for p in search.space}, "probe").output.root)
    mine = [
        folder
        for folder in (root.iterdir() if root.is_dir() else [])
        if is_version_of(search.name, folder.name)
        and (folder / ledger.LEDGER).is_file()
        and ledger.read(folder).get("search_file") == str(path.resolve())
    ]
    if not mine:
        raise UserError(f"{path}: this search was not submitted yet (no sweep folder for it in {root})")
    return max(mine, key=lambda folder: ledger.read(folder)["created"])


def _indices(text: str, count: int) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--tasks '{text}' must be comma-separated task indices, e.g. 0,3") from None
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise UserError(f"--tasks: no task {bad[0]} in this sweep (it has tasks 0 to {count - 1})")
    return indices


def board(args: argparse.Namespace) -> int:
    """Print the runs ranked by the monitored metric and write leaderboard.md and leaderboard.csv into the sweep."""
    folder = sweep_folder(args.sweep_dir)
    record = ledger.read(folder)
    text, table = leaderboard(folder, record)
    (folder / "leaderboard.md").write_text(text + "\n")
    (folder / "leaderboard.csv").write_text(table)
    print(text)
    print(f"written: {folder / 'leaderboard.md'}, {folder / 'leaderboard.csv'}")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    folder = Path(args.sweep_dir)
    record = ledger.read(folder)
    return 1 if executors.run_local(folder, _indices(args.tasks, len(record["tasks"])), args.parallel) else 0


def _task(args: argparse.Namespace) -> int:
    folder = Path(args.sweep_dir)
    return executors.run_task(folder, ledger.read(folder), args.index)
