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
    used = (handle + 1) * 2**30
    return SimpleNamespace(total=80 * 2**30, free=80 * 2**30 - used, used=used)


# readings for the system metrics: GPU i is 10*(i+1) % busy, uses (i+1) GiB, draws 100+i W and is at 40+i degrees;
# $UTP_TEST_FAKE_NO_POWER lists GPUs without a power sensor (NVML answers "Not Supported", as on some boards)
NVML_TEMPERATURE_GPU = 0


def nvmlDeviceGetHandleByUUID(uuid: str) -> int:
    if not uuid.startswith("GPU-fake-"):
        raise NVMLError("Not Found")
    return nvmlDeviceGetHandleByIndex(int(uuid.removeprefix("GPU-fake-")))


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=10 * (handle + 1), memory=5)


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    if str(handle) in os.environ.get("UTP_TEST_FAKE_NO_POWER", "").split(","):
        raise NVMLError("Not Supported")
    return (100 + handle) * 1000  # milliwatts


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return 40 + handle
