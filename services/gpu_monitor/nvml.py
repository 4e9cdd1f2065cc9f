"""Reading GPUs: NVML through pynvml where a driver exists, else a simulated inventory."""

from __future__ import annotations

from typing import Protocol

import pynvml

from events.messages import GpuProcess, GpuSample

_MB = 1024 * 1024


class GpuSource(Protocol):
    simulated: bool

    def sample(self) -> list[GpuSample]: ...


class NvmlSource:
    simulated = False

    def __init__(self) -> None:
        pynvml.nvmlInit()

    def sample(self) -> list[GpuSample]:
        samples = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            samples.append(
                GpuSample(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mb=int(memory.total) // _MB,
                    memory_used_mb=int(memory.used) // _MB,
                    utilization_pct=_optional(lambda h=handle: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                    temperature_c=_optional(
                        lambda h=handle: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
                    ),
                    processes=[
                        GpuProcess(pid=p.pid, used_memory_mb=int(p.usedGpuMemory or 0) // _MB)
                        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    ],
                )
            )
        return samples

    def close(self) -> None:
        pynvml.nvmlShutdown()


class SimulatedSource:
    """A made-up inventory for machines without NVIDIA GPUs; every heartbeat says so."""

    simulated = True

    def __init__(self, node: str, count: int, memory_mb: int) -> None:
        self.gpus = [
            GpuSample(
                index=i,
                uuid=f"SIM-{node}-{i}",
                name="Simulated GPU (no NVML)",
                memory_total_mb=memory_mb,
                memory_used_mb=0,
                utilization_pct=0,
                temperature_c=None,
            )
            for i in range(count)
        ]

    def sample(self) -> list[GpuSample]:
        return list(self.gpus)

    def close(self) -> None:
        pass


def open_source(node: str, simulated_count: int, simulated_memory_mb: int) -> NvmlSource | SimulatedSource:
    try:
        return NvmlSource()
    except pynvml.NVMLError:
        return SimulatedSource(node, simulated_count, simulated_memory_mb)


def _optional(read: object) -> int | None:
    try:
        return int(read())  # type: ignore[operator]
    except pynvml.NVMLError:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
