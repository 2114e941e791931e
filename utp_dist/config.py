"""Typed config tree: YAML loading, dotted overrides, validation and dumping."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

import yaml

from utp_dist.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# what TensorBoard's HParams dashboard shows of a run started outside a grid (output.hparams: null)
DEFAULT_HPARAMS = ("model.flavour", "model.pretrained", "optim.lr", "optim.weight_decay", "data.batch_size", "train.epochs", "train.seed")
GPU_AUGMENTS = ("random_resized_crop", "horizontal_flip", "color_jitter", "grayscale")  # built in gpu_augment.py
Cap = int | dict | None


class ConfigError(UserError):
    """A config file or override that cannot be used as written."""


class _Section:
    """Assigning a name that is not a field (cfg.optim.learning_rate = 1e-5) is a ConfigError naming the valid keys, not
    a new attribute that nothing reads."""

    _prefix: ClassVar[str] = ""

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.__dataclass_fields__:
            _check_keys(type(self), {name: value}, self._prefix)
        object.__setattr__(self, name, value)


@dataclass
class DataConfig(_Section):
    """Where the images come from and how they reach the model."""

    _prefix: ClassVar[str] = "data."

    root: str = "builtin:fashion-mnist-mini"
    """ImageFolder root holding train/ val/ [test/], or builtin:fashion-mnist-mini."""
    batch_size: int = 32
    """Images per device per forward pass (global batch = this x world size x grad_accum_steps)."""
    eval_batch_size: int | None = None
    """Images per device for evaluation; null = 2 x batch_size."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int | None = 2
    """Batches each worker loads ahead (ignored when num_workers is 0)."""
    persistent_workers: bool = True
    """Keep workers alive between epochs (ignored when num_workers is 0)."""
    pin_memory: bool | None = None
    """Pin host batches for faster copies; null = on when training on CUDA."""
    max_datapoints_per_class: Cap = None
    """Per-class cap: null, an int, {class: int}, or per split {train: ..., val: ..., test: ...}; explicit forms
    {classes: {class: int}} and {per_split: {split: ...}} for data with a class named train, val or test."""
    augment: Literal["standard", "none"] = "standard"
    """Training augmentation: standard = random-resized-crop + flip; none = resize only."""
    image_size: int | None = None
    """Square input size; null = the image processor's size."""
    on_bad_image: Literal["error", "skip"] = "error"
    """An unreadable image stops the run (error) or is skipped and counted (skip)."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Where JPEGs are decoded: cpu = in the workers; gpu = workers read bytes, nvjpeg decodes whole batches (CUDA)."""
    gpu_augment: list[str] = field(default_factory=list)
    """Augmentation on the device with Kornia, in order: random_resized_crop, horizontal_flip, color_jitter, grayscale."""
    dataset: str = "image_folder"
    """Where the splits come from: image_folder (data.root), a registered dataset or an import path module:attr."""
    batch_transforms: list[str] = field(default_factory=list)
    """Per training batch on the device, one of these (a seeded pick): mixup, cutmix, registered names or import paths."""
    batch_transform_options: dict = field(default_factory=dict)
    """Keyword arguments of each batch transform, e.g. {mixup: {alpha: 0.2}, cutmix: {alpha: 1.0}}."""

    def __post_init__(self) -> None:
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        _positive("data.image_size", self.image_size)
        _positive("data.prefetch_factor", self.prefetch_factor)
        unknown = [name for name in self.gpu_augment if name not in GPU_AUGMENTS]
        if unknown:
            raise ConfigError(f"data.gpu_augment: unknown op '{unknown[0]}'; choose from {', '.join(GPU_AUGMENTS)}")
        if self.gpu_augment and self.augment != "none":
            raise ConfigError("data.gpu_augment replaces the CPU augmentation: set data.augment: none (the loader then only resizes)")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        _check_options("data.batch_transform_options", self.batch_transform_options, self.batch_transforms)
        self.max_datapoints_per_class = _check_caps(self.max_datapoints_per_class)

    def cap_for(self, split: str) -> int | dict | None:
        """The cap for one split: a bare int or {class: int} applies to train only."""
        caps = self.max_datapoints_per_class
        if isinstance(caps, dict) and set(caps) == {"per_split"}:
            return caps["per_split"].get(split)
        if isinstance(caps, dict) and set(caps) == {"classes"}:
            caps = caps["classes"]
        elif _per_split(caps):
            return caps.get(split)
        return caps if split == "train" else None

    def ambiguous_cap(self, classes: list[str]) -> str | None:
        """A one-line error when a bare {split: cap} map names a split that is also a class of the data, else None."""
        caps = self.max_datapoints_per_class
        clash = sorted(set(caps) & set(classes)) if _per_split(caps) else []
        if not clash:
            return None
        name, value = clash[0], caps[clash[0]]
        return (
            f"data.max_datapoints_per_class: {{{name}: {value}}} is ambiguous because the data has a class named '{name}'; "
            f"write {{per_split: {{{name}: {value}}}}} to cap the {name} split, or {{classes: {{{name}: {value}}}}} to cap the class"
        )


