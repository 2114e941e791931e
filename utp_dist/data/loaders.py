"""ImageFolder splits with per-class caps, uint8 decoding, transforms, samplers and loaders."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from utp_dist.config import SPLITS, DataConfig
from utp_dist.data.builtin import BUILTIN_PREFIX, materialize
from utp_dist.data.folder_index import Listing, list_splits_once
from utp_dist.errors import UserError
from utp_dist.preemption import STOP_SIGNALS

log = logging.getLogger(__name__)

JPEG_EXTENSIONS = (".jpg", ".jpeg")
PIL_EXTENSIONS = (".bmp", ".tif", ".tiff", ".ppm", ".pgm")  # torchvision.io cannot decode these
IGNORE_LABEL = -100  # cross_entropy's default ignore_index: marks a skipped bad image


class DataError(UserError):
    """The data on disk does not match what the config asks for."""


@dataclass
class InputSpec:
    """How images are sized and normalised for the model (from its image processor)."""

    size: tuple[int, int]
    """Final (height, width) fed to the model."""
    resize: int | tuple[int, int]
    """Eval resize: an int resizes the shorter edge, a pair resizes exactly."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class Splits:
    """Indexed, capped file lists of every split present."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]

    @property
    def name(self) -> str:
        """Data set name used in output folders."""
        return self.root.name

    def fingerprint(self) -> list[tuple[str, int]]:
        """Every (relative path, label) after caps, for hashing the data a run used."""
        cut = len(str(self.root)) + 1  # string slicing: Path.relative_to costs seconds at a million files
        return [(p[cut:], y) for s in SPLITS for p, y in self.samples.get(s, [])]


def resolve_root(root: str) -> Path:
    """The ImageFolder root for `data.root`, materialising builtin: data sets."""
    if root.startswith(BUILTIN_PREFIX):
        try:
            return materialize(root[len(BUILTIN_PREFIX) :])
        except ValueError as err:
            raise DataError(f"data.root: {err}") from None
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"data.root: '{root}' is a file, not a folder; point it at an ImageFolder root with train/ and val/")
    if not path.is_dir():
        raise DataError(f"data.root: folder '{root}' does not exist; point it at an ImageFolder root with train/ and val/")
    return path


def index_splits(cfg: DataConfig, seed: int) -> Splits:
    """List train/val[/test] images (ImageFolder rules, listed once per job), take the class list from train and apply
    the per-class caps."""
    root = resolve_root(cfg.root)
    try:
        listings = list_splits_once(root, SPLITS)
    except OSError as err:
        raise DataError(f"data.root: {err}") from None
    for split in ("train", "val"):
        if split not in listings:
            raise DataError(f"data.root: '{root / split}' is missing; an ImageFolder root needs train/ and val/ folders")
    classes = listings["train"].classes
    if not classes:
        raise DataError(f"data.root: '{root / 'train'}' has no class folders")
    if len(classes) < 2:  # found now, not as a metrics traceback after the first epoch
        raise DataError(f"data.root: '{root / 'train'}' has one class folder ('{classes[0]}'); a classifier needs at least two classes")
    ambiguous = cfg.ambiguous_cap(classes)
    if ambiguous:
        raise DataError(ambiguous)
    samples = {}
    for split, listing in listings.items():
        samples[split] = _index_split(root / split, listing, classes, cfg.cap_for(split), seed)
        if not samples[split]:  # found now, not after a training epoch
            raise DataError(f"data.root: '{root / split}' holds no images in its class folders; add images or remove the folder")
    return Splits(root, classes, samples)


def _index_split(folder: Path, listing: Listing, classes: list[str], cap: int | dict | None, seed: int) -> list[tuple[str, int]]:
    extra = [c for c in listing.classes if c not in classes]
    if extra:
        raise DataError(f"data.root: class '{extra[0]}' in '{folder}' does not exist in train/; add it to train or remove it")
    check_cap_classes(cap, classes)
    samples = []
    for label, name in enumerate(classes):
        prefix = f"{folder / name}{os.sep}"
        files = [prefix + rel for rel in listing.files.get(name, [])]
        if not files and folder.name == "train":
            raise DataError(f"data.root: class folder '{folder / name}' has no images (in it or its sub-folders)")
        samples += [(f, label) for f in cap_files(files, cap, seed, folder.name, name)]
    return samples


def check_cap_classes(cap: int | dict | None, classes: list[str]) -> None:
    """A per-class cap may only name classes of the data (one line listing them otherwise)."""
    unknown = [c for c in cap if c not in classes] if isinstance(cap, dict) else []
    if unknown:
        raise DataError(f"data.max_datapoints_per_class: class '{unknown[0]}' is not in the data; classes are {', '.join(classes)}")


def cap_files(files: list[str], cap: int | dict | None, seed: int, split: str, name: str) -> list[str]:
    """At most the cap of class `name` of its files: a seeded subset by (seed, split, class), the same on every run and rank."""
    limit = cap.get(name) if isinstance(cap, dict) else cap
    if limit is None or len(files) <= limit:
        return files
    return sorted(random.Random(f"{seed}/{split}/{name}").sample(sorted(files), limit))


def decode(path: str) -> torch.Tensor:
    """Read any supported image as a uint8 RGB tensor (C, H, W)."""
    if path.lower().endswith(PIL_EXTENSIONS):
        with Image.open(path) as img:
            return v2.functional.pil_to_tensor(img.convert("RGB"))
    image = decode_image(read_file(path), mode=ImageReadMode.RGB)
    if image.ndim == 4:  # an animated GIF: its first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


class ImageFolderSplit(Dataset):
    """One split as uint8 tensors; items are keyed by (epoch, index) so augmentation is reproducible.

    With `encoded_jpeg`, JPEG files are returned as their bytes (Encoded) for batched decoding on the GPU;
    other formats are still decoded and transformed here.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: v2.Transform,
        seed: int,
        on_bad_image: str,
        randomized: bool,
        encoded_jpeg: bool = False,
    ):
        self.samples, self.transform, self.seed, self.on_bad_image = samples, transform, seed, on_bad_image
        self.randomized = randomized  # the transform draws random numbers: reseed it per sample
        self.encoded_jpeg = encoded_jpeg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | Encoded, int]:
        epoch, index = key
        path, label = self.samples[index]
        try:
            if self.encoded_jpeg and path.lower().endswith(JPEG_EXTENSIONS):
                return Encoded(read_file(path), path, key), label
            image = decode(path)
        except (RuntimeError, OSError, ValueError) as err:
            image, label = bad_image(path, err, self.on_bad_image)
        return keyed_transform(self.transform, image, self.seed, key, self.randomized), label


