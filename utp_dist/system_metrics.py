"""System metrics of a training run: per-GPU utilisation, memory, power and temperature (NVML) and the process's CPU
and RAM (psutil), sampled at training log points by the first process of each node.

Samples go to TensorBoard as `system/...` scalars (through the run's tracker, so only the main process writes events)
and, one JSON line each, to the node's file in the run folder (RunDir.system_file), which the dashboard charts.
Nothing here touches CUDA: NVML asks the driver, so sampling never waits for the GPU.
"""

from __future__ import annotations

import logging
import os
import time

import psutil

from utp_dist.store import atomic
from utp_dist.store.run_dir import RunDir

log = logging.getLogger(__name__)


class GpuReader:
    """The GPUs this process can see, read through NVML; empty when there is no driver (a CPU machine)."""

    def __init__(self, visible: str | None = None):
        self.nvml, self.handles = None, []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as err:  # no package, no driver, no GPU: the CPU series still appear
            log.debug("no GPU metrics: %s", err)
            return
        self.nvml = pynvml
        try:
            self.handles = [(label, handle) for label, handle in self._visible(visible)]
        except pynvml.NVMLError as err:
            log.warning("system metrics: NVML cannot list the GPUs (%s); logging CPU and RAM only", err)
            self.handles = []

    def _visible(self, visible: str | None):
        """(label, handle) of each GPU CUDA shows this process: CUDA_VISIBLE_DEVICES by index or UUID, else every GPU."""
        nvml = self.nvml
        if visible is None:
            for index in range(nvml.nvmlDeviceGetCount()):
                yield str(index), nvml.nvmlDeviceGetHandleByIndex(index)
            return
        for entry in (e.strip() for e in visible.split(",") if e.strip()):
            if entry.isdigit():  # an index as NVML counts (the agent and Slurm set CUDA_DEVICE_ORDER=PCI_BUS_ID)
                yield entry, nvml.nvmlDeviceGetHandleByIndex(int(entry))
            elif entry.startswith(("GPU-", "MIG-")):
                yield entry[:12], nvml.nvmlDeviceGetHandleByUUID(entry)
            else:  # CUDA stops at the first entry it cannot read, so do we
                return

    def readings(self) -> list[tuple[str, dict[str, float]]]:
        """(label, {"util": %, "memory_used_mb", "power_w", "temperature_c"}) of each GPU; a reading NVML refuses is left out."""
        nvml, found = self.nvml, []
        readers = {
            "util": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "memory_used_mb": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "temperature_c": lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
        }
        for label, handle in self.handles:
            values = {}
            for name, read in readers.items():
                try:
                    values[name] = float(read(handle))
                except nvml.NVMLError:  # a GPU without a power sensor, say: that series is absent, never zero
                    continue
            found.append((label, values))
        return found

    def read(self) -> dict[str, float]:
        """{"system/gpuN/util": %, ".../memory_used_mb", ".../power_w", ".../temperature_c"} of each GPU that answers."""
        return {f"system/gpu{label}/{name}": value for label, values in self.readings() for name, value in values.items()}

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass
            self.nvml = None


class SystemSampler:
    """Samples GPUs, CPU and RAM at most every `every_s` seconds, when the loop reaches a log point."""

    def __init__(self, run: RunDir, tracker, node: int, every_s: float, gpus: bool):
        self.run, self.tracker, self.node, self.every_s = run, tracker, node, every_s
        self.file = run.system_file(node)
        self.gpus = GpuReader() if gpus else None  # a run on the CPU reports no GPU, even where a machine has some
        self.process = psutil.Process()
        self.process.cpu_percent()  # the first call starts psutil's CPU clock; later calls measure since the one before
        self.last = -float("inf")

    def sample(self, step: int, epoch: int, force: bool = False) -> None:
        """One sample, unless the last is younger than `every_s` (`force`: at an epoch end, always)."""
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        values = self.gpus.read() if self.gpus is not None else {}
        memory = self.process.memory_info()
        values["system/cpu_percent"] = self.process.cpu_percent()  # of one core: 400 is four cores busy
        values["system/ram_mb"] = memory.rss / 2**20
        self.tracker.log_scalars(values, step)
        record = {"time": time.time(), "step": step, "epoch": epoch, "node": self.node}
        record.update({key.removeprefix("system/"): round(value, 2) for key, value in values.items()})
        with open(self.file, "a", encoding="utf-8") as fh:
            fh.write(atomic.to_json(record) + "\n")

    def close(self) -> None:
        if self.gpus is not None:
            self.gpus.close()


class NullSampler:
    """The sampler of every process but the first of each node, and of runs with output.system_every_s null."""

    def sample(self, step: int, epoch: int, force: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def build_sampler(run: RunDir, tracker, accelerator, every_s: float | None) -> SystemSampler | NullSampler:
    """The first process of each node samples (one per machine is enough: NVML sees every GPU of it); others do nothing."""
    if every_s is None or not accelerator.is_local_main_process:
        return NullSampler()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # torchrun and accelerate launch set it
    node = accelerator.process_index // max(per_node, 1)
    return SystemSampler(run, tracker, node, every_s, accelerator.device.type == "cuda")
