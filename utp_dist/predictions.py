"""The predictions behind the numbers: at each evaluation the main process keeps a fixed, seeded sample of validation
images with their label, prediction and confidence (most-confused pairs first), and a per-class table of every split.

Files (RunDir.predictions): `images/NNNNN.png`, one thumbnail per sampled image (as the model saw it, at most
THUMB_PX a side), and `SPLIT_epochNNN.json` / `test.json` per evaluation. TensorBoard gets the sample as an image grid.
The sample is drawn from its own numpy generator and predicted by the unwrapped model on the main process alone, so it
consumes none of the training's random numbers and adds no collective: training numbers and resumes are unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image, ImageDraw

from utp_dist.data.loaders import decode
from utp_dist.store import atomic
from utp_dist.store.run_dir import RunDir

log = logging.getLogger(__name__)
THUMB_PX, GRID_COLUMNS, CAPTION_PX = 96, 8, 12


def pick(count: int, wanted: int, seed: int) -> list[int]:
    """`wanted` indices out of `count`, the same for a seed on every run and resume (a generator of their own)."""
    rng = np.random.default_rng([seed, 0x5EED])
    return sorted(rng.choice(count, size=min(wanted, count), replace=False).tolist())


def per_class(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows true, columns predicted);
    None where a ratio is 0/0 (a class never predicted has no precision)."""
    matrix = confusion.double()
    hits, predicted, support = matrix.diag(), matrix.sum(0), matrix.sum(1)
    rows = []
    for i, name in enumerate(classes):
        precision = (hits[i] / predicted[i]).item() if predicted[i] else None
        recall = (hits[i] / support[i]).item() if support[i] else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if precision == 0 or recall == 0 else None)
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(support[i])})
    return rows


def most_confused_first(samples: list[dict], confusion: torch.Tensor) -> list[dict]:
    """Wrong predictions first, those of the pairs (true, predicted) the whole split confuses most leading, each
    pair's most confident first; then the right ones, least confident first."""
    matrix = confusion.tolist()

    def key(sample: dict):
        wrong = sample["label"] != sample["predicted"]
        pair = matrix[sample["label"]][sample["predicted"]] if wrong else 0
        return (not wrong, -pair, -sample["confidence"] if wrong else sample["confidence"], sample["index"])

    return sorted(samples, key=key)


class Predictions:
    """The main process's recorder: predicts the sample after each val evaluation and writes the files and grid."""

    def __init__(self, run: RunDir, tracker, samples: list[tuple[str, int]], transform, wanted: int, seed: int, classes: list[str]):
        self.run, self.tracker, self.classes = run, tracker, classes
        self.indices = pick(len(samples), wanted, seed)
        self.samples, self.transform = samples, transform
        self.images: torch.Tensor | None = None  # the sample as uint8 model inputs, decoded at the first evaluation

    def _load(self) -> torch.Tensor:
        """The sample as the eval transform makes it (a deterministic one: no random numbers); unreadable files are dropped."""
        images, kept = [], []
        for index in self.indices:
            try:
                images.append(self.transform(decode(self.samples[index][0])))
                kept.append(index)
            except (RuntimeError, OSError, ValueError) as err:
                log.warning("predictions: leaving out %s (%s)", self.samples[index][0], err)
        self.indices = kept
        return torch.stack(images) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)

    @torch.no_grad()
    def record(self, split: str, epoch: int, step: int, confusion: torch.Tensor, model, model_input) -> None:
        """Write the per-class table of `split`, and for val the sample's predictions, thumbnails and TensorBoard grid."""
        name = f"{split}_epoch{epoch:03d}" if split == "val" else split
        record = {"split": split, "epoch": epoch, "step": step, "classes": self.classes, "confusion": confusion.tolist()}
        record["per_class"] = per_class(confusion, self.classes)
        record["samples"] = []
        if split == "val" and self.indices:
            if self.images is None:
                self.images = self._load()
                self._thumbnails()
            record["samples"] = most_confused_first(self._predict(model, model_input), confusion)
            self.tracker.log_image("val/predictions", self._grid(record["samples"]), step)
        self.run.predictions.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.run.predictions / f"{name}.json", record, indent=None)

    def _predict(self, model, model_input) -> list[dict]:
        was_training = model.training
        model.eval()
        probs = []
        for batch in self.images.split(64):
            pixels = model_input(batch.to(model_input.mean.device))
            probs.append(model(pixel_values=pixels).logits.float().softmax(-1).cpu())
        model.train(was_training)
        confidence, predicted = torch.cat(probs).max(-1)
        return [
            {
                "index": index,
                "image": self.thumbnail_name(index),
                "label": self.samples[index][1],
                "predicted": int(p),
                "confidence": round(float(c), 4),
            }
            for index, p, c in zip(self.indices, predicted, confidence, strict=True)
        ]

    @staticmethod
    def thumbnail_name(index: int) -> str:
        return f"images/{index:05d}.png"

    def _thumbnails(self) -> None:
        folder = self.run.predictions / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in zip(self.indices, self.images, strict=True):
            path = self.run.predictions / self.thumbnail_name(index)
            if not path.exists():  # the same images every evaluation and every resume: written once
                _thumb(image).save(path)

    def _grid(self, samples: list[dict]) -> np.ndarray:
        """The sample as one HWC uint8 image: each thumbnail with 'true > predicted confidence' under it (red when wrong)."""
        position = {index: i for i, index in enumerate(self.indices)}
        rows = -(-len(samples) // GRID_COLUMNS)
        tile_h = THUMB_PX + CAPTION_PX
        grid = Image.new("RGB", (GRID_COLUMNS * THUMB_PX, rows * tile_h), "white")
        draw = ImageDraw.Draw(grid)
        for i, sample in enumerate(samples):
            x, y = (i % GRID_COLUMNS) * THUMB_PX, (i // GRID_COLUMNS) * tile_h
            grid.paste(_thumb(self.images[position[sample["index"]]]).resize((THUMB_PX, THUMB_PX)), (x, y))
            wrong = sample["label"] != sample["predicted"]
            text = f"{self.classes[sample['label']][:6]}>{self.classes[sample['predicted']][:6]} {sample['confidence']:.2f}"
            draw.text((x + 2, y + THUMB_PX), text, fill=(200, 0, 0) if wrong else (0, 110, 0))
        return np.asarray(grid)


def _thumb(image: torch.Tensor) -> Image.Image:
    thumb = Image.fromarray(image.permute(1, 2, 0).numpy())
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    return thumb


class NullPredictions:
    """The recorder of every process but the main one."""

    def record(self, *args, **kwargs) -> None:
        pass


def build_predictions(run: RunDir, tracker, samples: list, transform, wanted: int, seed: int, classes: list[str], main: bool):
    """The main process's recorder (with an empty sample when `wanted` is 0: per-class tables only); a do-nothing one elsewhere."""
    return Predictions(run, tracker, samples, transform, wanted, seed, classes) if main else NullPredictions()
