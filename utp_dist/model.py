"""Hugging Face image classifier and its image processor, by hub id, local folder or model type."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
from transformers.models.auto import image_processing_auto

from utp_dist.config import ModelConfig
from utp_dist.data.loaders import InputSpec
from utp_dist.errors import UserError, first_line

log = logging.getLogger(__name__)


class ModelError(UserError):
    """The model section names a model that cannot be built or loaded."""


def build_model(cfg: ModelConfig, classes: list[str], image_size: int | None):
    """(model, image_processor) with num_labels and label maps taken from the data."""
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
    overrides = dict(cfg.config)
    # auto leaves the choice to transformers, which takes SDPA wherever the model implements it
    attention = {} if cfg.attention == "auto" else {"attn_implementation": cfg.attention}
    if cfg.pretrained:
        model = _load_pretrained(cfg.flavour, labels, overrides, attention)
        processor = _load_processor(cfg.flavour, model)
    else:
        model_config = _scratch_config(cfg.flavour, labels, overrides)
        if image_size is not None and hasattr(model_config, "image_size") and "image_size" not in overrides:
            model_config.image_size = image_size  # e.g. ViT's position embeddings follow data.image_size
        try:
            model = AutoModelForImageClassification.from_config(model_config, **attention)
        except ValueError as err:
            raise ModelError(f"model.attention: {cfg.attention} is not available for {cfg.flavour}: {first_line(err)}; use auto") from None
        processor = _default_processor(model_config)
    if cfg.freeze_backbone:
        _freeze_backbone(model)
    return model, processor


def input_spec(processor, image_size: int | None) -> InputSpec:
    """Sizes and normalisation the data path must produce for this processor (image_size overrides the size)."""
    size = dict(processor.size)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if image_size is not None:
        pct = getattr(processor, "crop_pct", None) or 1.0
        final = (image_size, image_size)
        resize: int | tuple[int, int] = int(image_size / pct) if pct < 1 else final
    elif size.get("height") and size.get("width"):
        resize = (size["height"], size["width"])
        final = (crop["height"], crop["width"]) if crop else resize
    elif size.get("shortest_edge"):
        edge, pct = size["shortest_edge"], getattr(processor, "crop_pct", None)
        if crop:
            final, resize = (crop["height"], crop["width"]), edge
        elif pct and edge < 384:  # ConvNeXt's rule: resize to edge/crop_pct, then centre-crop to edge
            final, resize = (edge, edge), int(edge / pct)
        else:
            final, resize = (edge, edge), (edge, edge)
    else:
        raise ModelError(f"image processor {type(processor).__name__} has no usable size {size}; set data.image_size")
    mean, std = processor.image_mean, processor.image_std
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
    return InputSpec(size=tuple(final), resize=resize, mean=mean, std=std)


EXACT_INPUT = "utp_dist_training_input"
"""Key of an exported processor that reproduces the training input exactly: its settings alone say how to feed the model."""


def exported_processor(processor, spec: InputSpec):
    """An image processor that turns an image into exactly what training evaluated on: `spec`'s resize (bilinear, as
    training's transform), centre crop, 1/255 rescale and mean/std, whatever the model's own processor defaults say.

    The model's processor class is kept where its settings can say this (ConvNeXt's crop_pct rule, or a class with the
    generic resize and crop); any other is replaced by the generic ViT processor, so transformers.pipeline, predict
    and evaluate see the same pixels."""
    from transformers import ConvNextImageProcessor
    from transformers.image_utils import PILImageResampling

    generic, generic_class = _generic_processor()
    (height, width), pct = spec.size, getattr(processor, "crop_pct", None)
    settings = {
        "do_resize": True,
        "resample": PILImageResampling.BILINEAR,
        "do_center_crop": True,
        "crop_size": {"height": height, "width": width},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "do_convert_rgb": True,  # training decodes every image as RGB (grayscale and palette images too)
        "do_pad": False,
        EXACT_INPUT: asdict(spec),
    }
    if isinstance(spec.resize, int):
        settings["size"] = {"shortest_edge": spec.resize}
    else:
        settings["size"] = {"height": spec.resize[0], "width": spec.resize[1]}
        settings["do_center_crop"] = tuple(spec.resize) != tuple(spec.size)
    cls = type(processor)
    if isinstance(processor, ConvNextImageProcessor) and pct and height == width < 384 and spec.resize == int(height / pct):
        # ConvNeXt's resize: shortest edge to size/crop_pct, then a centre crop to size (below 384 px)
        settings.update(size={"shortest_edge": height}, crop_pct=pct, do_center_crop=False)
    elif not (issubclass(cls, generic) and cls.resize is generic.resize and cls._preprocess is generic._preprocess):
        cls = generic_class
    base = processor.to_dict() if cls is type(processor) else {}
    base.pop("image_processor_type", None)
    return cls.from_dict({**base, **settings})


def _generic_processor():
    """(the base class whose resize and crop follow the settings alone, the generic processor class)."""
    try:
        from transformers import ViTImageProcessor
        from transformers.image_processing_backends import TorchvisionBackend  # transformers 5

        return TorchvisionBackend, ViTImageProcessor
    except ImportError:  # transformers 4: the fast (torchvision) processors
        from transformers import ViTImageProcessorFast
        from transformers.image_processing_utils_fast import BaseImageProcessorFast

        return BaseImageProcessorFast, ViTImageProcessorFast


def _load_pretrained(flavour: str, labels: dict, overrides: dict, attention: dict):
    if not os.path.isdir(flavour) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"model.flavour: '{flavour}' is not a local folder and HF_HUB_OFFLINE=1 forbids downloads")
    try:
        # a head of the wrong size (e.g. ImageNet's 1000 classes) is replaced by a fresh one
        return AutoModelForImageClassification.from_pretrained(flavour, ignore_mismatched_sizes=True, **labels, **overrides, **attention)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.flavour: cannot load pretrained '{flavour}': {first_line(err)}") from None


def _load_processor(flavour: str, model):
    try:
        return AutoImageProcessor.from_pretrained(flavour)
    except (OSError, ValueError):
        log.warning("'%s' has no image processor; using the default one of model type %s", flavour, model.config.model_type)
        return _default_processor(model.config)


def _scratch_config(flavour: str, labels: dict, overrides: dict):
    if Path(flavour).is_dir():
        return AutoConfig.from_pretrained(flavour, **labels, **overrides)
    try:
        defaults = AutoConfig.for_model(flavour)
    except ValueError:
        raise ModelError(
            f"model.flavour: '{flavour}' is neither a local folder nor a known model type "
            "(e.g. resnet, vit, convnext, swin, deit); set model.pretrained=true to load a hub id"
        ) from None
    unknown = [key for key in overrides if not hasattr(defaults, key)]
    if unknown:
        raise ModelError(f"model.config.{unknown[0]}: not a field of the {flavour} config")
    try:
        # passed to the constructor (not set afterwards) so derived fields such as stage names follow
        return AutoConfig.for_model(flavour, **labels, **overrides)
    except (ValueError, TypeError) as err:
        raise ModelError(f"model.config: invalid for {flavour}: {str(err).splitlines()[0]}") from None


def _default_processor(model_config):
    """The model type's own image processor, sized to the model's image_size."""
    entry = image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(model_config.model_type)
    if isinstance(entry, dict):  # transformers 5: {backend: class name}
        entry = entry.get("torchvision") or entry.get("pil")
    elif isinstance(entry, (tuple, list)):
        entry = next((e for e in entry if e), None)
    if entry is None:
        raise ModelError(f"model.flavour: model type '{model_config.model_type}' has no image processor; use another type")
    processor = image_processing_auto.get_image_processor_class_from_name(entry)()
    image_size = getattr(model_config, "image_size", None)
    if isinstance(image_size, int):
        if "shortest_edge" in processor.size and processor.size["shortest_edge"]:
            processor.size = {"shortest_edge": image_size}
        else:
            processor.size = {"height": image_size, "width": image_size}
        if getattr(processor, "do_center_crop", False):
            processor.crop_size = {"height": image_size, "width": image_size}
    return processor


def _freeze_backbone(model) -> None:
    head = _classifier(model)
    for param in model.parameters():
        param.requires_grad = False
    for param in head.parameters():
        param.requires_grad = True


def _classifier(model) -> torch.nn.Module:
    for name in ("classifier", "head", "fc", "score"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters()):
            return module
    raise ModelError(f"model.freeze_backbone: cannot find the classification head of {type(model).__name__}")


def is_convolutional(model: torch.nn.Module) -> bool:
    """More than one Conv2d: a conv net (a ViT's single patch-embedding conv does not count)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1
