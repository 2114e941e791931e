"""The extension points: one registry each for losses, model builders, datasets, batch transforms, metrics and callbacks.

A config names an entry by its registered name or by an import path `module:attr`. A user's module adds names with
the register_* decorators; importing it (from Python, or through any import path in the config) registers them.
Built-in entries are import paths too, so this module stays light and every name is listed from the start.

A config that comes through the dashboard is not the user's own code: `check_references` lets it name only registered
names and import paths under the modules an operator allowed with --allow-import (see `allow_imports`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from utp_dist.config import ConfigError
from utp_dist.errors import UserError

if TYPE_CHECKING:
    from utp_dist.config import Config

IMPORT_ENV = "UTP_DIST_IMPORT"
"""Modules (comma-separated) an agent's training process imports before it looks up a name: the agent's --allow-import."""
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_object(spec: str, key: str) -> Any:
    """The object named by an import path `module:attr` (a one-line ConfigError naming `key` otherwise)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: '{spec}' is not an import path; write module:attr, e.g. my_pkg.callbacks:Timer")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import '{module_name}' ({err}); is it installed or on PYTHONPATH?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: module '{module_name}' has no '{attr}'") from None


def bind_options(fn: Callable, options: dict, key: str, *positional: Any) -> Callable:
    """`fn` with keyword `options` bound; options it does not take are a one-line ConfigError naming `key`."""
    try:
        inspect.signature(fn).bind(*positional, **options)
    except TypeError as err:
        raise ConfigError(f"{key}: {getattr(fn, '__name__', fn)}: {err}") from None
    return functools.partial(fn, **options)


class Registry:
    """Names -> objects for one config key; built-ins are given as import paths and imported on first use."""

    def __init__(self, key: str, what: str, builtins: dict[str, str]):
        self.key, self.what = key, what
        self.entries: dict[str, Any] = dict(builtins)

    def register(self, name: str, obj: Any = None) -> Any:
        """Add `obj` under `name`; without `obj`, a decorator that adds the decorated object."""
        if obj is None:
            return lambda decorated: self.register(name, decorated)
        old = self.entries.get(name)
        same = old is not None and _identity(old) == _identity(obj)
        if old is not None and not same:  # the same definition again (a re-imported module) is fine
            raise ValueError(f"{self.key}: '{name}' is already registered ({old!r}); choose another name")
        self.entries[name] = obj
        return obj

    def get(self, spec: str) -> Any:
        """The entry registered as `spec`, or the object at import path `spec`; a one-line ConfigError otherwise."""
        if spec not in self.entries and ":" not in spec:
            _import_from_env()
        entry = self.entries.get(spec, spec)
        if isinstance(entry, str):
            if ":" not in entry:
                known = ", ".join(sorted(self.entries)) or "none"
                raise ConfigError(f"{self.key}: unknown {self.what} '{spec}'; registered: {known} (or an import path module:attr)")
            entry = load_object(entry, self.key)
        if not callable(entry):  # every entry is called: a loss, a builder, a factory
            raise ConfigError(
                f"{self.key}: '{spec}' is a value of type {type(entry).__name__}, not a function or class; name a callable {self.what}"
            )
        return entry


def _identity(obj: Any) -> tuple:
    return getattr(obj, "__module__", None), getattr(obj, "__qualname__", obj)


@functools.cache
def _import_from_env() -> None:
    """Import the modules an agent allowed (its --allow-import, passed down in UTP_DIST_IMPORT), once, so their names resolve."""
    for module in filter(None, os.environ.get(IMPORT_ENV, "").split(",")):
        importlib.import_module(module)


