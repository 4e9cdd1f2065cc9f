"""The runner process: consumes its node's command stream (start, stop) and supervises jobs.

On start it adopts the jobs whose processes outlived a previous runner (from their run records)
and reports the ones that ended while no runner watched them.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TypedDict

import anyio
import pynvml
import redis.asyncio as aioredis
import structlog
from anyio.abc import TaskGroup

from events import messages as m
from events.bus import Append, Bus, connect
from events.codec import DecodeError, decode
from events.connection import text_entries, text_hash
from events.consumer import Delivery, GroupConsumer, Outcome
from events.keys import RUNNER_GROUP
from services import metrics
from services.config import Settings
from services.launch import build_launch, job_tag, socket_env
from services.nvml import NvmlSource
from services.paths import PathOutsideRoots, check_spec_paths, make_dir_inside
from services.processes import find_running
from services.runner.record import RunRecord, record_for, recorded_command, spawn, started_event
from services.runner.supervisor import GROUP_EXIT_TIMEOUT_S, GpuProbe, JobRun
from services.runtime import REDIS_LOST
from services.swift import swift_executable

log = structlog.get_logger("runner")

STOP_LOOKAHEAD = 500  # entries of the node's stream read at a time, looking for a later stop


class _FinalIds(TypedDict):
    """What identifies the final fact of an attempt the runner ends without running it."""

    id: str
    job_id: str
    attempt: int


def free_port(ports: range, taken: set[int]) -> int:
    """A port of the deploy pool that no job of ours holds and nothing else listens on."""
    for port in ports:
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise OSError(f"no free port left in the deploy pool {ports.start}-{ports.stop - 1}")


class Runner:
    def __init__(self, settings: Settings, bus: Bus, tg: TaskGroup, gpu_probe: GpuProbe | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.tg = tg
        self.gpu_probe = gpu_probe
        # (job id, attempt) -> its run: a stale attempt of a job (its node was lost and is back)
        # and the job's next one, on this node, are two runs
        self.runs: dict[tuple[str, int], JobRun] = {}
        self.ended: dict[tuple[str, int], anyio.Event] = {}  # set when a run's supervision ends

    def _track(
        self,
        record: RunRecord,
        saved: Mapping[str, str] | None = None,
        process: subprocess.Popen[bytes] | None = None,
    ) -> JobRun:
        run = JobRun(
            self.bus,
            record,
            log_maxlen=self.settings.job_log_maxlen,
            stop_grace_s=self.settings.stop_grace_s,
            saved=saved,
            process=process,
            gpu_probe=self.gpu_probe,
        )
        self.runs[(record.job_id, record.attempt)] = run
        metrics.SUPERVISED.set(len(self.runs))
        ended = self.ended[(record.job_id, record.attempt)] = anyio.Event()

        async def supervise() -> None:
            try:
                await run.supervise()
            except* REDIS_LOST:
                raise  # the whole runner restarts when Redis is back, and adopts the job again
            except* Exception:
                # A fault here must not take the other jobs down; the job's process is left
                # running and its run record kept, so a restarted runner adopts it again.
                log.exception("supervising the job failed", job_id=record.job_id)
            finally:
                self.runs.pop((record.job_id, record.attempt), None)
                metrics.SUPERVISED.set(len(self.runs))
                self.ended.pop((record.job_id, record.attempt), None)
                ended.set()

        self.tg.start_soon(supervise)
        return run

    async def adopt(self) -> None:
        """Take over the jobs a previous runner on this node started. They report nothing until
        release_adopted(): a start still pending must first land its job.started."""
        every_run = self.bus.keys.run("*", "*").removesuffix(":*")  # older runners kept one per job
        async for key in self.bus.redis.scan_iter(match=every_run, count=500):
            fields = text_hash(await self.bus.redis.hgetall(key))
            if "record" not in fields:  # only a stop that arrived before its start
                continue
            record = RunRecord.from_redis(fields)
            if record.node != self.settings.node_name or (record.job_id, record.attempt) in self.runs:
                continue
            if key != (own := self.bus.keys.run(record.job_id, record.attempt, record.rank)):
                await self.bus.redis.rename(key, own)
            log.info("adopting job", job_id=record.job_id, pid=record.pid)
            self._track(record, fields)

    def release_adopted(self) -> None:
        """After the pending starts were handled, every adopted job's start is in the log."""
        for run in self.runs.values():
            run.committed.set()

    async def handle(self, delivery: Delivery) -> Sequence[Append] | Outcome | None:
        message = delivery.message
        if isinstance(message, m.StartJob):
            return await self.start(message, delivery)
        if isinstance(message, m.StopJob):
            run = self.runs.get((message.job_id or "", message.attempt))
            if run is not None:
                await run.request_stop(message.reason)
            else:
                # Its start has not been handled (it failed and waits to be retried): remember
                # the stop, so that the start reports the job cancelled instead of running it.
                await self.bus.redis.hset(
                    self.bus.keys.run(message.job_id or "", message.attempt, message.rank),
                    mapping={"stop_reason": message.reason, "stop_attempt": message.attempt},
                )
            return None
        log.warning("unexpected command for the runner", type=message.type)
        return None

    async def start(self, command: m.StartJob, delivery: Delivery) -> Outcome | Sequence[Append]:
        job_id = command.job_id or ""
        run = self.runs.get((job_id, command.attempt))
        if run is None:
            key = self.bus.keys.run(job_id, command.attempt, command.rank)
            early = text_hash(await self.bus.redis.hgetall(key))
            rank = f"rank{command.rank}-" if command.rank else ""
            end: _FinalIds = {
                "id": f"{job_id}-{command.attempt}-{rank}final",
                "job_id": job_id,
                "attempt": command.attempt,
            }
            stop = early.get("stop_reason") if early.get("stop_attempt") == str(command.attempt) else None
            stop = stop or await self._stop_follows(delivery, command)
            if stop and "record" not in early and not await self._running(command):
                await self.bus.redis.delete(key)
                ended = m.JobStopped(reason=stop, **end) if stop in ("preempt", "suspend") else m.JobCancelled(**end)
                return [Append(self.bus.keys.events, ended)]
            await self._gpus_left(command)
            try:
                record, process = await anyio.to_thread.run_sync(self._launch, command)
            except PathOutsideRoots as exc:
                log.warning("refused to start job", job_id=job_id, error=str(exc))
                failed = m.JobFailed(
                    reason=m.FailureReason.PATH_OUTSIDE_ROOTS, message=f"refused to start: {exc}", **end
                )
                return [Append(self.bus.keys.events, failed)]
            except (OSError, ValueError) as exc:
                log.warning("could not start job", job_id=job_id, error=str(exc))
                failed = m.JobFailed(reason=m.FailureReason.SPAWN_FAILED, message=f"could not start: {exc}", **end)
                return [Append(self.bus.keys.events, failed)]
            if record.deploy:
                idle = command.spec.idle_timeout_s or self.settings.idle_timeout_s
                record = replace(record, idle_timeout_s=idle)
            await self.bus.redis.hset(key, mapping=record.to_redis())
            run = self._track(record, process=process)
            metrics.RUNS_STARTED.inc()
            if stop:  # a process of the attempt ran already (its start was never recorded)
                await run.request_stop(stop)
        recorded = await anyio.to_thread.run_sync(recorded_command, run.record)
        started = started_event(run.record, recorded, ",".join(str(i) for i in command.gpu_ids))
        return Outcome([Append(self.bus.keys.events, started)], committed=run.committed)

    async def _stop_follows(self, delivery: Delivery, command: m.StartJob) -> str | None:
        """The reason of a stop of this attempt that the node's stream already holds after its
        start: the scheduler gave up on the attempt before it was started (its node was declared
        lost while this runner was paused or cut off, or the job was cancelled), and starting it
        now would run the job twice."""
        after = f"({delivery.entry_id}"
        while page := text_entries(await self.bus.redis.xrange(delivery.stream, after, "+", count=STOP_LOOKAHEAD)):
            for _, fields in page:
                if fields.get("type") == "job.stop" and fields.get("job_id") == command.job_id:
                    with contextlib.suppress(DecodeError):
                        stop = decode(fields)
                        if isinstance(stop, m.StopJob) and stop.attempt == command.attempt:
                            return stop.reason
            after = f"({page[-1][0]}"
        return None

    async def _gpus_left(self, command: m.StartJob) -> None:
        """Wait until no other run here uses the attempt's GPUs: a job preempted for this one, or
        suspended, or an attempt of this node from before it was lost, was told to stop first and
        may still be saving its checkpoint. A run being stopped is waited for to its end, however
        long that takes: its GPUs are free only once its processes are gone (they are killed when
        its grace period is over, and its end waits, bounded, until NVML lists none of them). One
        that nobody asked to stop is waited for up to a grace period, then the job starts anyway."""
        wanted = {str(index) for index in command.gpu_ids}
        deadline = anyio.current_time() + self.settings.stop_grace_s + GROUP_EXIT_TIMEOUT_S
        while busy := [key for key, run in self.runs.items() if wanted & set(run.record.gpus.split(","))]:
            log.info("waiting for a run to leave the job's GPUs", job_id=command.job_id, run=busy[0])
            # An adopted run reports nothing until released (adopt()); this start may be one
            # that a restarted runner handles before releasing them. The run's own start came
            # before this one in the node's stream, so its job.started is in the log already:
            # release it, or its end would wait for this start and this start for its end.
            self.runs[busy[0]].committed.set()
            stopping = self.runs[busy[0]].stop_reason is not None
            with anyio.move_on_after(math.inf if stopping else deadline - anyio.current_time()) as waited:
                await self.ended[busy[0]].wait()
            if waited.cancelled_caught:
                log.warning("another run still uses the job's GPUs; starting it anyway", job_id=command.job_id)
                return

    async def _running(self, command: m.StartJob) -> bool:
        """Whether a process of the attempt runs (started before a crash, never recorded)."""
        tag = job_tag(command.job_id or "", command.attempt, command.rank)
        return await anyio.to_thread.run_sync(find_running, tag) is not None

    def _deploy_port(self) -> int:
        taken = {run.record.port for run in self.runs.values() if run.record.port is not None}
        return free_port(self.settings.deploy_ports, taken)

    def _launch(self, command: m.StartJob) -> tuple[RunRecord, subprocess.Popen[bytes] | None]:
        """Start the attempt's process, or find it running: the runner may have died after
        starting it and before recording it, and a job must never run twice."""
        job_id = command.job_id or ""
        launch = build_launch(
            command.spec,
            swift=swift_executable(self.settings.swift_bin),
            job_id=job_id,
            attempt=command.attempt,
            gpu_ids=command.gpu_ids,
            runs_dir=self.settings.runs_dir,
            omp_num_threads=self.settings.job_omp_num_threads,
            port=self._deploy_port() if command.spec.task_type == "deploy" else None,
            resume_from=command.resume_from,
            rank=command.rank,
            master_addr=command.master_addr,
            master_port=command.master_port,
            cpu_only=self.gpu_probe is None,  # no NVIDIA driver: GPUs simulated, ranks on the CPU
        )
        if command.spec.nodes > 1:
            launch.env.update(socket_env(self.settings.node_addr, dict(os.environ)))
        running = find_running(job_tag(job_id, command.attempt, command.rank))
        if running is not None:
            log.warning("found the job already running; adopting it", job_id=job_id, pid=running.pid)
            rank, nodes = command.rank, command.spec.nodes
            record = record_for(
                launch, job_id, command.attempt, command.node, running.pid, running.create_time(), rank, nodes
            )
            return record, None
        # Checked at submit; checked again now, as a directory may have been swapped for a
        # symlink to elsewhere in between (a held job can wait for days).
        settings = self.settings
        check_spec_paths(command.spec, settings.roots, settings.data_dir, settings.private_dirs)
        if command.spec.output_dir:
            make_dir_inside(launch.output_dir, settings.roots, "output_dir", settings.private_dirs)
        record, process = spawn(launch, job_id, command.attempt, command.node, command.rank, command.spec.nodes)
        log.info("started job", job_id=job_id, pid=record.pid, argv=launch.argv)
        return record, process


def nvml_probe() -> GpuProbe | None:
    """Which processes NVML lists on given GPUs; None without an NVIDIA driver."""
    try:
        source = NvmlSource()
    except pynvml.NVMLError:
        return None

    def pids_on(indices: list[int]) -> set[int]:
        reading = source.sample()
        return {p.pid for gpu in reading.gpus if gpu.index in indices for p in gpu.processes}

    return pids_on


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    reader = connect(settings.resolved_redis_url, block_ms=5000)
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    log.info("running jobs", node=settings.node_name, runs_dir=str(settings.runs_dir.resolve()), pid=os.getpid())
    try:
        async with anyio.create_task_group() as tg:
            runner = Runner(settings, bus, tg, await anyio.to_thread.run_sync(nvml_probe))
            consumer = GroupConsumer(
                bus,
                reader,
                [bus.keys.node(settings.node_name)],
                RUNNER_GROUP,
                settings.node_name,  # one runner per node: a restart re-reads its own pending
                runner.handle,
                block_ms=5000,
                claim_idle_ms=settings.claim_idle_ms,
                max_deliveries=settings.max_deliveries,
            )
            await consumer.setup()
            await runner.adopt()
            await consumer.drain_own_pending()
            runner.release_adopted()
            await consumer.run()
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
