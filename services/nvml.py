"""Reading GPUs: NVML through pynvml where a driver exists, else a simulated inventory.

NVML errors never stop the monitor: a field that cannot be read is left empty, a GPU that cannot
be read at all is left out, and the heartbeat says it is degraded and why.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import pynvml

from events.messages import GpuProcess, GpuSample

_MB = 1024 * 1024


@dataclass
class Reading:
    gpus: list[GpuSample]
    problems: list[str] = field(default_factory=list)

    @property
    def degraded(self) -> str | None:
        return "; ".join(self.problems) or None


class GpuSource(Protocol):
    simulated: bool

    def sample(self) -> Reading: ...

    def close(self) -> None: ...


class NvmlSource:
    simulated = False

    def __init__(self, nvml: ModuleType = pynvml) -> None:
        self.nvml = nvml
        nvml.nvmlInit()

    def sample(self) -> Reading:
        reading = Reading([])
        try:
            count = self.nvml.nvmlDeviceGetCount()
        except self.nvml.NVMLError as exc:
            reading.problems.append(f"cannot count GPUs: {exc}")
            return reading
        for index in range(count):
            try:
                reading.gpus.append(self._device(index, reading.problems))
            except self.nvml.NVMLError as exc:
                reading.problems.append(f"GPU {index} unreadable: {exc}")
        return reading

    def _device(self, index: int, problems: list[str]) -> GpuSample:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)

        def optional(what: str, read: Callable[[], Any]) -> Any:
            try:
                return read()
            except nvml.NVMLError as exc:
                if not isinstance(exc, nvml.NVMLError_NotSupported):
                    problems.append(f"GPU {index} {what}: {exc}")
                return None

        power_mw = optional("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        processes = optional("processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
        return GpuSample(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total_mb=int(memory.total) // _MB,
            memory_used_mb=int(memory.used) // _MB,
            memory_free_mb=int(memory.free) // _MB,
            utilization_pct=optional("utilisation", lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            temperature_c=optional(
                "temperature", lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            ),
            power_w=None if power_mw is None else round(power_mw / 1000, 1),
            processes=[GpuProcess(pid=p.pid, used_memory_mb=int(p.usedGpuMemory or 0) // _MB) for p in processes],
        )

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):  # shutting down anyway
            self.nvml.nvmlShutdown()


class SimulatedSource:
    """A made-up inventory for machines without NVIDIA GPUs; every heartbeat says so."""

    simulated = True

    def __init__(self, node: str, count: int, memory_mb: int, utilization_file: Path | None = None) -> None:
        self.utilization_file = utilization_file
        self.gpus = [
            GpuSample(
                index=i,
                uuid=f"SIM-{node}-{i}",
                name="Simulated GPU (no NVML)",
                memory_total_mb=memory_mb,
                memory_used_mb=0,
                memory_free_mb=memory_mb,
                utilization_pct=0,
            )
            for i in range(count)
        ]

    def sample(self) -> Reading:
        utilization = self._utilization()
        if not utilization:
            return Reading(list(self.gpus))
        default = utilization.get("*", 0)
        return Reading(
            [gpu.model_copy(update={"utilization_pct": utilization.get(str(gpu.index), default)}) for gpu in self.gpus]
        )

    def _utilization(self) -> dict[str, int]:
        """GPU index (or "*") -> utilisation in per cent, as the file says now."""
        if self.utilization_file is None:
            return {}
        try:
            given = json.loads(self.utilization_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(given, dict):
            return {}
        return {str(k): max(0, min(100, int(v))) for k, v in given.items() if isinstance(v, (int, float))}

    def close(self) -> None:
        pass


def open_source(
    node: str, simulated_count: int, simulated_memory_mb: int, utilization_file: Path | None = None
) -> NvmlSource | SimulatedSource:
    try:
        return NvmlSource()
    except pynvml.NVMLError:
        return SimulatedSource(node, simulated_count, simulated_memory_mb, utilization_file)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
