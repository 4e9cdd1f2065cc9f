"""The control plane at a cluster's size: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_cluster [--nodes 125] [--jobs 10000] [--time-scale 0.05]

Runs a throwaway redis-server, the real scheduler and the real gateway, and one load process
(this one, on asyncio) that stands in for every node of the cluster: its gpu-monitor (a
``node.heartbeat`` of its 8 GPUs every ``--heartbeat-s``, busy GPUs showing their job's memory
and process as NVML would, and the monitor's presence) and its runner (a consumer of the node's
command stream in the runner's group that answers ``job.start`` with the facts a runner writes,
ends each rank after the job's run time, answers ``job.stop`` as a stopped process would, and
sends the runner's presence). No process is spawned: a real runner's start of ``swift`` is left
out of every figure.

The workload: ``--jobs`` jobs over REST (``POST /jobs``) of mixed sizes (1, 2, 4 and 8 GPUs, and
two-node gangs of 8 GPUs each) and priorities 0-10, each running a time drawn from 20-120 s times
``--time-scale``. Phases: the cluster joins and idles (heartbeats absorbed, and the CPU each
process spends on them); ``--warmup`` jobs one at a time on idle GPUs (submit -> decision, submit
-> started); the rest in a burst, ``--concurrency`` requests in flight (sustained decisions), but
the last ``--probes``, sent one at a time after it (submit -> decision with the burst's jobs
running and waiting); cancels of jobs holding GPUs (gangs first) and of waiting ones; then every
job to its end. From the log, afterwards: GPU occupancy while jobs were queued, and the idle
GPU-seconds by cause. The scheduler runs with its commits counted (how many found the log moved
on and decided their read again). Last, ``swift-trainer audit check`` proves the log's invariants
(no GPU held twice, one state per job, no submission lost) and compares the gateway's state.

Times are taken from the log: a decision is the entry id (Redis's clock, in milliseconds) of the
job's ``job.queued``, a start that of its last rank's ``job.started``, each taken at the middle of
its millisecond (+-0.5 ms), against this process's clock when the request was sent.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import psutil
import redis

from events import messages as m
from events.bus import Append, Bus, connect, entry_id_key
from events.codec import decode
from events.consumer import Delivery, GroupConsumer, Outcome
from events.keys import RUNNER_GROUP, SCHEDULER_GROUP, Keys
from events.records import HOLDS_GPUS, JobStatus
from events.state import State
from services import embedded_redis
from services.launch import build_launch
from tests.benchmarks.bench_scheduler import _ping, percentile, raw_redis, row
from tests.conftest import free_port, wait_for

NAMESPACE = "cluster"
GPU_NAME = "NVIDIA H100 80GB HBM3"
GPU_MEMORY_MB = 81_559
IDLE_MEMORY_MB = 4  # what NVML reads on an idle H100
TELEMETRY_MAXLEN = 10_000  # the services' default (TELEMETRY_MAXLEN)
# Job shapes (GPUs per node, nodes) and their share of the workload
SHAPES = ((1, 1, 0.35), (2, 1, 0.25), (4, 1, 0.15), (8, 1, 0.15), (8, 2, 0.10))
ENDED = frozenset({"job.succeeded", "job.failed", "job.cancelled", "job.rejected"})


@dataclass(frozen=True)
class Config:
    nodes: int = 125
    gpus_per_node: int = 8
    jobs: int = 10_000
    warmup: int = 150  # submitted one at a time on idle GPUs
    probes: int = 300  # submitted one at a time after the burst
    concurrency: int = 32  # requests in flight in the burst
    heartbeat_s: float = 2.0  # HEARTBEAT_INTERVAL_S
    node_timeout_s: float = 30.0  # NODE_TIMEOUT_S
    run_min_s: float = 20.0
    run_max_s: float = 120.0
    time_scale: float = 0.05  # run times are drawn from run_min_s-run_max_s times this
    job_memory_mb: int = 60_000  # what a busy GPU reads (0: a GPU reads free as soon as its job ends)
    cancels: float = 0.01  # of the jobs, cancelled after the probes (half holding GPUs, if so many do)
    idle_s: float = 10.0  # the idle cluster's heartbeats, measured
    hold_s: float = 0.0  # the cluster left to run after the probes, before the cancels
    drain_timeout_s: float = 900.0
    seed: int = 1
    audit: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)  # more settings for the services


@dataclass(frozen=True)
class Planned:
    index: int
    gpus: int  # per node
    nodes: int
    priority: int
    run_s: float

    @property
    def name(self) -> str:
        return f"bench-{self.index}"


def plan(config: Config) -> list[Planned]:
    rng = random.Random(config.seed)
    shapes = [(g, n) for g, n, _ in SHAPES if g <= config.gpus_per_node and n <= config.nodes]
    weights = [w for g, n, w in SHAPES if g <= config.gpus_per_node and n <= config.nodes]
    jobs = []
    for index in range(config.jobs):
        gpus, nodes = rng.choices(shapes, weights)[0]
        run_s = rng.uniform(config.run_min_s, config.run_max_s) * config.time_scale
        jobs.append(Planned(index, gpus, nodes, rng.randint(0, 10), run_s))
    return jobs


@dataclass
class Sent:
    """A submission: when it was sent (this process's clock), and what the gateway answered."""

    planned: Planned
    phase: str
    sent_at: float  # time.time()
    status: int = 0
    job_id: str = ""
    command_id: str = ""  # its job.submit's entry id (the gateway's command_position)


# ---------------------------------------------------------------------------------------------
# The nodes: gpu-monitors and runners


@dataclass
class Rank:
    """One rank of an attempt, as a runner supervises it."""

    job_id: str
    attempt: int
    rank: int
    node: str
    gpu_ids: list[int]
    run_s: float
    output_dir: str
    committed: anyio.Event = field(default_factory=anyio.Event)  # its job.started is in the log
    stopped: anyio.Event = field(default_factory=anyio.Event)
    stop_reason: str | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.job_id, self.attempt, self.rank)

    def fact_id(self, what: str) -> str:
        return f"{self.job_id}-{self.attempt}-" + (f"rank{self.rank}-" if self.rank else "") + what


