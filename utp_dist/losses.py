"""The built-in losses of `train.loss` and the one place a run's loss is built.

A loss is `fn(logits, targets, **options)`. Targets are class indices (IGNORE_LABEL marks a skipped image) or, after a
batch transform such as MixUp, class probabilities (a row of zeros marks a skipped image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from utp_dist.config import ConfigError, TrainConfig
from utp_dist.data.batch_transforms import as_probabilities
from utp_dist.data.loaders import IGNORE_LABEL
from utp_dist.registry import LOSSES, bind_options


def build_loss(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """train.loss with train.loss_options (and train.label_smoothing, when set) bound."""
    options = {**cfg.loss_options, **({"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {})}
    return bind_options(LOSSES.get(cfg.loss), options, "train.loss_options", None, None)


def checked_loss(value: object, name: str) -> torch.Tensor:
    """`value` when it is one number (a 0-dim tensor) that backward() can start from; else a ConfigError naming train.loss."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return value
    got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a value of type {type(value).__name__}"
    raise ConfigError(f"train.loss: '{name}' returned {got}; a loss returns one number as a 0-dim tensor, e.g. the mean over the batch")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """torch's cross-entropy on class indices; probability targets (MixUp/CutMix) go to soft_cross_entropy."""
    if targets.is_floating_point():
        return soft_cross_entropy(logits, targets, label_smoothing)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, ignore_index=IGNORE_LABEL)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class probabilities (timm's SoftTargetCrossEntropy), averaged over images that have a target."""
    # not torch's probability targets: they would count skipped images (rows of zeros) in the mean and smooth them
    return focal(logits, targets, gamma=0.0, label_smoothing=label_smoothing)


def focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax focal loss (Lin et al., 2017): cross-entropy weighted by (1 - p)^gamma, so easy images count less."""
    probs = as_probabilities(targets, logits.shape[-1], label_smoothing)
    log_p = logits.log_softmax(-1)
    weighted = probs * (1 - log_p.exp()).pow(gamma) if gamma else probs
    has_target = probs.sum(-1) > 0  # skipped images have none: they add nothing and do not count
    return -(weighted * log_p).sum() / has_target.sum().clamp(min=1)
