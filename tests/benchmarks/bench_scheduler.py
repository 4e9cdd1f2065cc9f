"""Scheduler benchmark: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_scheduler [--queued 10000] [--submits 500]

Runs a throwaway redis-server and the real scheduler process, with one simulated GPU held by a
running job and ``--queued`` jobs already waiting. Prints, in one run: the raw Redis round trip and
a raw batched XREADGROUP/XACK loop (the floor), then submit -> decision latency and sustained
decisions per second (the scheduler alone: commands appended straight to its stream), then starts
the real gateway and measures accepted submissions per second over REST, with one gateway process
and then with two sharing the port (``--gateways``). The REST load comes from
``wrk`` when it is installed (``apt-get install wrk``: a C load generator that leaves the two cores
to the system under test), else from an httpx client in this process, which costs more CPU than
the gateway it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import httpx
import psutil
import redis

from events import messages as m
from events.codec import encode
from events.keys import SCHEDULER_GROUP, Keys
from events.params import LanguageModelJob
from services import embedded_redis
from tests.conftest import free_port, wait_for


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
    pipe = client.pipeline(transaction=False)
    for i, fact in enumerate(facts):
        pipe.xadd(keys.events, encode(fact))
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def decision_latency(client: redis.Redis, keys: Keys, job: LanguageModelJob, submits: int) -> None:
    last = client.xrevrange(keys.events, count=1)[0][0]
    latencies = []
    for _ in range(submits):
        job_id = uuid.uuid4().hex
        start = time.perf_counter()
        client.xadd(keys.commands, encode(m.SubmitJob(job_id=job_id, spec=job)))
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
        f"submit -> decision latency:       p50 {percentile(latencies, 0.5):.2f} ms  p99 {percentile(latencies, 0.99):.2f} ms  ({submits} submits)"
    )


def sustained(client: redis.Redis, keys: Keys, job: LanguageModelJob, count: int) -> None:
    ids = [uuid.uuid4().hex for _ in range(count)]
    commands = [encode(m.SubmitJob(job_id=job_id, spec=job)) for job_id in ids]  # before the clock starts
    last = client.xrevrange(keys.events, count=1)[0][0]  # before submitting: no decision is missed
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i, fields in enumerate(commands):
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
    print(f"sustained decisions:              {rate:,.0f} submits decided/s ({count} submits)")


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
    parser.add_argument("--gateways", default="1,2", help="gateway processes for the REST load, comma-separated runs")
    parser.add_argument(
        "--rest-connections", default="64", help="concurrent connections of the REST load, comma-separated runs"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model").mkdir()
        (root / "data.jsonl").write_text("{}\n")
        job = LanguageModelJob(
            task_type="language_model", model_path=str(root / "model"), data_path=str(root / "data.jsonl")
        )
        port = free_port()
        server = embedded_redis.start(root / "redis", port, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        wait_for(lambda: _ping(client), 10, "redis")
        keys = Keys("bench")
        print(f"machine: {os.cpu_count()} CPUs; {args.queued:,} jobs queued behind a running one")
        raw_redis(client, keys)
        prefill(client, keys, args.queued, job)
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
        }
        # The node's gpu-monitor reports its GPU (held by the running job), as on a real node.
        processes = [
            subprocess.Popen([sys.executable, "-m", "services.cli", name], env=env)
            for name in ("gpu-monitor", "scheduler")
        ]
        try:
            wait_for(lambda: client.get(keys.leader), 60, "a scheduler leader", interval_s=0.2)
            # The scheduler first reads the prefilled log through its group: measure once it is done.
            wait_for(lambda: _caught_up(client, keys), 120, "the scheduler to read the log", interval_s=0.2)
            decision_latency(client, keys, job, 20)  # warm up
            decision_latency(client, keys, job, args.submits)
            client.config_resetstat()
            cpu = psutil.Process(processes[1].pid).cpu_times()
            sustained(client, keys, job, args.sustained)
            used = sum(psutil.Process(processes[1].pid).cpu_times()[:2]) - sum(cpu[:2])
            redis_s = sum(stat["usec"] for stat in client.info("commandstats").values()) / 1e6
            print(
                f"  CPU per decision:               scheduler {used / args.sustained * 1e6:.0f} us, "
                f"Redis {redis_s / args.sustained * 1e6:.0f} us"
            )
            if os.environ.get("BENCH_STATS"):
                for name, stat in sorted(client.info("commandstats").items(), key=lambda kv: -kv[1]["usec"])[:8]:
                    print(
                        f"  redis {name}: {stat['calls']} calls, {stat['usec'] / 1e6:.2f} s, {stat['usec_per_call']:.1f} us/call"
                    )
            base = f"http://127.0.0.1:{app_port}/api/v1/training"
            body = job.model_dump(mode="json")
            scheduler = psutil.Process(processes[1].pid)
            gateways: list[psutil.Process] = []
            for count in map(int, args.gateways.split(",")):
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
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
            server.terminate()
            server.wait()


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
