"""The gpu-monitor's readings: NVML errors degrade a heartbeat and never stop the monitor. No GPU
here: the NVML module is replaced by one whose calls fail the way a broken driver's do."""

from __future__ import annotations

import types
from typing import Any

import pynvml
import pytest

from events import messages as m
from services.nvml import NvmlSource, SimulatedSource
from services.scheduler import rules
from tests.test_scheduler_rules import LIMITS, NOW, Cluster


def broken_nvml(*, count_fails: bool = False, bad_index: int | None = None) -> Any:
    """pynvml with two healthy GPUs, except where told to fail."""
    fake = types.SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        NVMLError_NotSupported=pynvml.NVMLError_NotSupported,
        NVML_TEMPERATURE_GPU=0,
    )
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None

    def count() -> int:
        if count_fails:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return 2

    def handle(index: int) -> int:
        if index == bad_index:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
        return index

    fake.nvmlDeviceGetCount = count
    fake.nvmlDeviceGetHandleByIndex = handle
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30, used=1 << 30, free=79 << 30)
    fake.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40)

    def temperature(h: int, sensor: int) -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    fake.nvmlDeviceGetTemperature = temperature
    fake.nvmlDeviceGetPowerUsage = lambda h: 250_500
    fake.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=42, usedGpuMemory=512 << 20)]
    return fake


def test_a_healthy_reading_has_every_field() -> None:
    reading = NvmlSource(broken_nvml()).sample()
    assert reading.degraded is None
    gpu = reading.gpus[1]
    assert (gpu.uuid, gpu.name, gpu.memory_total_mb, gpu.memory_free_mb) == ("GPU-1", "NVIDIA H200", 81920, 80896)
    assert (gpu.utilization_pct, gpu.power_w, gpu.temperature_c) == (40, 250.5, None)  # not supported: empty
    assert gpu.processes == [m.GpuProcess(pid=42, used_memory_mb=512)]


@pytest.mark.parametrize(("kwargs", "readable"), [({"bad_index": 0}, [1]), ({"count_fails": True}, [])])
def test_nvml_errors_give_a_degraded_reading_not_a_crash(kwargs: dict[str, Any], readable: list[int]) -> None:
    reading = NvmlSource(broken_nvml(**kwargs)).sample()
    assert [gpu.index for gpu in reading.gpus] == readable
    assert reading.degraded


def test_a_degraded_heartbeat_neither_changes_the_inventory_nor_offers_gpus() -> None:
    cluster = Cluster({"a": 2})
    partial = NvmlSource(broken_nvml(bad_index=0)).sample()
    beat = m.NodeHeartbeat(node="a", simulated=False, gpus=partial.gpus, degraded=partial.degraded, at=NOW)
    assert rules.node_changes(cluster.state, beat) == []
    cluster.heartbeats["a"] = beat
    assert rules.usable_gpus(cluster.state, cluster.heartbeats, LIMITS, NOW) == {}


def test_the_simulated_inventory_is_marked_and_complete() -> None:
    reading = SimulatedSource("laptop", 2, 24576).sample()
    assert reading.degraded is None
    assert [(g.index, g.uuid, g.memory_free_mb) for g in reading.gpus] == [
        (0, "SIM-laptop-0", 24576),
        (1, "SIM-laptop-1", 24576),
    ]
    assert all("Simulated" in g.name for g in reading.gpus)