@dataclass
class ModelConfig(_Section):
    """Which Hugging Face image classifier to train."""

    _prefix: ClassVar[str] = "model."

    builder: str = "transformers"
    """Builds (model, image processor): transformers (AutoModelForImageClassification), a registered name or module:attr."""
    flavour: str = "resnet"
    """Hub id or local folder (pretrained: true), or a model type such as vit/resnet/convnext."""
    pretrained: bool = False
    """Load weights from flavour; false builds the model from its config with random weights."""
    freeze_backbone: bool = False
    """Train only the classification head (linear probe)."""
    config: dict = field(default_factory=dict)
    """Overrides for the model config, e.g. {hidden_size: 192, patch_size: 4}."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel: auto = PyTorch SDPA where the model supports it; sdpa insists; eager = plain matmuls."""
    channels_last: bool | None = None
    """Channels-last memory format; null = on for convolutional models on CUDA, where it is faster."""


@dataclass
class OptimConfig(_Section):
    """Optimizer, schedule and gradient handling."""

    _prefix: ClassVar[str] = "optim."

    name: Literal["adamw", "adam"] = "adamw"
    """Optimizer; weight decay never applies to biases, norms and other 1-D parameters."""
    lr: float = 1e-3
    """Peak learning rate after warm-up."""
    weight_decay: float = 0.05
    """Decoupled (adamw) or L2 (adam) weight decay on weight matrices and kernels."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null = no clipping."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent in linear warm-up."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up (transformers' schedulers)."""
    grad_accum_steps: int = 1
    """Forward/backward passes per optimizer step."""

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.grad_accum_steps", self.grad_accum_steps)
        _positive("optim.max_grad_norm", self.max_grad_norm)
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainConfig(_Section):
    """Length, precision, loss and what counts as the best model."""

    _prefix: ClassVar[str] = "train."

    epochs: int = 5
    """Passes over the (capped) training set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, even mid-epoch; null = run all epochs."""
    stop_at_epoch: int | None = None
    """Pause after this many epochs: save a state and exit 75 (stopped, resumable) as a stop signal does, the schedule
    still spanning train.epochs, so the same config without it continues exactly; null = no pause."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision; auto = bf16 on CUDA, fp32 on CPU."""
    seed: int = 42
    """Seeds python, numpy, torch, data order, augmentation and the per-class cap."""
    loss: str = "cross_entropy"
    """Training loss: cross_entropy, focal, soft_cross_entropy, a registered name or an import path module:attr."""
    loss_options: dict = field(default_factory=dict)
    """Keyword arguments of the loss, e.g. {gamma: 2.0} for focal."""
    label_smoothing: float = 0.0
    """Label smoothing, passed to the loss (every built-in loss takes it)."""
    eval_topk: list[int] = field(default_factory=lambda: [1])
    """Report acc@K for each K."""
    monitor_metric: str = "val_acc@1"
    """Metric that picks the best checkpoint."""
    monitor_mode: Literal["max", "min"] = "max"
    """Whether a larger (max) or smaller (min) monitor_metric is better."""
    log_every_n_steps: int = 10
    """Optimizer steps between logged training loss/acc/lr points."""
    sync_batchnorm: bool = False
    """Synchronise batch-norm statistics across processes (for batch-norm models under DDP)."""
    compile: bool = False
    """torch.compile the model; a model that fails to compile runs eager after one warning."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; null = the bf16 peak of known GPUs (no MFU on CPU)."""
    metrics: list[str] = field(default_factory=list)
    """Extra metrics of every evaluation, logged as SPLIT_NAME: precision_macro, calibration_error, registered or import paths."""
    callbacks: list[str] = field(default_factory=list)
    """Callbacks that observe the run, by registered name or import path module:attr (see utp_dist/callbacks.py)."""

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.max_steps", self.max_steps)
        _positive("train.stop_at_epoch", self.stop_at_epoch)
        _positive("train.log_every_n_steps", self.log_every_n_steps)
        _positive("train.peak_tflops", self.peak_tflops)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.eval_topk or any(k < 1 for k in self.eval_topk):
            raise ConfigError(f"train.eval_topk must be a non-empty list of K >= 1, got {self.eval_topk}")
        if "label_smoothing" in self.loss_options:
            raise ConfigError("train.loss_options.label_smoothing: set train.label_smoothing instead (the loss receives it)")
        if 1 not in self.eval_topk:
            self.eval_topk = [1, *self.eval_topk]
        self.eval_topk = sorted(set(self.eval_topk))
        produced = metric_names(self.eval_topk, self.metrics)
        if self.monitor_metric not in produced:
            close = difflib.get_close_matches(self.monitor_metric, produced, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"train.monitor_metric '{self.monitor_metric}' is never produced; {hint}choose one of: {', '.join(produced)}")


