"""Scheduler benchmark: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_scheduler [--queued 10000] [--submits 500] [--pool | --pool-only]

Runs a throwaway redis-server and the real scheduler process, with one simulated GPU held by a
running job and ``--queued`` jobs already waiting. Prints, in one run: the raw Redis round trip and
a raw batched XREADGROUP/XACK loop (the floor), then submit -> decision latency and sustained
decisions per second (the scheduler alone: commands appended straight to its stream), then starts
the real gateway and measures accepted submissions per second over REST, with one gateway process
and then with two sharing the port (``--gateways``; ``--gateways 0``: no REST load). The REST load
comes from ``wrk`` when it is installed (``apt-get install wrk``: a C load generator that leaves the
two cores to the system under test), else from an httpx client in this process, which costs more
CPU than the gateway it measures.

``--pool`` then measures the same rows again (prefixed ``pool``) with the pool shared, everything
on: PREEMPTION=priority, QUOTA_BORROWING=true, FAIR_SHARE=true and a QUOTAS table of 100 users
and five teams, on a node of 64 simulated GPUs that running jobs hold (some borrowing), with
``--queued`` jobs of mixed priorities waiting over their teams' quotas. Some submissions are urgent
(priority 9, within quota) and must preempt a running job; some borrowing jobs end, and a waiting
job over quota must borrow the GPU. It prints how many preemptions and borrowing starts the run
made (so that the paths are known to have run). ``--pool-only`` skips the first measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import psutil
import redis

from events import messages as m
from events.codec import decode, encode
from events.keys import SCHEDULER_GROUP, Keys
from events.params import LanguageModelJob
from events.quotas import Quotas
from services import embedded_redis
from tests.conftest import free_port, wait_for

Submit = Callable[[int], m.SubmitJob]  # the i-th submission of a measurement


def row(name: str) -> str:
    """A row's name, padded so that the numbers line up."""
    return f"{name:<34}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def raw_redis(client: redis.Redis, keys: Keys) -> None:
    rtts = []
    for _ in range(2000):
        start = time.perf_counter()
        client.ping()
        rtts.append((time.perf_counter() - start) * 1000)
    print(f"raw redis PING round trip:        p50 {percentile(rtts, 0.5):.3f} ms  p99 {percentile(rtts, 0.99):.3f} ms")
    stream = f"{keys.tag}:bench"
    pipe = client.pipeline(transaction=False)
    for i in range(100_000):
        pipe.xadd(stream, {"i": i})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    client.xgroup_create(stream, "g", id="0")
    start = time.perf_counter()
    moved = 0
    while True:
        reply = client.xreadgroup("g", "c", {stream: ">"}, count=100)
        if not reply:
            break
        ids = [entry_id for entry_id, _ in reply[0][1]]
        client.xack(stream, "g", *ids)
        moved += len(ids)
    rate = moved / (time.perf_counter() - start)
    print(f"raw XREADGROUP COUNT 100 + XACK:  {rate:,.0f} msg/s")
    client.delete(stream)


def prefill(client: redis.Redis, keys: Keys, queued: int, job: LanguageModelJob) -> None:
    """A node with one GPU, a job running on it, and ``queued`` jobs waiting behind it."""
    gpu = m.GpuInfo(index=0, uuid="SIM-bench-0", name="Simulated GPU (no NVML)", memory_total_mb=24576)
    facts: list[m.Message] = [
        m.NodeJoined(node="bench", simulated=True, gpus=[gpu]),
        m.JobAccepted(job_id="running", spec=job),
        m.JobQueued(job_id="running", position=1),
        m.JobScheduled(job_id="running", node="bench", gpu_ids=[0], attempt=1),
        m.JobStarted(
            job_id="running", attempt=1, node="bench", pid=1, pgid=1, run_dir="/r", argv=[], cuda_visible_devices="0"
        ),
    ]
    for i in range(queued):
        facts += [m.JobAccepted(job_id=f"q{i}", spec=job), m.JobQueued(job_id=f"q{i}", position=i + 1)]
    append_all(client, keys, facts)


def append_all(client: redis.Redis, keys: Keys, facts: list[m.Message]) -> None:
    pipe = client.pipeline(transaction=False)
    for i, fact in enumerate(facts):
        pipe.xadd(keys.events, encode(fact))
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


