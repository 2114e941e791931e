"""Run naming and race-free creation of a run's log and checkpoint folders."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from utp_dist.config import Config
from utp_dist.errors import UserError


@dataclass(frozen=True)
class RunPaths:
    """The folders one run writes to."""

    name: str
    logs: Path
    checkpoints: Path


def base_name(cfg: Config) -> str:
    """The run name before versioning: model_flavour__loss__pretrained-or-scratch[__suffix], file-system safe."""
    if cfg.output.run_name:
        return sanitize(cfg.output.run_name, "output.run_name")
    flavour = cfg.model.flavour.rstrip("/\\")
    if os.path.isdir(flavour):  # a local folder is named by its last component, not its whole path
        flavour = Path(flavour).name
    parts = [flavour.replace("/", "_"), cfg.train.loss, "pretrained" if cfg.model.pretrained else "scratch"]
    if cfg.output.suffix:
        parts.append(cfg.output.suffix)
    return sanitize("__".join(parts), "output.suffix")


def sanitize(name: str, key: str) -> str:
    """Keep letters, digits, '.', '_', '-' and '=' ; never a path or a hidden name."""
    clean = re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip(".-")
    if not clean:
        raise UserError(f"{key}: '{name}' leaves no usable run name; use letters, digits, '.', '_' or '-'")
    return clean[:200]


MAX_VERSIONS = 10_000


def versions(name: str):
    """NAME, NAME-v1, NAME-v2, ...: the names a new run (or sweep) tries in turn."""
    yield name
    yield from (f"{name}-v{version}" for version in range(1, MAX_VERSIONS))


def is_version_of(name: str, candidate: str) -> bool:
    """Whether `candidate` is NAME or NAME-vN (and not NAME-other)."""
    return re.fullmatch(rf"{re.escape(name)}(-v\d+)?", candidate) is not None


def create_run(root: str | os.PathLike, dataset: str, name: str) -> RunPaths:
    """Claim logs/DATASET/NAME (or NAME-v1, -v2, ...) with an atomic mkdir, so concurrent starts never share one."""
    logs_parent = Path(root) / "logs" / dataset
    ckpt_parent = Path(root) / "checkpoints" / dataset
    try:
        logs_parent.mkdir(parents=True, exist_ok=True)
        ckpt_parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output.root: cannot create '{logs_parent}': {err.strerror}") from None
    for candidate in versions(name):
        try:
            (logs_parent / candidate).mkdir()
        except FileExistsError:
            continue
        try:
            (ckpt_parent / candidate).mkdir()
        except FileExistsError:  # checkpoints without logs: leave them alone and take the next name
            (logs_parent / candidate).rmdir()
            continue
        return RunPaths(candidate, logs_parent / candidate, ckpt_parent / candidate)
    raise UserError(f"output.run_name: {MAX_VERSIONS:,} runs named '{name}' already exist in '{logs_parent}'; choose another name")