@dataclass
class OutputConfig(_Section):
    """Where logs, checkpoints and exports go and how the run is named."""

    _prefix: ClassVar[str] = "output."

    root: str = "experiments"
    """Output root: logs/ and checkpoints/ are created below it."""
    project: str | None = None
    """The dashboard project the run is listed under; null = the data set's name. A label only: not part of the
    config's fingerprint."""
    run_name: str | None = None
    """Run name; null = model_flavour__loss__pretrained-or-scratch[__suffix]."""
    suffix: str | None = None
    """Appended to the automatic run name."""
    save_per_epoch_checkpoint: bool = False
    """Also keep the weights of every epoch, not only the best."""
    hparams: list[str] | None = None
    """Dotted keys shown as hyper-parameters in TensorBoard's HParams dashboard; null = DEFAULT_HPARAMS (a grid sets its
    swept keys)."""
    system_every_s: float | None = 10.0
    """Seconds between system samples (GPU utilisation, memory, power, temperature; process CPU and RAM), taken at
    training log points by the first process of each node; 0 = at every log point, null = none."""
    prediction_samples: int = 64
    """Validation images kept with their label, prediction and confidence at each evaluation (a fixed seeded sample,
    shown on the run page); 0 = none."""

    def __post_init__(self) -> None:
        if self.system_every_s is not None and not (0 <= self.system_every_s < math.inf):
            raise ConfigError(f"output.system_every_s must be >= 0 seconds (or null for no system metrics), got {self.system_every_s}")
        if isinstance(self.prediction_samples, bool) or self.prediction_samples < 0:
            raise ConfigError(f"output.prediction_samples must be an int >= 0 (0 = none), got {self.prediction_samples}")
        sections = typing.get_type_hints(Config)  # Config is defined below: looked up when a config is built
        for key in self.hparams or []:
            section, _, name = key.partition(".")
            if section not in sections or name.split(".")[0] not in {f.name for f in dataclasses.fields(sections[section])}:
                raise ConfigError(f"output.hparams: '{key}' is not a config key; use dotted keys such as optim.lr or train.seed")


