"""Grid files (a base config, fixed `set:` overrides and a sweep block) and Python experiments files (a list of
configs), expanded into N validated configs with readable run names that show only what differs between them."""

from __future__ import annotations

import copy
import itertools
import os
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utp_dist.config import Config, ConfigError, flatten, from_dict, read_yaml, set_dotted
from utp_dist.store.run_dir import base_name, sanitize

GRID_KEYS = ("name", "base", "set", "sweep", "search", "resources")
EXPERIMENTS_LIST = "training_configurations"  # the list an experiments file defines (the old system's name)
# swept keys that the automatic run name already shows (model, loss, pretrained-ness), so the suffix skips them
IN_BASE_NAME = ("model.flavour", "model.pretrained", "train.loss", "output.suffix", "output.run_name")
SHORT = {
    "optim.lr": "lr",
    "data.batch_size": "bs",
    "optim.weight_decay": "wd",
    "train.epochs": "ep",
    "optim.grad_accum_steps": "accum",
    "train.label_smoothing": "ls",
    "optim.warmup_ratio": "warmup",
}


@dataclass(frozen=True)
class Task:
    """One expanded grid point: its index, swept values (every key of the sweep block, or what differs between the
    configs of an experiments file), resolved config and run name."""

    index: int
    swept: dict[str, Any]
    config: Config

    @property
    def name(self) -> str:
        """The pinned run name (output.run_name of the resolved config)."""
        return self.config.output.run_name


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    path: Path
    name: str
    raw: dict
    tasks: list[Task]
    resources: dict


def load_grid(path: str | os.PathLike) -> Grid:
    """Read GRID.yaml (or an experiments .py file) and expand it; every error is one line naming the file and the key."""
    path = Path(path)
    if path.suffix == ".py":
        return load_experiments(path)
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{unknown[0]}'; valid keys: {', '.join(GRID_KEYS)}")
    if "search" in raw:
        raise ConfigError(f"{path}: a search file (with search:) is not a grid; submit it with python -m utp_dist.submit {path}")
    base = load_base(path, raw)
    axes = _axes(path, raw.get("sweep") or {})
    _check_disjoint(path, raw.get("set") or {}, axes)
    combos = [{k: v for group in combo for k, v in group.items()} for combo in itertools.product(*axes)]
    named = _varying(combos)  # a single-valued axis tells no run apart: it stays out of the names
    tasks = [Task(index, swept, resolve(path, base, swept, named)) for index, swept in enumerate(combos)]
    return _grid(path, raw, tasks, raw.get("resources"), raw.get("name"))


def load_experiments(path: Path) -> Grid:
    """Run an experiments file and take its `training_configurations` list (config mappings or Configs); optional
    `name` and `resources` as in a grid file. The swept keys of each task are those that differ between the configs."""
    if not path.is_file():
        raise ConfigError(f"experiments file not found: {path}")
    try:
        namespace = runpy.run_path(str(path), run_name="__experiments__")
    except Exception as err:  # the user's code: any error is theirs to fix, named with its file
        raise ConfigError(f"{path}: running the experiments file failed: {type(err).__name__}: {err}") from None
    configs = namespace.get(EXPERIMENTS_LIST)
    if not isinstance(configs, (list, tuple)) or not configs:
        raise ConfigError(f"{path}: define {EXPERIMENTS_LIST} = [config, ...], a non-empty list of config mappings or Configs")
    raws = []
    for number, item in enumerate(configs):
        raw = item.to_dict() if hasattr(item, "to_dict") else item  # a Config, or any config object that dumps itself
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: {EXPERIMENTS_LIST}[{number}] must be a config mapping or a Config, got {type(item).__name__}")
        try:
            raws.append(from_dict(copy.deepcopy(raw), "").to_dict())
        except ConfigError as err:
            raise ConfigError(f"{path}: {EXPERIMENTS_LIST}[{number}]{err}") from None
    flat = [flatten(raw) for raw in raws]
    named = _varying(flat)
    differing = [{k: f[k] for k in f if k in named} for f in flat]
    tasks = [Task(i, swept, resolve(path, raw, {}, named, swept)) for i, (raw, swept) in enumerate(zip(raws, differing, strict=True))]
    raw = {"experiments": str(path.resolve()), EXPERIMENTS_LIST: raws}
    return _grid(path, raw, tasks, namespace.get("resources"), namespace.get("name"))


def _grid(path: Path, raw: dict, tasks: list[Task], resources: Any, name: Any) -> Grid:
    _check_unique(path, tasks)
    resources = resources or {}
    if not isinstance(resources, dict):
        raise ConfigError(f"{path}: resources must be a mapping of profile keys, got {type(resources).__name__}")
    return Grid(path, sanitize(str(name or path.stem), f"{path}: name"), raw, tasks, resources)


def load_base(path: Path, raw: dict) -> dict:
    """The base config of a grid or search file (raw) with its `set:` overrides, validated, as a raw dict."""
    return _fixed(path, _base(path, raw.get("base")), raw.get("set"))


def _fixed(path: Path, base: dict, fixed: Any) -> dict:
    """The base with the grid's `set:` overrides (dotted keys) applied, validated alone."""
    if fixed is None:
        return base
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: set must be a mapping of dotted keys to values, e.g. set: {{train.max_steps: 100}}")
    raw = copy.deepcopy(base)
    for key, value in fixed.items():
        set_dotted(raw, str(key), copy.deepcopy(value))
    try:
        from_dict(copy.deepcopy(raw), "")
    except ConfigError as err:
        raise ConfigError(f"{path}: set{err}") from None
    return raw


