"""Search files: a grid file with a `search:` block (sampler, budget, metric, space, ASHA rungs), validated whole
before anything is submitted; every space value is tried against the config as a grid value is."""

from __future__ import annotations

import copy
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utp_dist.config import Config, ConfigError, from_dict, read_yaml, set_dotted
from utp_dist.store.run_dir import sanitize
from utp_dist.sweep.grid import GRID_KEYS, load_base, resolve

SEARCH_KEYS = ("method", "trials", "parallel", "metric", "mode", "space", "asha", "seed", "storage", "sampler_options")
# sampler arguments the search sets itself (the seed per trial, the grid from the space)
SAMPLER_OWNED = ("seed", "search_space")
KINDS = ("log_uniform", "uniform", "choice", "int")
METHODS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
# keys the search itself sets per trial: a space or sweep value for them would be silently replaced
OWNED = ("train.epochs", "train.stop_at_epoch", "train.monitor_metric", "train.monitor_mode", "output.run_name", "checkpoint.resume")


@dataclass(frozen=True)
class Param:
    """One dimension of the space: a dotted config key and how it is drawn."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    choices: tuple = ()

    def distribution(self):
        """The optuna distribution of this dimension."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), step=self.step or 1)
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "log_uniform")

    def extremes(self) -> list:
        """The values that bound what this dimension can give: each of them must make a valid config."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.low) + (int(self.high) - int(self.low)) // (self.step or 1) * (self.step or 1)]
        return [float(self.low), float(self.high)]


@dataclass(frozen=True)
class Asha:
    """Rungs at min_epochs x reduction^k up to max_epochs; the top 1/reduction of a rung go on to the next."""

    min_epochs: int
    max_epochs: int
    reduction: int

    @property
    def rungs(self) -> list[int]:
        """The epochs at which a trial reports and may be paused, the last one max_epochs."""
        rungs, epochs = [], self.min_epochs
        while epochs < self.max_epochs:
            rungs.append(epochs)
            epochs *= self.reduction
        return [*rungs, self.max_epochs]


@dataclass(frozen=True)
class Search:
    """A parsed search file: the base config, the space, the sampler, the budget and the rung rule."""

    path: Path
    name: str
    raw: dict
    base: dict
    space: tuple[Param, ...]
    method: str
    trials: int
    parallel: int
    metric: str
    mode: str
    asha: Asha | None
    seed: int
    storage: str | None
    resources: dict
    sampler_options: tuple = ()

    @property
    def max_epochs(self) -> int:
        """Epochs a trial trains at most (its schedule spans them)."""
        return self.asha.max_epochs if self.asha else from_dict(copy.deepcopy(self.base)).train.epochs

    @property
    def rungs(self) -> list[int]:
        """Epochs at which a trial reports: the ASHA rungs, or only its end."""
        return self.asha.rungs if self.asha else [self.max_epochs]

    def config(self, params: dict, run_name: str) -> Config:
        """The resolved config of a trial with these sampled values, pinned to its run folder."""
        raw = copy.deepcopy(self.base)
        set_dotted(raw, "train.epochs", self.max_epochs)
        set_dotted(raw, "train.monitor_metric", self.metric)
        set_dotted(raw, "train.monitor_mode", self.mode)
        set_dotted(raw, "checkpoint.resume", "auto")  # each segment continues the trial's own run folder
        cfg = resolve(self.path, raw, dict(params), set())
        cfg.output.run_name = sanitize(run_name, f"{self.path}: run name")
        return cfg

    def sampler(self, number: int):
        """A fresh sampler for trial `number`: seeded per trial, so every worker process draws what any other would."""
        import optuna

        name = METHODS.get(self.method, self.method)
        cls = getattr(optuna.samplers, name)
        kwargs: dict[str, Any] = dict(self.sampler_options)
        if "seed" in inspect.signature(cls).parameters:
            kwargs["seed"] = self.seed * 100_003 + number
        if cls is optuna.samplers.GridSampler:
            # its seed shuffles the grid, and a trial's grid point is its number: one order for every trial
            kwargs.update(search_space={p.key: list(p.choices) for p in self.space}, seed=self.seed)
        return cls(**kwargs)

    def distributions(self) -> dict:
        """{key: optuna distribution} of the space."""
        return {p.key: p.distribution() for p in self.space}


def is_search(path: str | os.PathLike) -> bool:
    """Whether a YAML file is a search file (it has a search: block)."""
    path = Path(path)
    return path.suffix in (".yaml", ".yml") and path.is_file() and "search" in read_yaml(path)


def load_search(path: str | os.PathLike) -> Search:
    """Read and validate a search file; every error is one line naming the file and the key."""
    path = Path(path)
    return parse_search(path, read_yaml(path))


def stored(search: Search) -> dict:
    """The search file as the sweep's ledger keeps it: the base resolved (with set: applied), so later edits of the
    files it named change nothing in a running search."""
    return {**{k: v for k, v in search.raw.items() if k != "set"}, "base": search.base}


def parse_search(path: Path, raw: dict) -> Search:
    """Validate the mapping of a search file read from `path` (its base path is relative to it)."""
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{unknown[0]}'; valid keys: {', '.join(GRID_KEYS)}")
    block = raw.get("search")
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: search must be a mapping with method, trials, space, ... (see docs/search.md)")
    bad = sorted(set(block) - set(SEARCH_KEYS))
    if bad:
        raise ConfigError(f"{path}: unknown key 'search.{bad[0]}'; valid keys: {', '.join('search.' + k for k in SEARCH_KEYS)}")
    base = load_base(path, raw)
    space = _space(path, block.get("space") or {}) + _sweep(path, raw.get("sweep") or {})
    if not space:
        raise ConfigError(f"{path}: search.space is empty; give at least one key, e.g. optim.lr: {{log_uniform: [1.0e-4, 3.0e-2]}}")
    keys = [p.key for p in space]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:
        raise ConfigError(f"{path}: '{twice}' is both in search.space and sweep:; keep one")
    for key in keys:
        fixed = next((k for k in raw.get("set") or {} if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if fixed:
            raise ConfigError(f"{path}: '{key}' is both in set: and the search space; one would silently override the other: keep one")
        if key in OWNED:
            raise ConfigError(f"{path}: search.space.{key}: the search sets {key} itself (search.asha, search.metric); remove it")
    defaults = from_dict(copy.deepcopy(base), str(path)).train
    metric = _text(path, block, "metric", defaults.monitor_metric)
    mode = _text(path, block, "mode", defaults.monitor_mode)
    if mode not in ("max", "min"):
        raise ConfigError(f"{path}: search.mode must be max or min, got {mode!r}")
    method = _method(path, block.get("method", "tpe"), space)
    options = _sampler_options(path, method, block.get("sampler_options"))
    asha = _asha(path, block.get("asha"))
    trials = _count(path, block, "trials", math.prod(len(p.choices) for p in space) if method == "grid" else None)
    search = Search(
        path=path,
        name=sanitize(str(raw.get("name") or path.stem), f"{path}: name"),
        raw=raw,
        base=base,
        space=tuple(space),
        method=method,
        trials=trials,
        parallel=_count(path, block, "parallel", 1),
        metric=metric,
        mode=mode,
        asha=asha,
        seed=_integer(path, "search.seed", block.get("seed", 0)),
        storage=_text(path, block, "storage", None),
        resources=raw.get("resources") or {},
        sampler_options=options,
    )
    _validate(search)
    return search


def _validate(search: Search) -> None:
    """Every value a dimension can give (its bounds, each choice), the others at their first, must make a valid config."""
    first = {p.key: p.extremes()[0] for p in search.space}
    for param in search.space:
        for value in param.extremes():
            try:
                search.config({**first, param.key: value}, "probe")
            except ConfigError as err:
                text = str(err).split("): ", 1)[-1] if "): " in str(err) else str(err)
                raise ConfigError(f"{search.path}: search.space.{param.key}={value!r}: {text}") from None
    try:
        search.config(first, "probe")
    except ConfigError as err:
        raise ConfigError(f"{search.path}: search.metric/mode: {str(err).split('): ', 1)[-1]}") from None


def _space(path: Path, space: Any) -> list[Param]:
    if not isinstance(space, dict):
        raise ConfigError(f"{path}: search.space must be a mapping of dotted keys to {{log_uniform|uniform|choice|int: ...}}")
    return [_param(path, str(key), spec) for key, spec in space.items()]


def _param(path: Path, key: str, spec: Any) -> Param:
    where = f"{path}: search.space.{key}"
    kinds = [k for k in KINDS if isinstance(spec, dict) and k in spec]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where} must be one of {{log_uniform: [LOW, HIGH]}}, {{uniform: [LOW, HIGH]}}, {{choice: [...]}}, {{int: [LOW, HIGH], step: N}}"
        )
    kind = kinds[0]
    extra = sorted(set(spec) - {kind, "step"}) or (["step"] if "step" in spec and kind != "int" else [])
    if extra:
        raise ConfigError(f"{where}: unknown key '{extra[0]}' beside {kind}")
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: choice must be a non-empty list of values")
        odd = next((v for v in value if v is not None and not isinstance(v, (bool, int, float, str))), None)
        if odd is not None:
            raise ConfigError(
                f"{where}: choice values must be numbers, strings, booleans or null, got {odd!r}; use set: or sweep: for mappings"
            )
        return Param(key, kind, choices=tuple(value))
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"{where}: {kind} takes [LOW, HIGH], got {value!r}")
    low, high = (_number(where, v, integer=kind == "int") for v in value)
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs LOW < HIGH, got [{low}, {high}]")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform bounds must be > 0, got [{low}, {high}]; use uniform for ranges that reach 0")
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ConfigError(f"{where}: step must be an int >= 1, got {step!r}")
    return Param(key, kind, low, high, step)


def _sweep(path: Path, sweep: Any) -> list[Param]:
    """A sweep: block beside search: gives choice dimensions (method grid walks them all)."""
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: sweep must be a mapping of dotted keys to lists of values")
    params = []
    for key, values in sweep.items():
        if key == "zip":
            raise ConfigError(f"{path}: sweep.zip: zip groups cannot be searched; list the values as search.space choices")
        params.append(_param(path, str(key), {"choice": values}))
    return params


def _method(path: Path, method: Any, space: list[Param]) -> str:
    import optuna

    names = [n for n in dir(optuna.samplers) if n.endswith("Sampler") and not n.startswith("Base")]
    if not isinstance(method, str) or (method not in METHODS and method not in names):
        raise ConfigError(
            f"{path}: search.method '{method}' is not a sampler; use tpe, random, grid or an optuna sampler: {', '.join(names)}"
        )
    if METHODS.get(method, method) == "GridSampler":
        odd = next((p for p in space if p.kind != "choice"), None)
        if odd:
            raise ConfigError(
                f"{path}: search.space.{odd.key}: method grid walks lists of values; give {{choice: [...]}} or use tpe/random"
            )
    return method


def _sampler_options(path: Path, method: str, options: Any) -> tuple:
    """search.sampler_options: keyword arguments of the sampler's class (e.g. TPESampler's n_startup_trials), as
    (name, value) pairs; a name the class does not take is a one-line error before anything is submitted."""
    import optuna

    if options is None:
        return ()
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: search.sampler_options must be a mapping of the sampler's arguments, e.g. {{n_startup_trials: 5}}")
    name = METHODS.get(method, method)
    accepted = [p for p in inspect.signature(getattr(optuna.samplers, name)).parameters if p not in ("self", *SAMPLER_OWNED)]
    for key, value in options.items():
        if key in SAMPLER_OWNED:
            raise ConfigError(f"{path}: search.sampler_options.{key}: the search sets it (search.seed, search.space); remove it")
        if key not in accepted:
            raise ConfigError(f"{path}: search.sampler_options.{key}: {name} takes no such argument; valid: {', '.join(accepted)}")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ConfigError(f"{path}: search.sampler_options.{key} must be a number, string, boolean or null, got {value!r}")
    if name != "GridSampler":  # a value the sampler refuses: now, not when the first trial is drawn
        try:
            getattr(optuna.samplers, name)(**options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: search.sampler_options: {name} refuses them: {err}") from None
    return tuple(sorted(options.items()))


def _asha(path: Path, asha: Any) -> Asha | None:
    if asha is None:
        return None
    keys = ("min_epochs", "max_epochs", "reduction")
    if not isinstance(asha, dict) or sorted(asha) != sorted(keys):
        raise ConfigError(f"{path}: search.asha must be {{min_epochs: N, max_epochs: M, reduction: R}}, got {asha!r}")
    low, high, factor = (_integer(path, f"search.asha.{k}", asha[k]) for k in keys)
    if low < 1 or high < low:
        raise ConfigError(f"{path}: search.asha needs 1 <= min_epochs <= max_epochs, got {low} and {high}")
    if factor < 2:
        raise ConfigError(f"{path}: search.asha.reduction must be >= 2 (keep the top 1/reduction of each rung), got {factor}")
    return Asha(low, high, factor)


def _count(path: Path, block: dict, key: str, default: int | None) -> int:
    if key not in block and default is None:
        raise ConfigError(f"{path}: search.{key} is required: how many trials the search may start")
    value = _integer(path, f"search.{key}", block.get(key, default))
    if value < 1:
        raise ConfigError(f"{path}: search.{key} must be >= 1, got {value}")
    return value


def _integer(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {key} must be an int, got {value!r}")
    return value


def _number(where: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: bounds must be finite numbers, got {value!r}")
    if integer:
        if not float(value).is_integer():
            raise ConfigError(f"{where}: int bounds must be whole numbers, got {value!r}")
        return int(value)
    return value


def _text(path: Path, block: dict, key: str, default: str | None) -> str | None:
    value = block.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}: search.{key} must be a string, got {value!r}")
    return value


def search_plan(search: Search, resources: str) -> str:
    """What a submission prints: the sampler, the budget, the rungs and the space."""
    lines = [
        f"search {search.path}: {search.trials} trial(s), {search.parallel} at once, {search.method} sampler, "
        f"{search.mode} {search.metric}, rungs at epoch(s) {', '.join(map(str, search.rungs))}; resources per worker: {resources}"
    ]
    for p in search.space:
        shown = (
            f"choice {list(p.choices)}" if p.kind == "choice" else f"{p.kind} [{p.low}, {p.high}]" + (f" step {p.step}" if p.step else "")
        )
        lines.append(f"  {p.key}: {shown}")
    return "\n".join(lines)