LOSSES = Registry(
    "train.loss",
    "loss",
    {
        "cross_entropy": "utp_dist.losses:cross_entropy",
        "focal": "utp_dist.losses:focal",
        "soft_cross_entropy": "utp_dist.losses:soft_cross_entropy",
    },
)
MODELS = Registry("model.builder", "model builder", {"transformers": "utp_dist.model:build_model"})
DATASETS = Registry("data.dataset", "dataset", {"image_folder": "utp_dist.data.loaders:index_splits"})
BATCH_TRANSFORMS = Registry(
    "data.batch_transforms", "batch transform", {"mixup": "torchvision.transforms.v2:MixUp", "cutmix": "torchvision.transforms.v2:CutMix"}
)
METRICS = Registry(
    "train.metrics",
    "metric",
    {"precision_macro": "utp_dist.metrics:precision_macro", "calibration_error": "utp_dist.metrics:calibration_error"},
)
CALLBACKS = Registry("train.callbacks", "callback", {})


def register_loss(name: str) -> Callable:
    """Decorator: `fn(logits, targets, **train.loss_options) -> loss`; targets are class indices or probabilities."""
    return LOSSES.register(name)


def register_model(name: str) -> Callable:
    """Decorator: `fn(model_cfg, classes, image_size) -> (model, image_processor)`, as utp_dist.model.build_model."""
    return MODELS.register(name)


def register_dataset(name: str) -> Callable:
    """Decorator: `fn(data_cfg, seed) -> utp_dist.data.loaders.Splits` (files and labels of train, val and optionally test)."""
    return DATASETS.register(name)


def register_batch_transform(name: str) -> Callable:
    """Decorator: `factory(**options) -> transform(images, targets) -> (images, targets)`, as torchvision's v2.MixUp."""
    return BATCH_TRANSFORMS.register(name)


def register_metric(name: str) -> Callable:
    """Decorator: `factory(num_classes) -> torchmetrics.Metric`, updated with (probabilities, labels) on every evaluation."""
    return METRICS.register(name)


def register_callback(name: str) -> Callable:
    """Decorator: a class (or factory) called without arguments, whose object has any of the Callback events."""
    return CALLBACKS.register(name)


REGISTRIES = (LOSSES, MODELS, DATASETS, BATCH_TRANSFORMS, METRICS, CALLBACKS)


def allow_imports(modules: Iterable[str]) -> tuple[str, ...]:
    """Import the modules an operator trusts (--allow-import), so the names their register_* decorators add are known.

    The modules are also prefixes: import paths `module:attr` whose module is one of them or below one (my_team allows
    my_team.losses:focal2, not my_teamx) pass `check_references`. A module that does not import is a one-line UserError.
    """
    modules = tuple(modules)
    for module in modules:
        if not MODULE_NAME.fullmatch(module):
            raise UserError(f"--allow-import {module!r}: give a module name, e.g. my_team or my_team.losses")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"--allow-import {module}: cannot import it ({err}); is it installed or on PYTHONPATH?") from None
    return modules


def references(cfg: Config) -> list[tuple[Registry, str]]:
    """Every (registry, entry) a config names; the option mappings are keyed by these names (the config checks that)."""
    return [
        (LOSSES, cfg.train.loss),
        (MODELS, cfg.model.builder),
        (DATASETS, cfg.data.dataset),
        *((BATCH_TRANSFORMS, spec) for spec in cfg.data.batch_transforms),
        *((METRICS, spec) for spec in cfg.train.metrics),
        *((CALLBACKS, spec) for spec in cfg.train.callbacks),
    ]


def check_references(cfg: Config, allowed: Iterable[str] = ()) -> None:
    """Refuse a config from the dashboard that names code nobody allowed: a one-line ConfigError naming the key.

    A stored config is data anyone with the API may write, so it may name registered names (built-ins and those of
    modules the process imported on an operator's --allow-import) and import paths under an allowed module only.
    The CLI and the Python API do not call this: there the config is the user's own code.
    """
    allowed = tuple(allowed)
    for registry, spec in references(cfg):
        module, colon, attr = spec.partition(":")
        if spec in registry.entries or (colon and attr and any(module == a or module.startswith(a + ".") for a in allowed)):
            continue
        known = ", ".join(sorted(registry.entries)) or "none"
        raise ConfigError(
            f"{registry.key}: '{spec}' is not a registered {registry.what}; registered: {known} "
            "(an operator can allow a module with --allow-import)"
        )
