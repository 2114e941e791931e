"""A trained model for inference, found from an export folder, a run's checkpoint folder or a run name, and run over
image files in batches through training's decode, eval transform, normalisation and precision."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from utp_dist.config import Config, DataConfig, from_dict
from utp_dist.data.device_input import DeviceDecoder, ModelInput, PassThrough
from utp_dist.data.folder_index import IMAGE_EXTENSIONS
from utp_dist.data.loaders import IGNORE_LABEL, ImageFolderSplit, build_loader, build_transforms
from utp_dist.errors import UserError, first_line
from utp_dist.store.run_dir import RunDir, find_runs

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """The model on its device with what its training used to feed it (the run's config when it is known)."""

    model: torch.nn.Module
    classes: list[str]
    folder: Path
    run: RunDir | None
    config: Config
    """The run's config; defaults (image processor's size, fp32/bf16 by device) for an export without its run."""
    transform: object
    model_input: ModelInput
    device: torch.device

    def autocast(self):
        """The run's mixed precision as training evaluated with it (auto = bf16 on CUDA), or nothing."""
        precision = self.config.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def find_model(model: str, root: str) -> tuple[Path, RunDir | None]:
    """(export folder, its run or None) for MODEL: an export folder, a run's checkpoint folder, or a run name under `root`."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():  # a save_pretrained folder
            return path, RunDir.of_checkpoints(path.resolve().parent)
        run = RunDir.of_checkpoints(path)
        if run is not None and run.best.exists():
            return run.best, run
        raise UserError(f"{model}: neither an export folder (with config.json) nor a run's checkpoint folder with a best model")
    runs = [run for run in find_runs(root, model) if run.best.exists()]
    exact = [run for run in runs if run.name == model] or runs
    if not exact:
        raise UserError(f"{model}: no such folder, and no run of that name with a best model under '{root}' (set --root)")
    if len(exact) > 1:
        listed = ", ".join(str(run.checkpoints) for run in exact)
        raise UserError(f"{model}: several runs match ({listed}); give one checkpoint folder")
    return exact[0].best, exact[0]


def load_model(model: str, root: str, device: str | None = None) -> LoadedModel:
    """Load MODEL onto the GPU when there is one, with the eval transform and input statistics of its training."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from utp_dist.model import EXACT_INPUT, input_spec, is_convolutional

    folder, run = find_model(model, root)
    raw = run.read_config() if run is not None else None
    try:
        config = from_dict(raw, str(run.config_file)) if raw is not None else from_dict({})
    except UserError:  # a run whose config no longer validates (an older version): its export still loads
        log.warning("%s cannot be read as a config; using the image processor's sizes", run.config_file)
        config = from_dict({})
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file: noise around a command's one-line output
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = AutoModelForImageClassification.from_pretrained(folder)
            processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: cannot load the model: {first_line(err)}") from None
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if getattr(processor, EXACT_INPUT, None):  # exported with the training input: the processor alone says it
        spec = input_spec(processor, None)
    else:
        if run is None:
            log.warning(
                "%s: its preprocessor_config.json does not record the training input (an export of an older utp_dist?); "
                "using the image processor's sizes; use it from its run's checkpoint folder, whose config says the input",
                folder,
            )
        spec = input_spec(processor, config.data.image_size)
    classes = [network.config.id2label[i] for i in range(network.config.num_labels)]
    # the memory format training used (channels-last for conv nets on CUDA by default): the same kernels, the same numbers
    channels_last = (
        config.model.channels_last if config.model.channels_last is not None else target.type == "cuda" and is_convolutional(network)
    )
    network.to(target, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    model_input = ModelInput(spec, channels_last=channels_last).to(target)
    return LoadedModel(network, classes, folder, run, config, build_transforms(spec, "none")[1], model_input, target)


@torch.no_grad()
def batches(
    loaded: LoadedModel, samples: list[tuple[str, int]], batch_size: int, workers: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(position of the batch's first sample, logits, labels) per batch, in order; unreadable files get label -100 and
    a warning, and their logits are not to be used."""
    # torchvision 0.29 deprecates torchvision.io image decoding in favour of TorchCodec; it still works
    warnings.filterwarnings("ignore", message=".*image decoding and encoding.*")
    # a data.decode: gpu run evaluated JPEGs decoded by nvjpeg: so does this, where there is a GPU
    gpu_decode = loaded.config.data.decode == "gpu" and loaded.device.type == "cuda"
    dataset = ImageFolderSplit(samples, loaded.transform, 0, "skip", randomized=False, encoded_jpeg=gpu_decode)
    decoder = DeviceDecoder(loaded.device, loaded.transform, 0, False, "skip") if gpu_decode else PassThrough()
    cfg = DataConfig(batch_size=batch_size, eval_batch_size=batch_size, num_workers=workers, prefetch_factor=2 if workers else None)
    loader, _ = build_loader(dataset, cfg, 0, train=False, world_size=1, pin_memory=loaded.device.type == "cuda")
    start = 0
    for images, labels in loader:  # sequential: batch k holds samples start .. start + len(labels) - 1
        images, labels = decoder(images, labels)
        pixels = loaded.model_input(images.to(loaded.device, non_blocking=True))
        with loaded.autocast():
            logits = loaded.model(pixel_values=pixels).logits
        yield start, logits.float(), labels.to(loaded.device)
        start += len(labels)


def image_files(paths: list[str]) -> list[str]:
    """The files named and the images anywhere below the folders named, in order (folders sorted)."""
    files = []
    for item in paths:
        if os.path.isdir(item):
            found = [os.path.join(d, f) for d, names in _walk(item) for f in names]
            files += sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(os.path.relpath(f, item)))
        elif os.path.exists(item):
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not files:
        raise UserError(f"no image files in {', '.join(paths)}")
    return files


def _walk(folder: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) below `folder`, following symbolic links but entering each real folder once: a link to a
    parent (a loop) or a second link to a folder adds nothing."""
    seen = set()
    for path, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(path)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        yield path, names


def _hidden(relative: str) -> bool:
    """Whether a path below a folder passes through a hidden file or folder (.DS_Store, ._x.jpg, .git), as the index skips."""
    return any(part.startswith(".") for part in relative.split(os.sep))


def is_bad(labels: torch.Tensor) -> torch.Tensor:
    """Which samples of a batch could not be read."""
    return labels == IGNORE_LABEL