class Cluster:
    """Every node's gpu-monitor and runner, in this process."""

    def __init__(self, config: Config, bus: Bus, runs_dir: Path, run_times: dict[str, float]) -> None:
        self.config = config
        self.bus = bus
        self.keys = bus.keys
        self.runs_dir = runs_dir
        self.run_times = run_times  # job name -> run time
        self.names = [f"node-{i:03d}" for i in range(config.nodes)]
        self.addrs = {name: f"10.1.{i // 250}.{i % 250 + 1}" for i, name in enumerate(self.names)}
        self.busy: dict[str, dict[int, int]] = {name: {} for name in self.names}  # node -> GPU -> pid
        self.ranks: dict[tuple[str, int, int], Rank] = {}
        self.pids = iter(range(100_000, 10**9))
        self.beats = 0  # node heartbeats
        self.sent = 0  # telemetry entries: node heartbeats and both services' presence
        self.late_s: list[float] = []  # how late each heartbeat went out (this process busy)
        self.starts = self.stops = self.ends = 0
        self.started_at = datetime.now(UTC)
        self.tg: anyio.abc.TaskGroup | None = None  # the runner's: each rank's supervision

    # -- gpu-monitor and runner presence

    def sample(self, node: str) -> m.NodeHeartbeat:
        busy = self.busy[node]
        memory = self.config.job_memory_mb
        gpus = []
        for index in range(self.config.gpus_per_node):
            pid = busy.get(index)
            used = memory if pid is not None and memory else IDLE_MEMORY_MB
            gpus.append(
                m.GpuSample(
                    index=index,
                    uuid=f"GPU-{hashlib.md5(f'{node}/{index}'.encode()).hexdigest()[:8]}-{index:04d}",
                    name=GPU_NAME,
                    memory_total_mb=GPU_MEMORY_MB,
                    memory_used_mb=used,
                    memory_free_mb=GPU_MEMORY_MB - used,
                    utilization_pct=97 if pid is not None else 0,
                    temperature_c=61 if pid is not None else 33,
                    power_w=612.5 if pid is not None else 71.2,
                    processes=[m.GpuProcess(pid=pid, used_memory_mb=memory)] if pid is not None and memory else [],
                )
            )
        return m.NodeHeartbeat(node=node, simulated=False, gpus=gpus, addr=self.addrs[node])

    async def heartbeats(self, node: str, service: str, phase_s: float) -> None:
        """What one service of the node sends every interval: the gpu-monitor, its GPUs' reading
        and its presence; the runner, its presence (services/runtime.py heartbeat_loop)."""
        interval = self.config.heartbeat_s
        presence = m.ServiceHeartbeat(
            service=service,
            instance=f"{service}@{node}",
            started_at=self.started_at,
            interval_s=interval,
            node=node,
        )
        bus = Bus(self.bus.redis, self.keys, f"{service}@{node}")
        due = time.monotonic() + phase_s
        while True:
            await anyio.sleep(max(0.0, due - time.monotonic()))
            self.late_s.append(time.monotonic() - due)
            if service == "gpu-monitor":
                await bus.append(self.keys.telemetry, self.sample(node), maxlen=TELEMETRY_MAXLEN)
                self.beats += 1
            beat = presence.model_copy(update={"id": m.new_id(), "at": m.utcnow()})
            await bus.append(self.keys.telemetry, beat, maxlen=TELEMETRY_MAXLEN)
            self.sent += 1 + (service == "gpu-monitor")
            due += interval
            if due < time.monotonic() - interval:  # far behind: skip the beats missed, as a stalled service would
                due = time.monotonic()

    # -- runner

    async def handle(self, delivery: Delivery) -> Outcome | None:
        message = delivery.message
        if isinstance(message, m.StartJob):
            return self.start(message)
        if isinstance(message, m.StopJob):
            rank = self.ranks.get((message.job_id or "", message.attempt, message.rank))
            if rank is not None and rank.stop_reason is None:
                self.stops += 1
                rank.stop_reason = message.reason
                rank.stopped.set()
        return None

    def start(self, command: m.StartJob) -> Outcome:
        job_id = command.job_id or ""
        key = (job_id, command.attempt, command.rank)
        launch = build_launch(
            command.spec,
            swift="swift",
            job_id=job_id,
            attempt=command.attempt,
            gpu_ids=command.gpu_ids,
            runs_dir=self.runs_dir,
            omp_num_threads=1,
            resume_from=command.resume_from,
            rank=command.rank,
            master_addr=command.master_addr,
            master_port=command.master_port,
        )
        rank = self.ranks.get(key)
        pid = next(self.pids)
        if rank is None:  # (a start delivered again reports the same fact, which the commit drops)
            run_s = self.run_times.get(command.spec.name or "", self.config.run_min_s * self.config.time_scale)
            rank = Rank(
                job_id,
                command.attempt,
                command.rank,
                command.node,
                list(command.gpu_ids),
                run_s,
                str(launch.output_dir),
            )
            self.ranks[key] = rank
            for index in command.gpu_ids:
                self.busy[command.node][index] = pid
            assert self.tg is not None
            self.tg.start_soon(self.supervise, rank)
            self.starts += 1
        started = m.JobStarted(
            id=rank.fact_id("started"),
            rank=command.rank,
            job_id=job_id,
            attempt=command.attempt,
            node=command.node,
            pid=pid,
            pgid=pid,
            run_dir=str(launch.run_dir),
            argv=launch.argv,
            env=launch.env,
            cuda_visible_devices=",".join(str(i) for i in command.gpu_ids),
        )
        return Outcome([Append(self.keys.events, started)], committed=rank.committed)

    async def supervise(self, rank: Rank) -> None:
        """The rank's process: it runs its time, or until told to stop; then its end is reported
        as the runner reports it (services/runner/supervisor.py JobRun.outcome)."""
        await rank.committed.wait()
        with anyio.move_on_after(rank.run_s):
            await rank.stopped.wait()
        common: dict[str, Any] = {"id": rank.fact_id("final"), "job_id": rank.job_id, "attempt": rank.attempt}
        final: m.Message
        if rank.rank:
            final = m.RankEnded(rank=rank.rank, node=rank.node, exit_code=0, **common)
        elif rank.stop_reason == "cancel":
            final = m.JobCancelled(exit_code=0, **common)
        elif rank.stop_reason in ("preempt", "suspend"):
            final = m.JobStopped(exit_code=0, reason=rank.stop_reason, **common)
        elif rank.stop_reason == "timeout":
            final = m.JobFailed(reason="timeout", message="time limit reached", exit_code=-15, **common)
        else:
            final = m.JobSucceeded(exit_code=0, run_dir=rank.output_dir, **common)
        for index in rank.gpu_ids:  # the process is gone: NVML no longer lists it
            self.busy[rank.node].pop(index, None)
        await self.bus.commit([Append(self.keys.events, final)], dedupe_id=f"fact:{final.id}")
        self.ranks.pop(rank.key, None)
        self.ends += 1

    async def run(self, url: str) -> None:
        """Every node's heartbeats, and one consumer of every node's command stream."""
        reader = connect(url, block_ms=1000)
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                for i, node in enumerate(self.names):  # each service of each node on its own clock
                    phase = self.config.heartbeat_s * i / len(self.names)
                    tg.start_soon(self.heartbeats, node, "gpu-monitor", phase)
                    tg.start_soon(
                        self.heartbeats, node, "runner", (phase + self.config.heartbeat_s / 2) % self.config.heartbeat_s
                    )
                consumer = GroupConsumer(
                    self.bus,
                    reader,
                    [self.keys.node(node) for node in self.names],
                    RUNNER_GROUP,
                    "bench-runners",
                    self.handle,
                    block_ms=1000,
                )
                await consumer.run()
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()


