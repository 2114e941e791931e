"""The agent's GPU inventory, as the NVIDIA driver reports it through NVML (index, name, memory), narrowed by --gpus.

An agent offers only GPUs the driver knows: a listed index that does not exist would let a GPU job train on the CPU
and call that a success. Indices are NVML's (nvidia-smi's); the runner sets CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA
numbers them the same way.
"""

from __future__ import annotations

import logging

from utp_dist.errors import UserError

log = logging.getLogger("utp_dist.agent")


def detected() -> list[dict]:
    """Every GPU the driver reports; UserError naming NVML's reason when there is no driver or no GPU to ask."""
    try:
        import pynvml
    except ImportError:
        raise UserError("the nvidia-ml-py package is missing (pip install nvidia-ml-py): it asks the driver which GPUs exist") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise UserError(f"this machine has no NVIDIA GPU (NVML: {err})") from None
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            found.append({"index": index, "name": name.decode() if isinstance(name, bytes) else name, "memory_mb": int(memory) // 2**20})
        return found
    except pynvml.NVMLError as err:
        raise UserError(f"the NVIDIA driver does not answer (NVML: {err})") from None
    finally:
        pynvml.nvmlShutdown()


def inventory(spec: str) -> list[dict]:
    """The GPUs this agent offers: `auto` (all the driver reports, none on a machine without), `none`, or indices like `0,1`."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    if spec == "auto":
        try:
            return detected()
        except UserError as err:  # a CPU machine: it serves CPU jobs
            log.info("--gpus auto: %s; serving CPU jobs only", err)
            return []
    try:
        wanted = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(f"--gpus {spec!r}: use auto, none, or comma-separated GPU indices such as 0,1") from None
    try:
        known = {gpu["index"]: gpu for gpu in detected()}
    except UserError as err:
        raise UserError(f"--gpus {spec}: {err}") from None
    missing = [index for index in wanted if index not in known]
    if missing:
        have = f"GPUs 0-{len(known) - 1}" if len(known) > 1 else "GPU 0" if known else "no GPU"
        raise UserError(f"--gpus {','.join(map(str, missing))}: this machine has {have}")
    if len(set(wanted)) != len(wanted):
        raise UserError(f"--gpus {spec}: a GPU is listed twice")
    return [known[index] for index in wanted]
