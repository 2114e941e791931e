"""data.decode: gpu. Workers only read JPEG bytes; here they are decoded in one batch with nvjpeg, then resized and
cropped on the device with the same seeded transforms as the CPU path."""

from __future__ import annotations

import logging

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from utp_dist.data import Encoded, EncodedBatch, bad_image, decode, keyed_transform

log = logging.getLogger(__name__)


class PassThrough:
    """data.decode: cpu: batches arrive decoded; nothing to do."""

    cpu_fallbacks = 0

    def __call__(self, images, labels):
        """Return the batch unchanged."""
        return images, labels


class DeviceDecoder:
    """Decode a batch of Encoded JPEGs on `device`, transform each as its split does, stack with the CPU-decoded rest."""

    def __init__(self, device: torch.device, transform: v2.Transform, seed: int, random: bool, on_bad_image: str):
        self.device, self.transform, self.seed, self.random, self.on_bad_image = device, transform, seed, random, on_bad_image
        self.cpu_fallbacks = 0
        """JPEGs the device decoder refused (e.g. CMYK or progressive on some nvjpeg versions), decoded on the CPU."""

    def __call__(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 batch on the device, labels); unreadable files follow data.on_bad_image."""
        if not isinstance(images, EncodedBatch):
            return images, labels
        encoded = [item for item in images.items if isinstance(item, Encoded)]
        decoded = dict(zip(map(id, encoded), self._decode_all(encoded), strict=True))
        out, labels = [], labels.clone()
        for i, item in enumerate(images.items):
            if not isinstance(item, Encoded):  # not a JPEG: the worker decoded and transformed it
                out.append(item.to(self.device, non_blocking=True))
                continue
            image = decoded[id(item)]
            if image is None:
                image, label = bad_image(item.path, RuntimeError("not a decodable JPEG"), self.on_bad_image)
                image, labels[i] = image.to(self.device), label
            out.append(keyed_transform(self.transform, image, self.seed, item.key, self.random))
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


def build_decoder(decode_on: str, device: torch.device, transform: v2.Transform, seed: int, random: bool, on_bad_image: str):
    """The batch decoder of one split: PassThrough for data.decode: cpu."""
    if decode_on == "cpu":
        return PassThrough()
    return DeviceDecoder(device, transform, seed, random, on_bad_image)
