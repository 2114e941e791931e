"""`data.batch_transforms`: transforms of a whole training batch on the device, such as torchvision's MixUp and CutMix.

Per micro-batch, one of the configured transforms is picked (torchvision's RandomChoice, as in its MixUp/CutMix recipe)
and applied to (normalised images, class probabilities). Every random number comes from the CPU generator seeded by
(seed, epoch, micro-batch, rank), so a resumed run draws exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from utp_dist.config import DataConfig
from utp_dist.data.loaders import IGNORE_LABEL, keyed_transform
from utp_dist.registry import BATCH_TRANSFORMS, bind_options


class NoBatchTransform:
    """No batch transforms configured: images and class indices pass unchanged."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the batch as it is."""
        return images, labels


class BatchTransform:
    """One configured transform per micro-batch, seeded by (seed, epoch, micro-batch, rank); labels become probabilities."""

    def __init__(self, transforms: list, num_classes: int, seed: int, rank: int):
        self.choice = v2.RandomChoice(transforms)
        self.num_classes, self.seed, self.rank = num_classes, seed, rank

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(transformed images, class probabilities) of micro-batch `key` = (epoch, position in the epoch)."""
        # probabilities, not indices: a skipped image is a row of zeros, so its share of a mixed target vanishes
        targets = as_probabilities(labels, self.num_classes)
        return keyed_transform(lambda batch: self.choice(*batch), (images, targets), self.seed, (*key, self.rank), True)


def build_batch_transform(cfg: DataConfig, num_classes: int, seed: int, rank: int) -> BatchTransform | NoBatchTransform:
    """The configured batch transforms, each built with its data.batch_transform_options."""
    if not cfg.batch_transforms:
        return NoBatchTransform()
    key = "data.batch_transform_options"
    built = [bind_options(BATCH_TRANSFORMS.get(name), cfg.batch_transform_options.get(name, {}), key)() for name in cfg.batch_transforms]
    return BatchTransform(built, num_classes, seed, rank)


def as_probabilities(targets: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Class indices as one-hot rows (zeros for IGNORE_LABEL); probabilities pass; then label smoothing as torch applies it."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets.clamp(min=0), num_classes).float() * (targets != IGNORE_LABEL).unsqueeze(-1)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + targets.sum(-1, keepdim=True) * (label_smoothing / num_classes)
    return targets