# ---------------------------------------------------------------------------------------------
# The log, followed as it grows


class Tail:
    """Reads the log as it grows: which jobs hold GPUs and which have ended."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.position = "0-0"
        self.ended: set[str] = set()
        self.holding: set[str] = set()
        self.joined: set[str] = set()
        self.lost: list[str] = []
        self.changed = anyio.Event()

    async def run(self, url: str) -> None:
        reader = connect(url, block_ms=1000)
        try:
            while True:
                reply = await reader.xread({self.keys.events: self.position}, count=2000, block=1000)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        self.position = entry_id
                        kind, job_id = fields.get("type"), fields.get("job_id", "")
                        if kind in ENDED:
                            self.ended.add(job_id)
                            self.holding.discard(job_id)
                        elif kind == "job.scheduled":
                            self.holding.add(job_id)
                        elif kind == "node.joined":
                            self.joined.add(decode(fields).node)  # type: ignore[attr-defined]
                        elif kind == "node.lost":
                            self.lost.append(decode(fields).node)  # type: ignore[attr-defined]
                if reply:
                    self.changed.set()
                    self.changed = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()

    async def until(self, predicate: Any, timeout_s: float) -> None:
        with anyio.fail_after(timeout_s):
            while not predicate():
                await self.changed.wait()


# ---------------------------------------------------------------------------------------------
# CPU accounting


class Cpu:
    """CPU seconds of the processes measured, between marks."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self.marks: dict[str, tuple[float, dict[str, float]]] = {}

    def now(self) -> dict[str, float]:
        return {name: sum(process.cpu_times()[:2]) for name, process in self.processes.items()}

    def mark(self, name: str) -> None:
        self.marks[name] = (time.monotonic(), self.now())

    def since(self, name: str) -> tuple[float, dict[str, float]]:
        """Seconds since the mark, and each process's CPU seconds in them."""
        at, before = self.marks[name]
        now = self.now()
        return time.monotonic() - at, {k: now[k] - before[k] for k in now}


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Result:
    config: Config
    sent: list[Sent] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # the report
    unfinished: list[str] = field(default_factory=list)  # job ids that never ended
    refused: Counter[int] = field(default_factory=Counter)  # answers other than 202, by status
    outcomes: Counter[str] = field(default_factory=Counter)  # jobs by final status
    gangs_started: int = 0
    stops_answered: int = 0
    nodes_lost: list[str] = field(default_factory=list)
    audit_code: int | None = None
    audit_said: str = ""
    scheduler_log: str = ""
    tally: Counter[str] = field(default_factory=Counter)  # the scheduler's commits and decisions
    entries_read: int = 0  # by the scheduler, from its three streams
    burst_cpu_s: dict[str, float] = field(default_factory=dict)
    died: str = ""  # a service that exited during the run, and why
    cancels_at: float | None = None  # when the cancels began (occupancy is measured up to then)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


