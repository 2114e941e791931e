"""Model FLOPs per trained image (counted once, on the meta device) and the peak FLOP/s that MFU divides by."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# dense bf16/fp16 tensor-core peaks (TFLOP/s) of common GPUs, from the vendors' data sheets; the first match wins
KNOWN_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def train_flops_per_image(model: torch.nn.Module, size: tuple[int, int]) -> float | None:
    """Forward + backward FLOPs of one image, counted on a meta-device twin: no memory, no RNG draws, no BN updates."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            twin = type(model)(model.config)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        for name, param in twin.named_parameters():
            param.requires_grad_(name not in frozen)  # a linear probe has no backward through the frozen backbone
        pixels = torch.zeros(2, 3, *size, device="meta")
        with FlopCounterMode(display=False) as counter:
            twin(pixel_values=pixels).logits.float().sum().backward()
        return counter.get_total_flops() / 2
    except Exception as err:  # a model the counter cannot trace only loses its MFU figure, never the run
        log.warning("cannot count the model's FLOPs (%s: %s); MFU is not reported", type(err).__name__, err)
        return None


def peak_tflops(configured: float | None, device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s of one device: the configured value, else the known bf16/fp16 peak of this GPU; None if unknown."""
    if configured is not None:
        return configured
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_PEAK_TFLOPS if key in name), None)