@dataclass
class CheckpointConfig(_Section):
    """Full training state for exact resume: when to save, how many to keep, what to resume."""

    _prefix: ClassVar[str] = "checkpoint."

    every_n_steps: int | None = None
    """Save the training state every N optimizer steps; null = not by step count."""
    every_n_minutes: float | None = 30.0
    """Save the training state when this many minutes passed since the last save; null = not by time."""
    every_epoch: bool = True
    """Save the training state at the end of every epoch."""
    keep_last: int = 2
    """Complete training states kept (older ones are deleted once a newer one is complete)."""
    resume: str = "auto"
    """auto = continue this config's newest unfinished run if any; never = always a new run; or a state/run PATH."""
    allow_changes: bool = False
    """Resume even when the config or the data differ from the saved state."""

    def __post_init__(self) -> None:
        _positive("checkpoint.every_n_steps", self.every_n_steps)
        _positive("checkpoint.every_n_minutes", self.every_n_minutes)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class Config(_Section):
    """The whole run: one section per component. Sections may be given as dicts, validated exactly as YAML is:
    `Config(data={"root": "data/pets"}, optim={"lr": 3e-4})`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __init__(self, **sections: Any) -> None:  # dataclass keeps an __init__ the class defines
        _check_keys(Config, sections, "")
        hints = typing.get_type_hints(Config)
        for f in dataclasses.fields(Config):
            value, cls = sections.get(f.name), hints[f.name]
            if not isinstance(value, cls):
                value = build_section(cls, value if value is not None else {}, f.name + ".")
            setattr(self, f.name, value)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] = ()) -> Config:
        """A YAML file with dotted overrides such as "optim.lr=3e-4", as `python -m utp_dist.train` reads them."""
        return load_config(path, overrides)

    def to_dict(self) -> dict:
        """Plain nested dict of every field."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable by load_config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, exclude: tuple[str, ...] | None = None) -> str:
        """Stable hash of the resolved config without the dotted keys in `exclude`.

        By default that is what the run is: without the settings a resume may change that leave its result as it is
        (SAME_RUN_IGNORES), so a run continued with checkpoint.resume=PATH or more workers, or started by an agent
        with checkpoint.resume=never, is still the same run to `submit` and `status`.
        """
        exclude = (SAME_RUN_IGNORES if exclude is None else exclude) + LABELS
        flat = {k: v for k, v in flatten(self.to_dict()).items() if not under(k, exclude)}
        return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


# fields that may differ between a saved training state and the run that resumes it
MAY_CHANGE_ON_RESUME = (
    "train.epochs",
    "train.max_steps",
    "train.stop_at_epoch",
    "train.log_every_n_steps",
    "train.callbacks",
    "output",
    "checkpoint",
    "data.num_workers",
    "data.prefetch_factor",
    "data.persistent_workers",
    "data.pin_memory",
    "data.eval_batch_size",
)
# of those, the ones that make a run longer: a run with more epochs is another grid point until it has trained them
RUN_LENGTH = ("train.epochs", "train.max_steps")
SAME_RUN_IGNORES = tuple(key for key in MAY_CHANGE_ON_RESUME if key not in RUN_LENGTH)
# keys that only say where a run is listed: never part of what a run is
LABELS = ("output.project",)


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether dotted `key` is one of `prefixes` or lies below one ("checkpoint.resume" is under "checkpoint")."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def metric_names(topk: list[int], extra: list[str] = ()) -> list[str]:
    """Names of every validation metric the evaluation produces (`extra`: the specs of train.metrics)."""
    names = ["val_loss", *(f"val_acc@{k}" for k in topk)]
    names += [f"val_{m}" for m in ("f1_macro", "map_macro", "auroc_macro", "kappa", "recall_micro", "recall_macro")]
    return names + [f"val_{metric_key(spec)}" for spec in extra]