class Pool:
    """The pool shared by 100 users, everything on. Users u00-u79 form teams t0-t3 (20 each, 8
    GPUs each within quota) and have every queued job: their teams hold their quotas, so all of
    them wait over quota, and a pass finds no job within quota to stop at. Users u80-u89 (no team)
    run low-priority preemptible jobs and queue none; u90-u99 (team prod) only submit urgent jobs
    (priority 9, within quota), each of which must preempt. Of the 64 GPUs, 48 are held within
    quota (the teams' 32 at priorities 4-6, a quarter of them not preemptible, and the batch
    users' 16 at 0-1) and 16 by borrowing jobs, the first victims; the bench ends some of those
    borrowing jobs, and each time a job over quota must borrow the GPU."""

    GPUS = 64  # SIMULATED_GPUS's limit, one node
    TEAMS = ("t0", "t1", "t2", "t3")

    def __init__(self, queued: int, job: LanguageModelJob, seed: int = 1) -> None:
        self.queued, self.job = queued, job
        self.rng = random.Random(seed)
        users = [f"u{i:02d}" for i in range(100)]
        self.backlog, self.batch, self.urgent = users[:80], users[80:90], users[90:]
        self.team: dict[str, str | None] = {user: self.TEAMS[i % 4] for i, user in enumerate(self.backlog)}
        self.team |= dict.fromkeys(self.batch) | dict.fromkeys(self.urgent, "prod")
        self.borrowing: list[str] = []  # running borrowing jobs, in the order they are ended
        self.urgent_ids: set[str] = set()  # the urgent submissions made

    def quotas(self) -> dict[str, object]:
        users: dict[str, dict[str, int]] = {user: {"gpus": 2, "queued": 5000} for user in self.backlog + self.batch}
        users |= {user: {"gpus": 4, "queued": 100} for user in self.urgent}
        users["*"] = {"gpus": 0, "queued": 0}
        teams = {team: {"gpus": 8} for team in self.TEAMS} | {"prod": {"gpus": 40}}
        return {"users": users, "teams": teams}

    def env(self) -> dict[str, str]:
        return {
            "PREEMPTION": "priority",
            "QUOTA_BORROWING": "true",
            "FAIR_SHARE": "true",
            "QUOTAS": json.dumps(self.quotas()),
            "SIMULATED_GPUS": str(self.GPUS),
        }

    def spec(self, priority: int, preemptible: bool, gpus: int = 1) -> LanguageModelJob:
        return self.job.model_copy(update={"priority": priority, "preemptible": preemptible, "gpu_count": gpus})

    def facts(self) -> list[m.Message]:
        gpus = [
            m.GpuInfo(index=i, uuid=f"SIM-bench-{i}", name="Simulated GPU (no NVML)", memory_total_mb=24576)
            for i in range(self.GPUS)
        ]
        quotas = Quotas.model_validate(self.quotas())
        facts: list[m.Message] = [
            m.NodeJoined(node="bench", simulated=True, gpus=gpus),
            m.QuotasChanged(quotas=quotas, from_config=True, actor="config"),
        ]
        running: list[tuple[str, int, bool, bool]] = []  # owner, priority, preemptible, borrowing
        for team in self.TEAMS:
            members = [user for user in self.backlog if self.team[user] == team]
            running += [(members[k], 4 + k % 3, k % 4 != 0, False) for k in range(8)]
            running += [(members[k], k % 4, True, True) for k in range(8, 12)]
        running += [(user, k, True, False) for user in self.batch[:8] for k in range(2)]
        began = datetime.now(UTC) - timedelta(hours=2)
        for index, (owner, priority, preemptible, borrowing) in enumerate(running):
            job_id, at = f"r{index}", began + timedelta(seconds=index)
            common = {"job_id": job_id, "at": at}
            facts += [
                m.JobAccepted(spec=self.spec(priority, preemptible), actor=owner, team=self.team[owner], **common),
                m.JobQueued(position=1, **common),
                m.JobScheduled(node="bench", gpu_ids=[index], attempt=1, borrowing=borrowing, **common),
                m.JobStarted(
                    attempt=1,
                    node="bench",
                    pid=1,
                    pgid=1,
                    run_dir="/r",
                    argv=[],
                    cuda_visible_devices=str(index),
                    job_id=job_id,
                    at=at + timedelta(seconds=1),
                ),
            ]
            if borrowing:
                self.borrowing.append(job_id)
        self.rng.shuffle(self.borrowing)
        for i in range(self.queued):
            owner = self.backlog[i % len(self.backlog)]
            spec = self.spec(self.rng.randint(0, 4), self.rng.random() < 0.85, 2 if self.rng.random() < 0.1 else 1)
            common = {"job_id": f"q{i}"}
            facts += [
                m.JobAccepted(spec=spec, actor=owner, team=self.team[owner], **common),
                m.JobQueued(position=i + 1, **common),
            ]
        return facts

    def submit(self, urgent: bool = False) -> m.SubmitJob:
        """A submission over quota, of a backlog user; or an urgent one that must preempt."""
        job_id = uuid.uuid4().hex
        if urgent:
            owner = self.urgent[len(self.urgent_ids) % len(self.urgent)]
            self.urgent_ids.add(job_id)
            spec = self.spec(9, False)
        else:
            owner = self.rng.choice(self.backlog)
            spec = self.spec(self.rng.randint(0, 4), self.rng.random() < 0.85)
        return m.SubmitJob(job_id=job_id, spec=spec, actor=owner, team=self.team[owner])

    def every(self, count: int, urgent: int) -> Submit:
        """The i-th of ``count`` submissions: ``urgent`` of them, spread out, urgent."""
        step = count // urgent if urgent else 0
        return lambda i: self.submit(urgent=bool(step) and i % step == step // 2 and i // step < urgent)


def _last(client: redis.Redis, keys: Keys) -> bytes:
    return client.xrevrange(keys.events, count=1)[0][0]  # type: ignore[no-any-return]


def decision_latency(client: redis.Redis, keys: Keys, submit: Submit, submits: int, label: str = "") -> None:
    last = _last(client, keys)
    latencies = []
    for i in range(submits):
        command = submit(i)
        job_id = command.job_id or ""
        start = time.perf_counter()
        client.xadd(keys.commands, encode(command))
        while True:
            reply = client.xread({keys.events: last}, block=5000, count=100)
            assert reply, "no decision within 5 s"
            for entry_id, fields in reply[0][1]:
                last = entry_id
                if fields[b"job_id"].decode() == job_id and fields[b"type"] == b"job.queued":
                    latencies.append((time.perf_counter() - start) * 1000)
            if len(latencies) and fields[b"job_id"].decode() == job_id:
                break
    print(
        f"{row(label + 'submit -> decision latency:')}p50 {percentile(latencies, 0.5):.2f} ms  p99 {percentile(latencies, 0.99):.2f} ms  ({submits} submits)"
    )


def pool_latency(client: redis.Redis, keys: Keys, pool: Pool, submits: int, urgent: int, ends: int) -> None:
    """Submit -> decision latency of the pool's submissions, ``urgent`` of them preempting; and,
    ``ends`` times in between, a borrowing job's end -> a job over quota scheduled on its GPU."""
    last = _last(client, keys)
    preempted: set[str] = set()

    def wait(job_id: str | None, kind: bytes) -> None:
        """Read the log up to a fact of this kind (of this job; with None, of a borrowing start)."""
        nonlocal last
        found = False
        while not found:
            reply = client.xread({keys.events: last}, block=5000, count=100)
            assert reply, "no decision within 5 s"
            for entry_id, fields in reply[0][1]:
                last = entry_id
                if fields[b"type"] == b"job.preempted":
                    preempted.add(fields[b"job_id"].decode())
                if fields[b"type"] == kind:
                    if job_id is None:
                        found = found or decode(fields).borrowing  # type: ignore[attr-defined]
                    else:
                        found = found or fields[b"job_id"].decode() == job_id

    submit = pool.every(submits, urgent)
    end_every = submits // ends if ends else 0
    latencies: list[float] = []
    urgent_latencies: list[float] = []
    borrowed: list[float] = []
    for i in range(submits):
        if end_every and i % end_every == 0 and i // end_every < ends:
            ending = next(job_id for job_id in pool.borrowing if job_id not in preempted)
            pool.borrowing.remove(ending)
            end = m.JobSucceeded(job_id=ending, attempt=1, exit_code=0, run_dir="/r")
            start = time.perf_counter()
            client.xadd(keys.events, encode(end))  # as the runner reports it
            wait(None, b"job.scheduled")
            borrowed.append((time.perf_counter() - start) * 1000)
        command = submit(i)
        start = time.perf_counter()
        client.xadd(keys.commands, encode(command))
        urgent = command.spec.priority == 9  # its job.queued, then its job.scheduled, in one decision
        wait(command.job_id, b"job.scheduled" if urgent else b"job.queued")
        (urgent_latencies if urgent else latencies).append((time.perf_counter() - start) * 1000)
    both = latencies + urgent_latencies
    print(
        f"{row('pool submit -> decision latency:')}p50 {percentile(both, 0.5):.2f} ms  p99 {percentile(both, 0.99):.2f} ms  "
        f"({submits} submits, {len(urgent_latencies)} of them preempting)"
    )
    if urgent_latencies:
        print(
            f"{row('pool   preempting submits:')}p50 {percentile(urgent_latencies, 0.5):.2f} ms  "
            f"max {max(urgent_latencies):.2f} ms"
        )
    if borrowed:
        print(
            f"{row('pool   job end -> borrower start:')}p50 {percentile(borrowed, 0.5):.2f} ms  "
            f"max {max(borrowed):.2f} ms  ({len(borrowed)} ends)"
        )


def sustained(client: redis.Redis, keys: Keys, submit: Submit, count: int, label: str = "") -> None:
    commands = [submit(i) for i in range(count)]
    ids = [command.job_id or "" for command in commands]
    encoded = [encode(command) for command in commands]  # before the clock starts
    last = _last(client, keys)  # before submitting: no decision is missed
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i, fields in enumerate(encoded):
        pipe.xadd(keys.commands, fields)
        if i % 500 == 499:  # in chunks, so that the scheduler starts on the first ones at once
            pipe.execute()
    pipe.execute()
    remaining = set(ids)
    quiet_since = time.monotonic()
    while remaining:
        reply = client.xread({keys.events: last}, block=4000, count=1000)  # under the 5 s socket timeout
        if not reply:
            assert time.monotonic() - quiet_since < 60, f"no decision for 60 s; {len(remaining)} left"
            continue
        quiet_since = time.monotonic()
        for entry_id, fields in reply[0][1]:
            last = entry_id
            if fields[b"type"] == b"job.queued":
                remaining.discard(fields[b"job_id"].decode())
    rate = count / (time.perf_counter() - start)
    print(f"{row(label + 'sustained decisions:')}{rate:,.0f} submits decided/s ({count} submits)")


def paths_run(client: redis.Redis, keys: Keys, after: bytes, urgent: set[str]) -> None:
    """What the pool's run did: preemptions by reason, borrowing starts, rejections, and how many
    urgent submissions started (each should, in its own decision: one that did not may have been
    decided on a heartbeat that had grown too old while the scheduler was busy)."""
    tally: Counter[str] = Counter()
    start = b"(" + after
    while True:
        entries = client.xrange(keys.events, min=start, count=5000)
        if not entries:
            break
        for _, fields in entries:
            kind = fields[b"type"]
            if kind == b"job.preempted":
                tally[f"preempted ({decode(fields).reason})"] += 1  # type: ignore[attr-defined]
            elif kind == b"job.scheduled":
                scheduled = decode(fields)
                tally["scheduled"] += 1
                tally["borrowing starts"] += scheduled.borrowing  # type: ignore[attr-defined]
                tally["preempting starts"] += bool(scheduled.preempted)  # type: ignore[attr-defined]
                tally["urgent starts"] += scheduled.job_id in urgent
            elif kind == b"job.rejected":
                tally["rejected"] += 1
        start = b"(" + entries[-1][0]
    print(
        f"{row('pool paths run:')}{tally['preempted (priority)'] + tally['preempted (borrowing)']} preemptions "
        f"({tally['preempted (borrowing)']} of borrowing jobs, {tally['preempted (priority)']} by priority) for "
        f"{tally['preempting starts']} starts; {tally['borrowing starts']} borrowing starts; "
        f"{tally['scheduled']} starts in all; {tally['rejected']} rejected; "
        f"{tally['urgent starts']} of {len(urgent)} urgent submissions started"
    )


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %s
"""


def rest_wrk(base: str, body: dict[str, object], seconds: int, concurrency: int) -> None:
    """Accepted submissions per second, loaded by wrk: non-2xx answers are counted apart."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT % json.dumps(json.dumps(body)))
        script.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", script.name, f"{base}/jobs"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    total = int(re.search(r"(\d+) requests in ([\d.]+)(m?s)", out).group(1))  # type: ignore[union-attr]
    elapsed = re.search(r"requests in ([\d.]+)(m?s)", out)
    duration = float(elapsed.group(1)) / (1000 if elapsed.group(2) == "ms" else 1)  # type: ignore[union-attr]
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    accepted = total - (int(refused.group(1)) if refused else 0)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    print(
        f"REST POST /jobs accepted:         {accepted / duration:,.0f} /s ({accepted} of {total} in {duration:.1f} s, "
        f"{concurrency} connections, wrk; p99 {p99.group(1) if p99 else '?'})"
    )


async def rest(base: str, body: dict[str, object], count: int, concurrency: int) -> None:
    accepted = 0
    limiter = anyio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one() -> None:
            nonlocal accepted
            async with limiter:
                response = await client.post(f"{base}/jobs", json=body)
                accepted += response.status_code == 202

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
        rate = accepted / (time.perf_counter() - start)
    print(f"REST POST /jobs accepted:         {rate:,.0f} /s ({accepted} of {count}, {concurrency} concurrent, httpx)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--submits", type=int, default=500)
    parser.add_argument("--sustained", type=int, default=20000)
    parser.add_argument("--rest", type=int, default=2000, help="submissions over REST (httpx)")
    parser.add_argument("--rest-seconds", type=int, default=10, help="duration of the REST load (wrk)")
    parser.add_argument(
        "--gateways", default="1,2", help="gateway processes for the REST load, comma-separated runs (0: none)"
    )
    parser.add_argument(
        "--rest-connections", default="64", help="concurrent connections of the REST load, comma-separated runs"
    )
    parser.add_argument("--pool", action="store_true", help="then measure with the pool shared, everything on")
    parser.add_argument("--pool-only", action="store_true", help="measure with the pool shared only")
    parser.add_argument("--urgent", type=int, default=10, help="pool: preempting submissions per measurement")
    parser.add_argument("--ends", type=int, default=5, help="pool: borrowing jobs ended during the latency run")
    args = parser.parse_args()
    if 2 * args.urgent + args.ends > 40:
        parser.error("the pool has victims and quota for 40 urgent submissions and ends in all")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model").mkdir()
        (root / "data.jsonl").write_text("{}\n")
        job = LanguageModelJob(
            task_type="language_model", model_path=str(root / "model"), data_path=str(root / "data.jsonl")
        )
        print(f"machine: {os.cpu_count()} CPUs; {args.queued:,} jobs queued behind a running one")
        if not args.pool_only:
            measure(root, job, args, None)
        if args.pool or args.pool_only:
            pool = Pool(args.queued, job)
            print(
                f"pool: PREEMPTION=priority QUOTA_BORROWING=true FAIR_SHARE=true, QUOTAS for 100 users and 5 teams; "
                f"{pool.GPUS} GPUs held (16 borrowing); {args.queued:,} jobs queued by 80 users, all over quota"
            )
            measure(root, job, args, pool)


def measure(root: Path, job: LanguageModelJob, args: argparse.Namespace, pool: Pool | None) -> None:
    """One scheduler on a Redis of its own: the plain queue, or (``pool``) the shared pool."""
    label = "pool " if pool is not None else ""
    port = free_port()
    server = embedded_redis.start(root / f"{label}redis", port, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_for(lambda: _ping(client), 10, "redis")
    keys = Keys("bench")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if pool is None or args.pool_only:
            raw_redis(client, keys)
        if pool is None:
            prefill(client, keys, args.queued, job)
        else:
            append_all(client, keys, pool.facts())
        prefilled = _last(client, keys)
        app_port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "NAMESPACE": "bench",
            "APP_PORT": str(app_port),
            "DATA_DIR": str(root),
            "PATH_ROOTS": str(root),
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "SUBMIT_WAIT_S": "2",
            "NODE_TIMEOUT_S": "3600",
            "NODE_NAME": "bench",
            "SIMULATED_GPUS": "1",
            **(pool.env() if pool is not None else {}),
        }
        # The node's gpu-monitor reports its GPUs (held by the running jobs), as on a real node.
        processes += [
            subprocess.Popen([sys.executable, "-m", "services.cli", name], env=env)
            for name in ("gpu-monitor", "scheduler")
        ]
        wait_for(lambda: client.get(keys.leader), 60, "a scheduler leader", interval_s=0.2)
        # The scheduler first reads the prefilled log through its group: measure once it is done.
        wait_for(lambda: _caught_up(client, keys), 120, "the scheduler to read the log", interval_s=0.2)
        if pool is None:
            plain: Submit = lambda _: m.SubmitJob(job_id=uuid.uuid4().hex, spec=job)  # noqa: E731
            decision_latency(client, keys, plain, 20)  # warm up
            decision_latency(client, keys, plain, args.submits)
        else:
            decision_latency(client, keys, pool.every(20, 0), 20, label)  # warm up
            pool_latency(client, keys, pool, args.submits, args.urgent, args.ends)
        client.config_resetstat()
        cpu = psutil.Process(processes[1].pid).cpu_times()
        sustained(
            client, keys, plain if pool is None else pool.every(args.sustained, args.urgent), args.sustained, label
        )
        used = sum(psutil.Process(processes[1].pid).cpu_times()[:2]) - sum(cpu[:2])
        redis_s = sum(stat["usec"] for stat in client.info("commandstats").values()) / 1e6
        print(
            f"{row(label + '  CPU per decision:')}scheduler {used / args.sustained * 1e6:.0f} us, "
            f"Redis {redis_s / args.sustained * 1e6:.0f} us"
        )
        if os.environ.get("BENCH_STATS"):
            for name, stat in sorted(client.info("commandstats").items(), key=lambda kv: -kv[1]["usec"])[:8]:
                print(
                    f"  redis {name}: {stat['calls']} calls, {stat['usec'] / 1e6:.2f} s, {stat['usec_per_call']:.1f} us/call"
                )
        if pool is not None:
            paths_run(client, keys, prefilled, pool.urgent_ids)
        else:
            rest_load(client, keys, job, args, env, processes, app_port)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        server.terminate()
        server.wait()


def rest_load(
    client: redis.Redis,
    keys: Keys,
    job: LanguageModelJob,
    args: argparse.Namespace,
    env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
    app_port: int,
) -> None:
    base = f"http://127.0.0.1:{app_port}/api/v1/training"
    body = job.model_dump(mode="json")
    scheduler = psutil.Process(processes[1].pid)
    gateways: list[psutil.Process] = []
    for count in map(int, args.gateways.split(",")):
        if count == 0:
            continue
        while len(gateways) < count:  # gateway processes sharing the port (APP_REUSE_PORT)
            started = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "gateway"], env={**env, "APP_REUSE_PORT": "true"}
            )
            processes.append(started)
            gateways.append(psutil.Process(started.pid))
            wait_for(lambda: _listening(gateways[-1], app_port), 60, "the gateway", interval_s=0.2)
        queued = client.xlen(keys.commands)
        print(f"{count} gateway process(es); {queued:,} submits so far, the queue holds them all")
        for connections in map(int, args.rest_connections.split(",")):
            before = [sum(p.cpu_times()[:2]) for p in (*gateways, scheduler)]
            submits = client.xlen(keys.commands)
            if shutil.which("wrk"):
                rest_wrk(base, body, args.rest_seconds, connections)
            else:
                anyio.run(rest, base, body, args.rest, connections)
            done = client.xlen(keys.commands) - submits
            used = [sum(p.cpu_times()[:2]) - b for p, b in zip((*gateways, scheduler), before, strict=True)]
            print(
                f"  CPU per submission:             gateways {sum(used[:-1]) / done * 1e6:.0f} us, "
                f"scheduler {used[-1] / done * 1e6:.0f} us"
            )


def _caught_up(client: redis.Redis, keys: Keys) -> bool:
    for stream in (keys.events, keys.commands):
        groups = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
        group = groups.get(SCHEDULER_GROUP)
        if group is None:
            return False
        if "lag" in group:  # Redis 7
            if group["lag"] != 0:
                return False
        else:  # Redis 6.2 reports no lag: delivered up to the stream's last entry
            last = client.xinfo_stream(stream)["last-generated-id"]
            if group["last-delivered-id"] != last:
                return False
    return True


def _listening(process: psutil.Process, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp"))


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/queue", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
