"""Training augmentation on the device with Kornia: applied to whole batches after the copy, before normalisation."""

from __future__ import annotations

import torch


def build_gpu_augment(names: list[str], size: tuple[int, int]) -> torch.nn.Module | None:
    """A Kornia pipeline of the named ops in order (timm/torchvision defaults); None when the list is empty."""
    if not names:
        return None
    import kornia.augmentation as K

    ops = {
        "random_resized_crop": lambda: K.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        "horizontal_flip": lambda: K.RandomHorizontalFlip(p=0.5),
        "color_jitter": lambda: K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        "grayscale": lambda: K.RandomGrayscale(p=0.2),
    }
    # Kornia draws its parameters from torch's generators, which every training state saves: resume stays exact
    return K.AugmentationSequential(*(ops[name]() for name in names))
