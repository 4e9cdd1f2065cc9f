"""The exporter process: consumes export work, runs `swift export --merge_lora`, reports the result.

An export left half-done by a crash is redelivered and run again over the same output directory
(`--exist_ok true`), so it completes exactly once in the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio
import redis.asyncio as aioredis
import structlog

from events import messages as m
from events.bus import Append, Bus, connect
from events.consumer import Delivery, GroupConsumer
from events.keys import EXPORTER_GROUP
from services.config import Settings
from services.swift import swift_executable

log = structlog.get_logger("exporter")

STDERR_TAIL_LINES = 30


def export_argv(swift: str, checkpoint: str, output_dir: str) -> list[str]:
    return [
        swift,
        "export",
        "--adapters",
        checkpoint,
        "--merge_lora",
        "true",
        "--output_dir",
        output_dir,
        "--exist_ok",
        "true",
    ]


class Exporter:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus

    async def handle(self, delivery: Delivery) -> Sequence[Append] | None:
        command = delivery.message
        if not isinstance(command, m.StartExport):
            log.warning("unexpected command for the exporter", type=command.type)
            return None
        common = {"job_id": command.job_id, "causation_id": command.id, "actor": command.actor}
        argv = export_argv(swift_executable(self.settings.swift_bin), command.checkpoint, command.output_dir)
        started = m.ExportStarted(id=f"{command.id}-started", argv=argv, **common)
        await self.bus.commit([Append(self.bus.keys.events, started)], dedupe_id=f"fact:{started.id}")
        log.info("exporting", checkpoint=command.checkpoint, output_dir=command.output_dir)
        exit_code, lines = await run_logged(argv, env={"OMP_NUM_THREADS": str(self.settings.job_omp_num_threads)})
        await self._log_lines(command.job_id or "", lines)
        if exit_code == 0 and (Path(command.output_dir) / "config.json").exists():
            done: m.Message = m.ExportCompleted(path=command.output_dir, **common)
        else:
            tail = lines[-STDERR_TAIL_LINES:]
            message = next((line for line in reversed(tail) if "Error" in line), f"swift export exited {exit_code}")
            done = m.ExportFailed(exit_code=exit_code, message=message[:2000], stderr_tail=tail, **common)
        log.info("export ended", outcome=done.type, exit_code=exit_code)
        return [Append(self.bus.keys.events, done)]

    async def _log_lines(self, job_id: str, lines: list[str]) -> None:
        if not lines:
            return
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.xadd(
                    self.bus.keys.logs(job_id),
                    {"fd": "export", "line": line[:8192]},
                    maxlen=self.settings.job_log_maxlen,
                    approximate=True,
                )
            await pipe.execute()


async def run_logged(argv: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run a command in its own process group; kill the group if we are cancelled."""
    process = await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *complete, buffer = buffer.replace(b"\r", b"\n").split(b"\n")
            lines.extend(line.decode(errors="replace") for line in complete if line.strip())
        if buffer.strip():
            lines.append(buffer.decode(errors="replace"))
        return await process.wait(), lines
    finally:
        if process.returncode is None:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    reader = connect(settings.resolved_redis_url, block_ms=5000)
    exporter = Exporter(settings, bus)
    try:
        consumer = GroupConsumer(
            bus,
            reader,
            [bus.keys.exports],
            EXPORTER_GROUP,
            f"exporter-{settings.node_name}",  # stable: a restart re-reads its own pending
            exporter.handle,
            block_ms=5000,
            claim_idle_ms=max(settings.claim_idle_ms, 600_000),  # an export may run for many minutes
            max_deliveries=settings.max_deliveries,
            count=1,
        )
        await consumer.run()
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