@dataclass
class Encoded:
    """A JPEG file's bytes, decoded later on the device; its (epoch, index) key seeds its random crop."""

    data: torch.Tensor
    path: str
    key: tuple[int, int]


def bad_image(path: str, err: Exception, on_bad_image: str) -> tuple[torch.Tensor, int]:
    """Per data.on_bad_image: raise a one-line DataError, or a placeholder that loss and metrics ignore."""
    err = _unreadable(path) or err
    if on_bad_image == "error":
        raise DataError(f"cannot decode image '{path}' ({err}); fix or delete it, or set data.on_bad_image=skip") from None
    log.warning("skipping unreadable image %s: %s", path, err)
    # a placeholder keeps batch shapes and eval counts exact; its label is ignored by loss and metrics
    return torch.zeros(3, 8, 8, dtype=torch.uint8), IGNORE_LABEL


def _unreadable(path: str) -> str | None:
    """Why the file cannot even be opened ('permission denied'), in words torchvision's reader does not give."""
    try:
        open(path, "rb").close()
    except OSError as err:
        return err.strerror.lower() if err.strerror else str(err)
    return None


def keyed_transform(transform: v2.Transform, image: torch.Tensor, seed: int, key: tuple[int, int], randomized: bool) -> torch.Tensor:
    """Apply `transform`; a random one draws from the CPU generator seeded by (seed, epoch, index), then restored."""
    if not randomized:
        return transform(image)
    # augmentation randomness depends only on (seed, epoch, index): not on workers, iterator state or the device.
    # The CPU generator alone: torch.manual_seed would also queue CUDA seeding (~150 us per image).
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(hash((seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
    try:
        return transform(image)
    finally:
        generator.set_state(saved)  # the caller's RNG stream (in-process loading) is left untouched


class EpochSampler(Sampler):
    """Seeded per-epoch order (identical on every rank), cut to whole global batches when asked."""

    def __init__(self, length: int, seed: int, shuffle: bool, multiple_of: int = 1):
        self.length, self.seed, self.shuffle, self.multiple_of = length, seed, shuffle, multiple_of
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of `epoch` (accelerate's DataLoaderShard.set_epoch calls this on every iteration)."""
        self.epoch = epoch

    def skip_once(self, samples: int) -> None:
        """Leave out the first `samples` of the next iteration only (trained before a resume)."""
        self.skip = samples

    def __len__(self) -> int:
        return self.length - self.length % self.multiple_of - self.skip

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.length))
        start, end = self.skip, self.skip + len(self)
        self.skip = 0
        return iter([(self.epoch, i) for i in order[start:end]])


class CenterCrop:
    """A centre crop whose offset rounds down, as transformers' image processors place it (torchvision's rounds to the
    nearest pixel), so the exported processor crops the very pixels training evaluated on."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """The centre (height, width) of `image`; one smaller than that is padded as torchvision does."""
        (height, width), (crop_h, crop_w) = image.shape[-2:], self.size
        if crop_h > height or crop_w > width:
            return v2.functional.center_crop(image, list(self.size))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return image[..., top : top + crop_h, left : left + crop_w]


def build_transforms(spec: InputSpec, augment: str) -> tuple[v2.Transform, v2.Transform]:
    """(train, eval) transforms on uint8 tensors; normalisation happens later, on the device. Only a
    `standard` train transform is random."""
    eval_tf = v2.Compose([v2.Resize(spec.resize, antialias=True), CenterCrop(spec.size)])
    if augment == "none":
        return eval_tf, eval_tf
    train_tf = v2.Compose([v2.RandomResizedCrop(spec.size, antialias=True), v2.RandomHorizontalFlip()])
    return train_tf, eval_tf


def build_loader(
    dataset: ImageFolderSplit, cfg: DataConfig, seed: int, train: bool, world_size: int, pin_memory: bool
) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader (not yet sharded; accelerate.prepare shards it) and its sampler."""
    batch = cfg.batch_size if train else (cfg.eval_batch_size or 2 * cfg.batch_size)
    # training drops the last partial *global* batch so every rank gets the same number of batches
    sampler = EpochSampler(len(dataset), seed, shuffle=train, multiple_of=batch * world_size if train else 1)
    workers = cfg.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch, drop_last=False),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_encoded if dataset.encoded_jpeg else None,
    )
    return loader, sampler


