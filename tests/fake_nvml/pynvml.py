"""A stand-in for nvidia-ml-py's `pynvml`, for agent processes of the tests (PYTHONPATH puts this folder first).

It reports $UTP_TEST_FAKE_GPUS GPUs (0: NVML finds no driver, as on this CPU-only machine), so the agent's check of
--gpus against the driver runs for real; the product never looks for it.
"""

from __future__ import annotations

import os
from types import SimpleNamespace


class NVMLError(Exception):
    """pynvml's error type."""


def _count() -> int:
    return int(os.environ.get("UTP_TEST_FAKE_GPUS", "0"))


def nvmlInit() -> None:
    if not _count():
        raise NVMLError("NVML Shared Library Not Found")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return _count()


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < _count():
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return "Fake GPU"


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    return SimpleNamespace(total=80 * 2**30, free=80 * 2**30, used=0)
