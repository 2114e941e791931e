"""The study view of a search on the sweep board: its trials, each trial's metric per epoch (the rung chart), params
against the metric (the parallel coordinates), and parameter importances from optuna.

Everything is read from the files the search keeps (trials/NNN.json and each trial's metrics.jsonl); the Optuna
storage is never opened, so a busy SQLite study file or a remote search.storage cannot slow or break a page. Run
folders are read only inside the output roots, as everywhere else on the dashboard.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from utp_dist.errors import UserError, first_line
from utp_dist.store.run_dir import RunDir, find_runs
from utp_dist.sweep.search import Search, parse_search
from utp_dist.sweep.study import PAUSED, RUNNING, Study, alive

# stopped-early and failed trials are drawn faded: the ones still in the race stand out
FADED = ("stopped-early", "failed")


def is_search(ledger: dict) -> bool:
    """Whether a sweep ledger is a search's (its tasks are workers, its runs are trials)."""
    return "search" in ledger


def study_board(folder: Path, ledger: dict, roots: tuple[Path, ...]) -> dict:
    """What the study view shows and GET /api/v1/sweeps/{id} answers as `study`: metric, mode, rungs, the space, one
    row per trial (with its curve), and the parameter importances or the line that says why there are none."""
    try:
        if not isinstance(ledger.get("search"), dict):
            raise UserError("search must be a mapping")
        search = parse_search(Path(str(ledger.get("search_file", folder / "search.yaml"))), ledger["search"])
    except (UserError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{folder.name}: its search cannot be read: {first_line(err)}") from None
    trials = [t for t in (_trial(record, search, roots) for record in Study(folder, search).records()) if t is not None]
    importances, note = importances_of(search, trials)
    return {
        "metric": search.metric,
        "mode": search.mode,
        "method": search.method,
        "budget": search.trials,
        "rungs": search.rungs,
        "params": [{"key": p.key, "kind": p.kind, "low": p.low, "high": p.high, "choices": list(p.choices)} for p in search.space],
        "trials": trials,
        "importances": importances,
        "importance_note": note,
    }


def _trial(record, search: Search, roots: tuple[Path, ...]) -> dict | None:
    """One trial: number, state (a running trial whose worker is gone shows as paused, as `submit status` has it),
    rung reached (0 = none yet; 1 = the first rung), its epochs and value there, params, and val metric per epoch.
    None for a record that is not one (the files lie in an output root others may write)."""
    fields = {"number": int, "state": str, "rung": int, "params": dict, "values": dict}
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), t) and not isinstance(record.get(k), bool) for k, t in fields.items()
    ):
        return None
    reached = record["rung"]
    rungs = search.rungs
    run = _run(record, roots)
    state = PAUSED if record["state"] == RUNNING and not _alive(record) else record["state"]
    curve = {"x": [], "y": []}
    if run is not None:
        for line in run.read_metrics():
            value = line.get(search.metric)
            if line.get("split") == "val" and isinstance(line.get("epoch"), int) and isinstance(value, (int, float)):
                curve["x"].append(line["epoch"] + 1)  # epochs count from 1, as the rungs do
                curve["y"].append(value if math.isfinite(value) else None)
    values = record["values"]
    return {
        "number": record.get("number"),
        "state": state,
        "rung": reached + 1 if reached >= 0 else 0,
        "epochs": rungs[reached] if 0 <= reached < len(rungs) else 0,
        "value": _finite(values.get(str(rungs[reached]))) if 0 <= reached < len(rungs) else None,
        "values": {k: _finite(v) for k, v in values.items()},
        "params": record["params"],
        "attempts": record.get("attempts", 0),
        "error": record.get("error"),
        "logs": str(run.logs) if run is not None else None,
        "run": record.get("run"),
        "curve": curve,
    }


def _alive(record: dict) -> bool:
    try:
        return alive(record)
    except (TypeError, ValueError, OverflowError):  # a lease that is not one holds nothing
        return False


def _run(record: dict, roots: tuple[Path, ...]) -> RunDir | None:
    """The trial's run folder, when it lies inside the output roots (a record is a file others may write)."""
    try:
        return next((r for r in find_runs(record["output_root"], record["run"], within=roots) if r.name == record["run"]), None)
    except (KeyError, TypeError, OSError):
        return None


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def importances_of(search: Search, trials: list[dict]) -> tuple[dict[str, float] | None, str]:
    """({param: importance}, the line that says over what) or (None, why not).

    Importances are taken over the values at the first rung: every trial reports there after the same number of
    epochs, so the values compare; final values exist only for the few trials ASHA promoted to the end.
    """
    first = search.rungs[0]
    scored = [(t["params"], t["values"].get(str(first))) for t in trials]
    scored = [(p, v) for p, v in scored if v is not None and set(p) == {q.key for q in search.space}]
    where = f"{search.metric} at epoch {first}" + (" (the first rung)" if len(search.rungs) > 1 else "")
    if len(scored) < 2:
        return None, f"Parameter importances need at least 2 trials with {where}; {len(scored)} so far."
    from optuna.distributions import distribution_to_json

    space = [(p.key, distribution_to_json(p.distribution())) for p in search.space]
    key = json.dumps([search.mode, space, scored], sort_keys=True, default=str)
    try:
        found = _importances(key)
    except ImportError as err:
        return None, f"Parameter importances need scikit-learn (pip install 'utp_dist[search]'): {first_line(err)}"
    except (ValueError, TypeError) as err:  # a trial record with params outside its space
        return None, f"Parameter importances cannot be computed from these trials: {first_line(err)}"
    if found is None:
        return None, f"All {len(scored)} trials have the same {where}: nothing tells the parameters apart yet."
    return found, f"fANOVA (optuna) over {len(scored)} trials' {where}."


@functools.lru_cache(maxsize=64)
def _importances(key: str) -> dict[str, float] | None:
    """optuna's fANOVA importances of the trials `key` describes (cached: it fits a random forest, ~0.5 s); None when
    the values do not vary."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    mode, space, scored = json.loads(key)
    distributions = {name: json_to_distribution(text) for name, text in space}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for params, value in scored:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    try:
        found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except RuntimeError:  # "zero total variance": every value the same
        return None
    return {name: float(value) for name, value in found.items()}
