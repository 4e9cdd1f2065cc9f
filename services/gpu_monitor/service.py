"""The gpu-monitor process: a node heartbeat with every GPU's memory and use, at a fixed interval."""

from __future__ import annotations

import anyio
import redis.asyncio as aioredis
import structlog

from events.bus import Bus
from events.messages import NodeHeartbeat
from services.config import Settings
from services.nvml import open_source
from services.storage import storage_roots

log = structlog.get_logger("gpu-monitor")


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    source = await anyio.to_thread.run_sync(
        open_source,
        settings.node_name,
        settings.simulated_gpus,
        settings.simulated_gpu_memory_mb,
        settings.simulated_gpu_utilization_file,
    )
    log.info("monitoring", node=settings.node_name, simulated=source.simulated)
    try:
        while True:
            reading = await anyio.to_thread.run_sync(source.sample)
            roots = await anyio.to_thread.run_sync(
                storage_roots, [*settings.roots, settings.runs_dir], settings.node_name
            )
            if reading.degraded:
                log.warning("degraded GPU reading", problems=reading.degraded)
            beat = NodeHeartbeat(
                node=settings.node_name,
                simulated=source.simulated,
                gpus=reading.gpus,
                degraded=reading.degraded,
                addr=settings.node_addr,
                roots=roots,
            )
            await bus.append(bus.keys.telemetry, beat, maxlen=settings.telemetry_maxlen)
            await anyio.sleep(settings.heartbeat_interval_s)
    finally:
        source.close()
