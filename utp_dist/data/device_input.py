"""A batch's whole way on the device, in one place: decoding (data.decode: gpu: workers only read JPEG bytes, nvjpeg
decodes whole batches with the same seeded transforms as the CPU path), Kornia augmentation (data.gpu_augment),
uint8 -> float, normalisation and the model's memory format. The trainer calls DeviceInput once per batch."""

from __future__ import annotations

import logging

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from utp_dist.config import DataConfig
from utp_dist.data.loaders import Encoded, EncodedBatch, InputSpec, SplitLoader, bad_image, decode, keyed_transform
from utp_dist.errors import UserError

log = logging.getLogger(__name__)


class PassThrough:
    """data.decode: cpu: batches arrive decoded; nothing to do."""

    cpu_fallbacks = 0

    def __call__(self, images, labels):
        """Return the batch unchanged."""
        return images, labels


class DeviceDecoder:
    """Decode a batch of Encoded JPEGs on `device`, transform each as its split does, stack with the CPU-decoded rest."""

    def __init__(self, device: torch.device, transform: v2.Transform, seed: int, randomized: bool, on_bad_image: str):
        self.device, self.transform, self.seed, self.randomized, self.on_bad_image = device, transform, seed, randomized, on_bad_image
        self.cpu_fallbacks = 0
        """JPEGs the device decoder refused (e.g. CMYK or progressive on some nvjpeg versions), decoded on the CPU."""

    def __call__(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 batch on the device, labels); unreadable files follow data.on_bad_image."""
        if not isinstance(images, EncodedBatch):
            return images, labels
        items = images.unpack()
        encoded = [item for item in items if isinstance(item, Encoded)]
        decoded = dict(zip(map(id, encoded), self._decode_all(encoded), strict=True))
        out, labels = [], labels.clone()
        for i, item in enumerate(items):
            if not isinstance(item, Encoded):  # not a JPEG: the worker decoded and transformed it
                out.append(item.to(self.device, non_blocking=True))
                continue
            image = decoded[id(item)]
            if image is None:
                image, label = bad_image(item.path, RuntimeError("not a decodable JPEG"), self.on_bad_image)
                image, labels[i] = image.to(self.device), label
            out.append(keyed_transform(self.transform, image, self.seed, item.key, self.randomized))
        return torch.stack(out), labels

    def _decode_all(self, encoded: list[Encoded]) -> list[torch.Tensor | None]:
        """One batched decode; if it fails, file by file, then on the CPU; None for a file nothing can read."""
        if not encoded:
            return []
        try:
            return decode_jpeg([e.data for e in encoded], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return [self._decode_one(e) for e in encoded]

    def _decode_one(self, item: Encoded) -> torch.Tensor | None:
        try:
            return decode_jpeg(item.data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            image = decode(item.path).to(self.device)
        except (RuntimeError, OSError, ValueError):
            return None
        self.cpu_fallbacks += 1
        log.warning("decoded %s on the CPU: the device decoder refused it", item.path)
        return image


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


class ModelInput(torch.nn.Module):
    """uint8 batch on the device -> (GPU augmentation while training) -> normalised float, in the model's memory format.

    Images travel as uint8 (4x fewer bytes through the loader and the copy); everything else happens here, on the device.
    """

    def __init__(self, spec: InputSpec, augment: torch.nn.Module | None = None, channels_last: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.augment = augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """(augmented) (images - mean) / std in float32."""
        pixels = images.float()
        if augment and self.augment is not None:
            # Kornia works on [0, 1]; the statistics are applied after it, so they stay those of the processor
            pixels = self.augment(pixels / 255).clamp_(0, 1) * 255
        return ((pixels - self.mean) / self.std).contiguous(memory_format=self.memory_format)


class DeviceInput:
    """Per split: decode (a no-op for data.decode: cpu), then augment (training only), normalise and format."""

    def __init__(
        self, cfg: DataConfig, spec: InputSpec, loaders: dict[str, SplitLoader], seed: int, device: torch.device, channels_last: bool
    ):
        if cfg.decode == "gpu" and device.type != "cuda":
            raise UserError(f"data.decode: gpu decodes JPEGs with nvjpeg and needs CUDA; this run is on {device}: set data.decode: cpu")
        self.decoders = {
            split: PassThrough() if cfg.decode == "cpu" else DeviceDecoder(device, s.transform, seed, s.randomized, cfg.on_bad_image)
            for split, s in loaders.items()
        }
        self.model_input = ModelInput(spec, build_gpu_augment(cfg.gpu_augment, spec.size), channels_last).to(device)

    def __call__(self, split: str, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model-ready pixels, labels) of one batch of `split`; only the train split is augmented on the device."""
        images, labels = self.decoders[split](images, labels)
        return self.model_input(images, augment=split == "train"), labels

    @property
    def cpu_fallbacks(self) -> int:
        """JPEGs the device decoder refused and the CPU decoded, over all splits (this rank's)."""
        return sum(decoder.cpu_fallbacks for decoder in self.decoders.values())
