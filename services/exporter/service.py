"""The exporter process: consumes export work, runs `swift export --merge_lora`, reports the result.

An export left half-done by a crash is redelivered and run again over the same output directory
(`--exist_ok true`), so it completes exactly once in the log. Its process, should it outlive the
exporter, is stopped first: an output directory has one `swift export` at a time.
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
from services.launch import TAG_VARIABLE, hub_env, job_environ
from services.processes import find_running, stop_group
from services.swift import failure_message, swift_executable

log = structlog.get_logger("exporter")

STDERR_TAIL_LINES = 30
ORPHAN_STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL for an export an earlier exporter left running


def export_tag(output_dir: str) -> str:
    """Set in the environment of an export's processes, to find them again."""
    return f"export:{output_dir}"


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
        common: m.Ids = {"job_id": command.job_id, "causation_id": command.id, "actor": command.actor}
        argv = export_argv(swift_executable(self.settings.swift_bin), command.checkpoint, command.output_dir)
        started = m.ExportStarted(id=f"{command.id}-started", argv=argv, **common)
        await self.bus.commit([Append(self.bus.keys.events, started)], dedupe_id=f"fact:{started.id}")
        tag = export_tag(command.output_dir)
        await self._stop_orphan(tag)
        log.info("exporting", checkpoint=command.checkpoint, output_dir=command.output_dir)
        env = {"OMP_NUM_THREADS": str(self.settings.job_omp_num_threads), TAG_VARIABLE: tag, **hub_env(command.hub)}
        exit_code, lines = await run_logged(argv, env=env)
        await self._log_lines(command.job_id or "", lines)
        if exit_code == 0 and (Path(command.output_dir) / "config.json").exists():
            done: m.Message = m.ExportCompleted(path=command.output_dir, **common)
        else:
            # One line (the exception a traceback ends with); the traceback stays in stderr_tail.
            message = failure_message(lines) or f"swift export exited {exit_code}"
            tail = lines[-STDERR_TAIL_LINES:]
            done = m.ExportFailed(exit_code=exit_code, message=message, stderr_tail=tail, **common)
        log.info("export ended", outcome=done.type, exit_code=exit_code)
        return [Append(self.bus.keys.events, done)]

    async def _stop_orphan(self, tag: str) -> None:
        """Stop an export of the same directory that an exporter killed mid-export left running
        (it runs in its own session, so it outlives the exporter). It cannot be adopted: its
        output went to a pipe that died with the exporter, and its exit status goes to init.
        Stopped, and gone, before the export runs again: never two writers in one directory."""
        orphan = await anyio.to_thread.run_sync(find_running, tag)
        if orphan is None:
            return
        log.warning("stopping the export an earlier exporter left running", pid=orphan.pid, tag=tag)
        await stop_group(orphan.pid, ORPHAN_STOP_GRACE_S)

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
        env=job_environ(env),  # a model's code runs in it: none of the service's secrets
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