def body(planned: Planned, root: Path) -> dict[str, object]:
    return {
        "task_type": "language_model",
        "name": planned.name,
        "model_path": str(root / "model"),
        "data_path": str(root / "data.jsonl"),
        "gpu_count": planned.gpus,
        "nodes": planned.nodes,
        "priority": planned.priority,
    }


def landed(entry_id: str) -> float:
    """When an entry landed, by Redis's clock in seconds, at the middle of its millisecond."""
    return (entry_id_key(entry_id)[0] + 0.5) / 1000


def stats(values: list[float]) -> str:
    if not values:
        return "(none)"
    return f"p50 {percentile(values, 0.5):.2f} ms  p99 {percentile(values, 0.99):.2f} ms  max {max(values):.2f} ms  ({len(values)})"


class ServiceDied(Exception):
    """The scheduler or the gateway exited during the run."""


class Drive:
    """The phases of a run, from this process: the nodes, the REST load, and the log followed."""

    def __init__(
        self,
        config: Config,
        result: Result,
        services: dict[str, subprocess.Popen[bytes]],
        url: str,
        base: str,
        root: Path,
        cpu: Cpu,
        sync: redis.Redis,
    ) -> None:
        self.config, self.result, self.services = config, result, services
        self.url, self.base, self.root, self.cpu, self.sync = url, base, root, cpu, sync
        self.keys = Keys(NAMESPACE)
        self.jobs = plan(config)
        self.say = result.say
        self.tail = Tail(self.keys)

    async def run(self) -> None:
        config = self.config
        redis_client = connect(self.url)
        self.cluster = Cluster(
            config, Bus(redis_client, self.keys, "bench"), self.root / "runs", {j.name: j.run_s for j in self.jobs}
        )
        limits = httpx.Limits(max_connections=config.concurrency + 4)
        try:
            async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=60, limits=limits) as client:
                self.client = client
                tg.start_soon(self.watch)
                tg.start_soon(self.cluster.run, self.url)
                tg.start_soon(self.tail.run, self.url)
                await self.joined()
                await self.idle()
                self.cpu.mark("run")
                warmup, rest = self.jobs[: config.warmup], self.jobs[config.warmup :]
                probes = rest[len(rest) - min(config.probes, len(rest)) :]
                for planned in warmup:
                    self.result.sent.append(await self.submit(planned, "warmup"))
                await self.burst(rest[: len(rest) - len(probes)])
                for planned in probes:
                    self.result.sent.append(await self.submit(planned, "probe"))
                if config.hold_s:
                    self.say(
                        f"{row('hold:')}{len(self.tail.holding - self.tail.ended):,} jobs hold GPUs; left to run {config.hold_s:.0f} s"
                    )
                    await anyio.sleep(config.hold_s)
                self.result.cancels_at = time.time()
                await self.cancel()
                await self.drain()
                self.finish()
                if config.audit:  # while the nodes still beat: no node is lost meanwhile
                    env = {**os.environ, "REDIS_URL": self.url, "NAMESPACE": NAMESPACE, "LOG_LEVEL": "WARNING"}
                    env["APP_PORT"] = self.base.split(":")[2].split("/")[0]
                    code, said = await anyio.to_thread.run_sync(audit_check, env)
                    self.result.audit_code, self.result.audit_said = code, said
                    self.say(f"{row('swift-trainer audit check:')}exit {code}: {said}")
                tg.cancel_scope.cancel()
        except* ServiceDied as died:
            self.result.died = str(died.exceptions[0])
            self.result.unfinished = sorted({s.job_id for s in self.result.sent if s.job_id} - self.tail.ended)
            self.result.entries_read = self.entries_read(every=True)
            self.say(f"{row('STOPPED:')}{self.result.died}")
        finally:
            with anyio.CancelScope(shield=True):
                await redis_client.aclose()

    async def watch(self) -> None:
        """A service that exits ends the run: nothing would decide or answer any more."""
        began = time.monotonic()
        while True:
            await anyio.sleep(0.5)
            for name, process in self.services.items():
                if process.poll() is not None:
                    log = (self.root / f"{name}.log").read_text(errors="replace").splitlines()
                    errors = [line.strip(" |") for line in log if re.match(r"^[\s|+]*\w+(Error|Exception)\b", line)]
                    raise ServiceDied(
                        f"the {name} exited with code {process.returncode}, {time.monotonic() - began:.0f} s into "
                        f"the run: {errors[-1] if errors else '(no error in its log)'}"
                    )

    async def submit(self, planned: Planned, phase: str) -> Sent:
        sent = Sent(planned, phase, time.time())
        response = await self.client.post(f"{self.base}/jobs", json=body(planned, self.root))
        sent.status = response.status_code
        if response.status_code == 202:
            answer = response.json()
            sent.job_id, sent.command_id = answer["job_id"], str(answer["command_position"])
        return sent

    async def joined(self) -> None:
        """Every node in the log, and in the gateway's projection (it refuses a gang job that
        no nodes it knows of could run)."""
        began = time.monotonic()
        await self.tail.until(lambda: len(self.tail.joined) == self.config.nodes, 120)
        joined_at = entry_id_key(self.tail.position)
        with anyio.fail_after(60):
            while entry_id_key((await self.client.get(f"{self.base}/health")).json()["log_position"]) < joined_at:
                await anyio.sleep(0.1)
        self.say(
            f"{row('cluster up:')}{self.config.nodes} nodes x {self.config.gpus_per_node} GPUs joined in "
            f"{time.monotonic() - began:.1f} s"
        )

    async def idle(self) -> None:
        """Heartbeats only: how many the scheduler absorbs, at what CPU."""
        sent, read = self.cluster.sent, self.entries_read()
        self.cpu.mark("idle")
        await anyio.sleep(self.config.idle_s)
        seconds, used = self.cpu.since("idle")
        sent, read = self.cluster.sent - sent, self.entries_read() - read
        self.say(
            f"{row('heartbeats absorbed (idle):')}{read / seconds:,.0f} telemetry entries/s read by the scheduler "
            f"({sent / seconds:,.0f}/s sent: per node a GPU reading and two presences); CPU: scheduler "
            f"{used['scheduler'] / seconds:.1%}, Redis {used['redis'] / seconds:.1%}, gateway "
            f"{used['gateway'] / seconds:.1%}, load {used['load'] / seconds:.1%} of a core"
        )
        self.say(
            f"{row('  CPU per telemetry entry:')}scheduler {used['scheduler'] / max(read, 1) * 1e6:.0f} us, "
            f"Redis {used['redis'] / max(read, 1) * 1e6:.0f} us"
        )

    async def burst(self, jobs: list[Planned]) -> None:
        """Every job at once, ``concurrency`` requests in flight."""
        config = self.config
        self.cpu.mark("burst")
        limiter = anyio.Semaphore(config.concurrency)
        sent = self.result.sent

        async def one(planned: Planned) -> None:
            async with limiter:
                sent.append(await self.submit(planned, "burst"))

        async with anyio.create_task_group() as load:
            for planned in jobs:
                load.start_soon(one, planned)
        seconds, used = self.cpu.since("burst")
        sent = [s for s in sent if s.phase == "burst"]
        self.result.burst_cpu_s = used
        accepted = sum(1 for s in sent if s.status == 202)
        self.say(
            f"{row('REST burst:')}{accepted:,} accepted of {len(jobs):,} in {seconds:.1f} s ({accepted / seconds:,.0f}/s, "
            f"{config.concurrency} in flight, httpx in the load process); CPU: scheduler "
            f"{used['scheduler'] / seconds:.0%}, gateway {used['gateway'] / seconds:.0%}, Redis "
            f"{used['redis'] / seconds:.0%}, load {used['load'] / seconds:.0%} of a core"
        )

    async def cancel(self) -> None:
        """Half of the cancels go to jobs holding GPUs (gangs first), the rest to waiting ones
        (``--cancels 1``: every job not ended, to end a run of full-length jobs at once)."""
        count = round(self.config.cancels * self.config.jobs)
        sent = {s.job_id: s for s in self.result.sent if s.job_id}
        holding = sorted(j for j in self.tail.holding if j in sent and j not in self.tail.ended)
        holding.sort(key=lambda j: -sent[j].planned.nodes)
        waiting = sorted(j for j in sent if j not in self.tail.holding and j not in self.tail.ended)
        random.Random(self.config.seed).shuffle(waiting)
        targets = holding[: count - count // 2]
        targets += waiting[: count - len(targets)]
        limiter = anyio.Semaphore(self.config.concurrency)

        async def one(job_id: str) -> None:
            async with limiter:
                await self.client.post(f"{self.base}/jobs/{job_id}/cancel")

        async with anyio.create_task_group() as tg:
            for job_id in targets:
                tg.start_soon(one, job_id)
        gangs = sum(1 for j in targets[: len(holding)] if sent[j].planned.nodes > 1)
        self.say(
            f"{row('cancels:')}{len(targets)} ({min(len(holding), count - count // 2)} holding GPUs, {gangs} of them gangs)"
        )

    async def drain(self) -> None:
        submitted = {s.job_id for s in self.result.sent if s.job_id}
        began = time.monotonic()
        try:
            await self.tail.until(lambda: submitted <= self.tail.ended, self.config.drain_timeout_s)
        except TimeoutError:
            self.result.unfinished = sorted(submitted - self.tail.ended)
        self.say(f"{row('drain:')}the last job ended {time.monotonic() - began:.1f} s after the cancels")

    def finish(self) -> None:
        seconds, used = self.cpu.since("run")
        self.say(
            f"{row('CPU over the run:')}{seconds:.0f} s: scheduler {used['scheduler'] / seconds:.0%}, gateway "
            f"{used['gateway'] / seconds:.0%}, Redis {used['redis'] / seconds:.0%}, load {used['load'] / seconds:.0%} "
            f"of a core; host load average {os.getloadavg()[0]:.1f}"
        )
        cluster = self.cluster
        late = sorted(cluster.late_s)
        self.say(
            f"{row('the nodes (this process):')}{cluster.beats:,} GPU readings, sent late by p99 "
            f"{percentile(late, 0.99) * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms; {cluster.starts:,} rank starts, "
            f"{cluster.ends:,} ends, {cluster.stops} stops answered"
        )
        self.result.stops_answered = cluster.stops
        self.result.nodes_lost = list(self.tail.lost)
        self.result.entries_read = self.entries_read(every=True)
        memory = self.sync.info("memory")["used_memory"]
        self.say(
            f"{row('Redis memory at the end:')}{memory / 2**20:,.1f} MiB used_memory "
            f"({self.sync.xlen(self.keys.events):,} log entries, telemetry capped at {TELEMETRY_MAXLEN:,})"
        )

    def entries_read(self, *, every: bool = False) -> int:
        """Entries the scheduler's group has read from the telemetry (``every``: from its three
        streams); 0 on Redis 6.2, which does not count them."""
        total = 0
        for stream in (self.keys.commands, self.keys.events, self.keys.telemetry) if every else (self.keys.telemetry,):
            groups = [g for g in self.sync.xinfo_groups(stream) if g["name"] == SCHEDULER_GROUP.encode()]
            total += int(groups[0].get("entries-read") or 0) if groups else 0
        return total


def audit_check(env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "audit", "check", "--require-gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    said = next((line for line in text if "VIOLATION" in line or "BROKEN" in line), text[-1] if text else "")
    return done.returncode, said[:300]


# ---------------------------------------------------------------------------------------------
# What the log says


def read_log(client: redis.Redis, keys: Keys) -> Iterator[tuple[str, m.Message]]:
    start = "-"
    while True:
        page = client.xrange(keys.events, min=start, count=5000)
        for entry_id, fields in page:
            yield entry_id.decode(), decode({k.decode(): v.decode() for k, v in fields.items()})
        if len(page) < 5000:
            return
        start = "(" + page[-1][0].decode()


@dataclass
class Timeline:
    """Per job, when its facts landed (entry ids)."""

    queued: dict[str, str] = field(default_factory=dict)
    position: dict[str, int] = field(default_factory=dict)  # its place in the queue when queued
    scheduled: dict[str, str] = field(default_factory=dict)
    started: dict[str, list[str]] = field(default_factory=dict)  # the first attempt's ranks


def analyse(config: Config, result: Result, client: redis.Redis) -> None:
    """Latencies, decisions per second and GPU occupancy, from the log."""
    keys = Keys(NAMESPACE)
    say = result.say
    state = State()
    timeline = Timeline()
    capacity: dict[str, int] = {}
    free: dict[str, int] = {}
    by_free: Counter[int] = Counter()  # nodes by how many GPUs they have free
    waiting: Counter[tuple[int, int]] = Counter()  # queued jobs by shape
    released: dict[str, float] = {}  # GPU -> when its last holder let it go (while work waited)
    gaps: list[float] = []  # a GPU freed while work waited -> its next holder
    totals = Counter[str]()  # GPU-seconds
    clock: float | None = None
    first_queued: float | None = None

    def fits(shape: tuple[int, int]) -> bool:
        gpus, nodes = shape
        return sum(count for k, count in by_free.items() if k >= gpus) >= nodes

    def held(job: Any) -> list[tuple[str, list[int]]]:
        if job is None or job.status not in HOLDS_GPUS:
            return []
        return [(rank.node, list(rank.gpu_ids)) for rank in job.ranks]

    def move(node: str, delta: int) -> None:
        by_free[free[node]] -= 1
        free[node] += delta
        by_free[free[node]] += 1

    for entry_id, event in read_log(client, keys):
        at = landed(entry_id)
        if clock is not None and at > clock and (result.cancels_at is None or clock < result.cancels_at):
            dt = min(at, result.cancels_at or at) - clock
            total = sum(capacity.values())
            used = total - sum(free.values())
            if sum(waiting.values()):
                totals["queued_s"] += dt
                totals["busy_queued"] += used * dt
                totals["total_queued"] += total * dt
                if any(fits(shape) for shape in waiting):
                    head = next(state.queue_iter(), None)
                    head_fits = head is not None and fits((head.spec.gpu_count, head.spec.nodes))
                    totals["fits_s"] += dt
                    totals["busy_fits"] += used * dt
                    totals["total_fits"] += total * dt
                    totals["idle_head_fits" if head_fits else "idle_held_back"] += (total - used) * dt
        clock = at
        job_id = event.job_id or ""
        job = state.jobs.get(job_id)
        before = held(job)
        was_queued = job is not None and job.status == JobStatus.queued
        state.apply(entry_id, event)
        job = state.jobs.get(job_id)
        after = held(job)
        if isinstance(event, m.NodeJoined) and event.node not in capacity:
            capacity[event.node] = free[event.node] = len(event.gpus)
            by_free[free[event.node]] += 1
        elif isinstance(event, m.NodeLost):
            by_free[free[event.node]] -= 1
            capacity[event.node] = free[event.node] = 0
            by_free[0] += 1
        if before != after:
            for node, gpus in before:
                move(node, len(gpus))
                for index in gpus:
                    if sum(waiting.values()):
                        released[f"{node}/{index}"] = at
            for node, gpus in after:
                move(node, -len(gpus))
                for index in gpus:
                    if (freed := released.pop(f"{node}/{index}", None)) is not None:
                        gaps.append((at - freed) * 1000)
        now_queued = job is not None and job.status == JobStatus.queued
        if was_queued != now_queued and job is not None:
            waiting[(job.spec.gpu_count, job.spec.nodes)] += 1 if now_queued else -1
            if not sum(waiting.values()):
                released.clear()  # no work waits: a GPU idle from now on waits for none
        if isinstance(event, m.JobQueued):
            timeline.queued.setdefault(job_id, entry_id)
            timeline.position.setdefault(job_id, event.position)
            first_queued = first_queued or at
        elif isinstance(event, m.JobScheduled):
            timeline.scheduled.setdefault(job_id, entry_id)
            result.gangs_started += bool(event.peers)
        elif isinstance(event, m.JobStarted) and event.attempt == 1:
            timeline.started.setdefault(job_id, []).append(entry_id)

    sent = {s.job_id: s for s in result.sent if s.job_id}
    result.refused = Counter(s.status for s in result.sent if s.status != 202)
    result.outcomes = Counter(str(state.jobs[j].status) for j in sent if j in state.jobs)

    def decided(phase: str) -> list[float]:
        return [
            (landed(timeline.queued[j]) - s.sent_at) * 1000
            for j, s in sent.items()
            if s.phase == phase and j in timeline.queued
        ]

    def in_stream(phase: str) -> list[float]:
        return [
            (entry_id_key(timeline.queued[j])[0] - entry_id_key(s.command_id)[0]) * 1.0
            for j, s in sent.items()
            if s.phase == phase and j in timeline.queued
        ]

    warm = [s for s in sent.values() if s.phase == "warmup"]
    started = [
        (landed(max(timeline.started[s.job_id], key=entry_id_key)) - s.sent_at) * 1000
        for s in warm
        if len(timeline.started.get(s.job_id, [])) == s.planned.nodes
    ]
    at_once = sum(
        1
        for s in warm
        if timeline.scheduled.get(s.job_id, "").split("-")[0] == timeline.queued.get(s.job_id, "").split("-")[0]
    )
    for phase, label in (("warmup", "idle"), ("burst", "burst"), ("probe", "busy")):
        ahead = [timeline.position[j] - 1 for j, s in sent.items() if s.phase == phase and j in timeline.position]
        queue = f"  ({percentile(ahead, 0.5):,} queued ahead at p50)" if ahead else ""
        say(f"{row(label + ': submit -> decision:')}{stats(decided(phase))}{queue}")
        say(f"{row('  job.submit -> job.queued:')}{stats(in_stream(phase))}  (in the scheduler; 1 ms resolution)")
        if phase == "warmup":
            say(f"{row('idle: submit -> started:')}{stats(started)}  ({at_once} of {len(warm)} placed at once)")
    burst = [s for s in sent.values() if s.phase == "burst" and s.job_id in timeline.queued]
    if burst:
        span = max(landed(timeline.queued[s.job_id]) for s in burst) - min(s.sent_at for s in burst)
        cpu = result.burst_cpu_s.get("scheduler", 0.0) / len(burst) * 1e6
        say(
            f"{row('sustained decisions (burst):')}{len(burst) / span:,.0f} submits decided/s ({len(burst):,} in "
            f"{span:.1f} s); scheduler CPU {cpu:,.0f} us per submit (heartbeats and job ends included)"
        )
    if totals["total_queued"]:
        say(
            f"{row('GPU occupancy while jobs queued:')}{totals['busy_queued'] / totals['total_queued']:.1%} "
            f"over {totals['queued_s']:.0f} s (up to the cancels)"
        )
    if totals["total_fits"]:
        idle = totals["total_fits"] - totals["busy_fits"]
        say(
            f"{row('  while a queued job fit:')}{totals['busy_fits'] / totals['total_fits']:.1%} over {totals['fits_s']:.0f} s; "
            f"idle GPU-s {idle:,.0f}: {totals['idle_held_back'] / max(idle, 1e-9):.0%} held back behind a head that "
            f"did not fit (strict order), {totals['idle_head_fits'] / max(idle, 1e-9):.0%} with the head fitting"
        )
    if gaps:
        mean = sum(gaps) / len(gaps)
        say(
            f"{row('  a GPU freed while jobs queued:')}its next job after p50 {percentile(gaps, 0.5):.0f} ms, mean {mean:.0f} ms, p99 {percentile(gaps, 0.99):.0f} ms ({len(gaps):,})"
        )
    say(
        f"{row('outcome:')}{dict(result.outcomes)}; {result.gangs_started} gang starts; refused {dict(result.refused)}; "
        f"unfinished {len(result.unfinished)}; nodes lost {len(result.nodes_lost)}"
    )


def run(config: Config, root: Path | None = None) -> Result:
    """Start Redis, the scheduler and the gateway, drive the cluster, and measure."""
    result = Result(config)
    with tempfile.TemporaryDirectory() as tmp:
        root = root or Path(tmp)
        (root / "model").mkdir(parents=True, exist_ok=True)
        (root / "model" / "config.json").write_text("{}")
        (root / "data.jsonl").write_text('{"messages": []}\n')
        port = free_port()
        server = embedded_redis.start(root / "redis", port, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        wait_for(lambda: _ping(client), 10, "redis")
        url = f"redis://127.0.0.1:{port}/0"
        app_port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": url,
            "NAMESPACE": NAMESPACE,
            "APP_PORT": str(app_port),
            "DATA_DIR": str(root),
            "PATH_ROOTS": str(root),
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "HEARTBEAT_INTERVAL_S": str(config.heartbeat_s),
            "NODE_TIMEOUT_S": str(config.node_timeout_s),
            "NODE_NAME": "control",
            **config.extra_env,
        }
        processes: dict[str, subprocess.Popen[bytes]] = {}
        logs = {name: (root / f"{name}.log").open("ab") for name in ("scheduler", "gateway")}
        try:
            tally = root / "scheduler-tally.json"
            commands = {
                "scheduler": [
                    sys.executable,
                    "-m",
                    "tests.benchmarks.bench_cluster",
                    "scheduler-with-tally",
                    str(tally),
                ],
                "gateway": [sys.executable, "-m", "services.cli", "gateway"],
            }
            for name, argv in commands.items():
                processes[name] = subprocess.Popen(argv, env=env, stdout=logs[name], stderr=logs[name])
            base = f"http://127.0.0.1:{app_port}/api/v1/training"
            wait_for(lambda: _answers(base), 60, "the gateway", interval_s=0.2)
            cpu = Cpu(
                {
                    "scheduler": psutil.Process(processes["scheduler"].pid),
                    "gateway": psutil.Process(processes["gateway"].pid),
                    "redis": psutil.Process(server.pid),
                    "load": psutil.Process(),
                }
            )
            floor = io.StringIO()
            with contextlib.redirect_stdout(floor):
                raw_redis(client, Keys(NAMESPACE))
            for line in floor.getvalue().splitlines():
                result.say(line)
            result.say(
                f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {config.nodes} nodes x "
                f"{config.gpus_per_node} GPUs, {config.jobs:,} jobs, run times {config.run_min_s * config.time_scale:.1f}-"
                f"{config.run_max_s * config.time_scale:.1f} s, heartbeats every {config.heartbeat_s} s"
            )
            drive = Drive(config, result, processes, url, base, root, cpu, client)
            anyio.run(drive.run, backend_options={"use_uvloop": True})
            analyse(config, result, client)
        finally:
            for process in processes.values():
                process.terminate()
            for process in processes.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for log in logs.values():
                log.close()
            if tally.exists():
                result.tally = Counter(json.loads(tally.read_text()))
                decided, reads = result.tally["decided"], result.tally["reads decided"]
                result.say(
                    f"{row('scheduler commits:')}{result.tally['commit OK']:,} landed, {result.tally['commit CONFLICT']:,} "
                    f"conflicted (the log had moved on: the read decided again); {decided:,} deliveries decided in "
                    f"{reads:,} reads, for {result.entries_read:,} entries read "
                    f"({decided / max(result.entries_read, 1):.1f} decisions each)"
                )
            result.scheduler_log = (root / "scheduler.log").read_text(errors="replace")[-5000:]
            server.terminate()
            server.wait()
            client.close()
    return result


def scheduler_with_tally(path: Path) -> int:
    """The scheduler process, counting how its commits ended (each CONFLICT is a read decided
    again on a log that moved on) and how many deliveries it decided, written to ``path`` at exit."""
    from events.bus import Bus as CommittingBus
    from services import cli
    from services.scheduler.committer import Committer

    tally: Counter[str] = Counter()
    run_commit, decide = CommittingBus.run_commit, Committer._decide

    async def counted_commit(self: Bus, prepared: Any, expect_last: str | None = None) -> Any:
        result = await run_commit(self, prepared, expect_last)
        tally[f"commit {result.status}"] += 1
        return result

    def counted_decide(self: Committer, deliveries: list[Delivery]) -> Any:
        tally["decided"] += len(deliveries)
        tally["reads decided"] += 1
        return decide(self, deliveries)

    CommittingBus.run_commit = counted_commit  # type: ignore[method-assign]
    Committer._decide = counted_decide  # type: ignore[method-assign]
    atexit.register(lambda: path.write_text(json.dumps(tally)))
    return cli.main(["scheduler"])


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code in (200, 503)
    except httpx.TransportError:
        return False


def main() -> None:
    if sys.argv[1:2] == ["scheduler-with-tally"]:
        sys.exit(scheduler_with_tally(Path(sys.argv[2])))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="jobs one at a time on idle GPUs")
    parser.add_argument("--probes", type=int, default=defaults.probes, help="jobs one at a time after the burst")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests in flight in the burst")
    parser.add_argument("--heartbeat-s", type=float, default=defaults.heartbeat_s, help="HEARTBEAT_INTERVAL_S")
    parser.add_argument("--node-timeout-s", type=float, default=defaults.node_timeout_s, help="NODE_TIMEOUT_S")
    parser.add_argument(
        "--time-scale", type=float, default=defaults.time_scale, help="run times: 20-120 s times this (1: full length)"
    )
    parser.add_argument(
        "--job-memory-mb", type=int, default=defaults.job_memory_mb, help="a busy GPU's memory use (0: none)"
    )
    parser.add_argument("--cancels", type=float, default=defaults.cancels, help="share of the jobs cancelled")
    parser.add_argument("--idle-s", type=float, default=defaults.idle_s, help="the idle cluster, measured")
    parser.add_argument(
        "--hold-s",
        type=float,
        default=defaults.hold_s,
        help="let the cluster run after the probes (before the cancels)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-audit", action="store_true", help="skip swift-trainer audit check")
    args = parser.parse_args()
    config = Config(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        jobs=args.jobs,
        warmup=args.warmup,
        probes=args.probes,
        concurrency=args.concurrency,
        heartbeat_s=args.heartbeat_s,
        node_timeout_s=args.node_timeout_s,
        time_scale=args.time_scale,
        job_memory_mb=args.job_memory_mb,
        cancels=args.cancels,
        idle_s=args.idle_s,
        hold_s=args.hold_s,
        seed=args.seed,
        audit=not args.no_audit,
    )
    result = run(config)
    if result.unfinished:
        print(f"{len(result.unfinished)} jobs never ended, e.g. {result.unfinished[:5]}")
        print(result.scheduler_log)


if __name__ == "__main__":
    main()