def metric_key(spec: str) -> str:
    """The name a train.metrics entry is logged under: a registered name, or the attr of an import path module:attr."""
    return spec.rpartition(":")[2]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or none: defaults), apply `key.sub=value` overrides, validate."""
    raw: dict = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw, source)


def from_dict(raw: dict, source: str = "<config>") -> Config:
    """Build and validate a Config from a nested dict."""
    try:
        return build_section(Config, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file whose top level is a mapping; errors name the file and the line."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not a UTF-8 text file"
        raise ConfigError(f"{path}: cannot read the config: {reason}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str = "<config>") -> dict:
    """Config YAML text whose top level is a mapping; errors name `source` and the line."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}:{where}: invalid YAML: {problem}") from None
    if raw is None:
        log.warning("%s is empty: every setting takes its default", source)
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': the value is not valid YAML") from None
    set_dotted(raw, key, value)


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw['a']['b'] = value for key 'a.b', creating mappings on the way."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            # descending into a scalar (e.g. an int cap) replaces it with a mapping
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are ConfigErrors naming `prefix`+key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {_yaml_type(raw)}")
    hints = typing.get_type_hints(cls)
    names = _check_keys(cls, raw, prefix)
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint, value, full = hints[name], raw[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_section(hint, value if value is not None else {}, full + ".")
        else:
            kwargs[name] = _coerce(full, value, hint)
    return cls(**kwargs)


def _check_keys(cls: type, raw: dict, prefix: str) -> list[str]:
    """The field names of dataclass `cls`; a key of `raw` that is none of them is a ConfigError naming the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown key '{full}'; {hint}valid keys: {', '.join(valid)}")
    return names


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the annotation `hint`, accepting ints for floats and '1e-3' strings."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else _type_error(key, value, hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, value, hint)
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, value, hint)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    check = origin or hint
    if not isinstance(value, check) or (check is int and isinstance(value, bool)):
        raise _type_error(key, value, hint)
    return value


def _type_error(key: str, value: Any, hint: Any) -> ConfigError:
    want = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("NoneType", "null")
    return ConfigError(f"{key} must be {want}; got {value!r} ({_yaml_type(value)})")


def _yaml_type(value: Any) -> str:
    return {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


def _check_options(key: str, options: dict, names: list[str]) -> None:
    """A mapping of name -> keyword arguments whose names are all configured."""
    for name, kwargs in options.items():
        if name not in names:
            raise ConfigError(f"{key}.{name}: '{name}' is not configured; configured: {', '.join(names) or 'none'}")
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{key}.{name} must be a mapping of keyword arguments, got {kwargs!r}")


def _positive(key: str, value: float | None) -> None:
    if value is not None and not (0 < value < math.inf):  # also rejects nan and inf
        raise ConfigError(f"{key} must be > 0 and finite, got {value}")


def _check_caps(caps: Any) -> Cap:
    """Validate max_datapoints_per_class in any of its shapes."""

    def count(where: str, cap: Any) -> int:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ConfigError(f"{where} must be an int >= 1, got {cap!r}")
        return cap

    def one(where: str, cap: Any) -> int | dict | None:
        if cap is None:
            return None
        if isinstance(cap, dict):
            return {str(cls_name): count(f"{where}.{cls_name}", n) for cls_name, n in cap.items()}
        if isinstance(cap, int) and not isinstance(cap, bool):
            return count(where, cap)
        raise ConfigError(f"{where} must be null, an int or a mapping of class to int; got {cap!r}")

    def per_split(where: str, caps: dict) -> dict:
        unknown = [k for k in caps if k not in SPLITS]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: not a split; use {', '.join(SPLITS)}")
        return {split: one(f"{where}.{split}", cap) for split, cap in caps.items()}

    key = "data.max_datapoints_per_class"
    if isinstance(caps, dict) and set(caps) == {"per_split"} and isinstance(caps["per_split"], dict):
        return {"per_split": per_split(f"{key}.per_split", caps["per_split"])}
    if isinstance(caps, dict) and set(caps) == {"classes"} and isinstance(caps["classes"], dict):
        return {"classes": one(f"{key}.classes", caps["classes"])}
    if _per_split(caps):
        return per_split(key, caps)
    return one(key, caps)


def _per_split(caps: Any) -> bool:
    """Whether a cap mapping is the bare per-split form {train: ..., val: ..., test: ...}."""
    return isinstance(caps, dict) and bool(caps) and set(caps) <= set(SPLITS)