@dataclass
class SplitLoader:
    """One split's loader, its sampler, and the transform its images get (a random one only when `randomized`)."""

    loader: DataLoader
    sampler: EpochSampler
    transform: v2.Transform
    randomized: bool


def build_loaders(splits: Splits, spec: InputSpec, cfg: DataConfig, seed: int, world_size: int, pin_memory: bool) -> dict[str, SplitLoader]:
    """A loader per split present: train with the training transform, the others with the eval one."""
    train_tf, eval_tf = build_transforms(spec, cfg.augment)
    loaders = {}
    for split, samples in splits.samples.items():
        train = split == "train"
        randomized = train and cfg.augment != "none"
        transform = train_tf if randomized else eval_tf
        dataset = ImageFolderSplit(samples, transform, seed, cfg.on_bad_image, randomized, cfg.decode == "gpu")
        loaders[split] = SplitLoader(*build_loader(dataset, cfg, seed, train, world_size, pin_memory), transform, randomized)
    return loaders


@dataclass
class EncodedBatch:
    """A batch of Encoded JPEGs and already-decoded images, packed into one uint8 tensor. A DataLoader worker hands
    each tensor it returns to the main process through a file descriptor of its own; one tensor per image
    (14 workers x 2 batches ahead x 128 images) outran the usual limit of 1,024 open files, and the loader hung
    ('Bad file descriptor' in the worker). It has no .to(): Accelerate's device placement leaves it on the host,
    where nvjpeg wants the bytes."""

    packed: torch.Tensor
    shapes: list[torch.Size]
    sources: list[tuple[str, tuple[int, int]] | None]  # per image: a JPEG's (path, key), or None for decoded pixels

    @classmethod
    def pack(cls, items: list) -> EncodedBatch:
        """One batch from dataset items (Encoded or uint8 image tensors)."""
        tensors = [item.data if isinstance(item, Encoded) else item for item in items]
        if any(t.dtype != torch.uint8 for t in tensors):  # torch.cat would silently promote every image's bytes
            raise TypeError(f"data.decode: gpu batches carry uint8 tensors, got {sorted({str(t.dtype) for t in tensors})}")
        packed = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0, dtype=torch.uint8)
        sources = [(item.path, item.key) if isinstance(item, Encoded) else None for item in items]
        return cls(packed, [t.shape for t in tensors], sources)

    def unpack(self) -> list:
        """Per image, in batch order: an Encoded with its bytes, or the decoded image; both views into `packed`."""
        views = self.packed.split([s.numel() for s in self.shapes])
        return [
            Encoded(view, *source) if source else view.view(shape)
            for view, shape, source in zip(views, self.shapes, self.sources, strict=True)
        ]


def collate_encoded(batch: list) -> tuple[EncodedBatch, torch.Tensor]:
    """(EncodedBatch, labels) for a data.decode: gpu loader."""
    return EncodedBatch.pack([item for item, _ in batch]), torch.tensor([label for _, label in batch])


def _outlive_stop_signals() -> None:
    """Keep this worker alive through stop signals sent to the whole process group, which the main process answers.

    scancel, timeout, systemd and a terminal's Ctrl-C signal every process of the job, workers included; a worker
    that died of it would fail the very save the signal asks for. Ignoring the signals outright would also ignore
    the main process's own shutdown of its workers (multiprocessing's terminate() is a SIGTERM, and its exit joins
    the worker), so one thread takes them all and ends the worker only when its parent sent the signal.
    """
    signals = {*STOP_SIGNALS, signal.SIGINT}
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)  # a fork inherits the main process's handlers; the default ends the worker
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # blocked in every thread: only sigwaitinfo below receives them
    parent = os.getppid()

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(signals)
            if info.si_pid == parent:
                # the parent ends its workers (terminate() at its exit or shutdown): end quietly, with code 0, so torch's
                # SIGCHLD check in the parent never reports this as a worker "killed by signal" over the real error
                os._exit(0)

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


def _seed_worker(worker_id: int) -> None:
    _outlive_stop_signals()
    # numpy/python RNGs in workers follow torch's per-worker seed, so any library using them is reproducible
    import numpy as np

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