def _varying(points: list[dict]) -> set[str]:
    """The keys whose value differs between some of `points`."""
    keys = {k for point in points for k in point}
    return {k for k in keys if len({repr(point.get(k)) for point in points}) > 1}


def _base(path: Path, base: Any) -> dict:
    """The base config as a raw dict: a path (relative to the grid file) or an inline mapping, validated alone."""
    if base is None:
        raw: dict = {}
    elif isinstance(base, str):
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base config '{base}' not found (looked for {base_path}); give a path relative to the grid file")
        raw = read_yaml(base_path)
        path = base_path
    elif isinstance(base, dict):
        raw = base
    else:
        raise ConfigError(f"{path}: base must be a config file path or an inline config mapping, got {type(base).__name__}")
    from_dict(copy.deepcopy(raw), str(path))  # a broken base is reported as the base's error, not once per grid point
    return raw


def _axes(path: Path, sweep: Any) -> list[list[dict]]:
    """One axis per plain key (its values) and per zip group (its rows); the grid is their cartesian product."""
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: sweep must be a mapping of dotted keys to lists of values")
    axes = []
    for key, values in sweep.items():
        if key == "zip":
            groups = values if isinstance(values, list) else [values]
            for number, group in enumerate(groups):
                axes.append(_zip_rows(path, number, group))
            continue
        _check_values(path, f"sweep.{key}", values)
        axes.append([{key: v} for v in values])
    return axes


def _check_disjoint(path: Path, fixed: dict, axes: list[list[dict]]) -> None:
    """A key set in two places (set: and sweep:, or twice in the sweep) would silently take one value: refuse it."""
    seen = {str(key): "set" for key in fixed}
    for axis in axes:
        for key in axis[0]:
            clash = next((k for k in seen if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
            if clash is not None:
                keys = f"'{key}' is" if clash == key else f"'{clash}' and '{key}' are"
                where = "both in set: and sweep:" if seen[clash] == "set" else "in sweep: twice"
                raise ConfigError(f"{path}: {keys} {where}; one would silently override the other: keep one")
            seen[key] = "sweep"


def _zip_rows(path: Path, number: int, group: Any) -> list[dict]:
    where = f"sweep.zip[{number}]"
    if not isinstance(group, dict) or not group:
        raise ConfigError(f"{path}: {where} must be a mapping of dotted keys to equally long lists")
    for key, values in group.items():
        _check_values(path, f"{where}.{key}", values)
    lengths = {key: len(values) for key, values in group.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise ConfigError(f"{path}: {where}: the lists of a zip group must be equally long ({listed})")
    return [dict(zip(group, row, strict=True)) for row in zip(*group.values(), strict=True)]


def _check_values(path: Path, where: str, values: Any) -> None:
    if not isinstance(values, list):
        raise ConfigError(f"{path}: {where} must be a list of values, got {values!r}; write [{values!r}] for a single value")
    if not values:
        raise ConfigError(f"{path}: {where} is an empty list; give at least one value or remove the key")


def resolve(path: Path, base: dict, swept: dict, named: set[str], shown: dict | None = None) -> Config:
    """Base + swept values -> a validated Config with absolute paths, the HParams keys and a pinned run name that shows
    the `named` keys of `shown` (default: of `swept`; an experiments file's configs are whole, with nothing to sweep)."""
    raw = copy.deepcopy(base)
    for key, value in swept.items():
        set_dotted(raw, key, copy.deepcopy(value))
    listed = ", ".join(f"{k}={v!r}" for k, v in swept.items())
    try:
        cfg = from_dict(raw, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: sweep ({listed}){err}") from None
    # the task runs from another working directory (Slurm, a pinned local process): relative paths would move
    cfg.output.root = os.path.abspath(cfg.output.root)
    if not cfg.data.root.startswith("builtin:"):
        cfg.data.root = os.path.abspath(cfg.data.root)
    if os.path.isdir(cfg.model.flavour):
        cfg.model.flavour = os.path.abspath(cfg.model.flavour)
    shown = swept if shown is None else shown
    if cfg.output.hparams is None and shown:  # TensorBoard's HParams dashboard compares the runs by what the grid varies
        cfg.output.hparams = list(shown)
    suffix = _suffix({k: v for k, v in shown.items() if k in named}, flatten(cfg.to_dict()))
    cfg.output.run_name = sanitize(f"{base_name(cfg)}__{suffix}" if suffix else base_name(cfg), f"{path}: run name")
    return cfg


def _suffix(swept: dict, resolved: dict) -> str:
    """'lr=0.0003_bs=64': short key names (the last dotted part unless two keys share it) and the resolved values."""
    named_model = any(k in IN_BASE_NAME for k in swept)
    # a model.config (whole, or its keys) that changes with the flavour is already told apart by the flavour in the name
    keys = [
        k for k in swept if k not in IN_BASE_NAME and not ((isinstance(swept[k], dict) or k.startswith("model.config.")) and named_model)
    ]
    short = {k: SHORT.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return "_".join(f"{k if short[k] in clashes else short[k]}={_short_value(resolved.get(k, swept[k]))}" for k in keys)


def _short_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and os.sep in value:
        return Path(value.rstrip(os.sep)).name
    if isinstance(value, (list, tuple)):
        return "-".join(_short_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{_short_value(v)}" for k, v in value.items())
    return str(value)


def _check_unique(path: Path, tasks: list[Task]) -> None:
    seen: dict[str, int] = {}
    for task in tasks:
        if task.name in seen:
            raise ConfigError(
                f"{path}: grid points {seen[task.name]} and {task.index} get the same run name '{task.name}'; "
                "two identical points would share one run folder: remove the duplicate value"
            )
        seen[task.name] = task.index
