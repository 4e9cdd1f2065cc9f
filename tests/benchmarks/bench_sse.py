"""Live-stream benchmark: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_sse [--clients 1000] [--jobs 100] [--rate 500] [--seconds 30]

Starts its own redis-server and one gateway process with 10,000 jobs in its projection, 100 of
them running. A load generator (another process) opens ``--clients`` SSE connections, each
following one running job, plus 10 on the all-events stream, while ``--rate`` progress events
per second are appended in all. It prints the delivery latency (append -> client), events lost,
and the gateway's memory; then REST ``GET /jobs/{id}`` requests per second. The same load runs
against a bare Starlette SSE endpoint fed by one shared reader, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import anyio
import httpx
import redis
import redis.asyncio as aioredis

from events import messages as m
from events.bus import Bus
from events.keys import Keys
from events.params import LanguageModelJob
from services import embedded_redis
from tests.conftest import free_port, wait_for
from tests.examples import started

SPEC = LanguageModelJob(task_type="language_model", model_path="/models/tiny", data_path="/data/train.jsonl")
_AT = re.compile(rb'"at":"([^"]+)"')
ALL_EVENTS_CLIENTS = 10
reconnects: dict[str, int] = defaultdict(int)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def populate(bus: Bus, total: int, running: int) -> list[str]:
    """``total`` jobs, the first ``running`` of them started on one big node."""
    gpus = [m.GpuInfo(index=i, uuid=f"GPU-{i}", name="bench", memory_total_mb=80_000) for i in range(running)]
    await bus.append_events([m.NodeJoined(node="n1", simulated=True, gpus=gpus)])
    ids = [uuid.uuid4().hex for _ in range(total)]
    for start in range(0, total, 500):
        facts: list[m.Message] = []
        for offset, job_id in enumerate(ids[start : start + 500]):
            facts += [m.JobAccepted(job_id=job_id, spec=SPEC, actor="bench"), m.JobQueued(job_id=job_id, position=1)]
            index = start + offset
            if index < running:
                facts += [
                    m.JobScheduled(job_id=job_id, node="n1", gpu_ids=[index], attempt=1),
                    started(job_id, 1, "n1", str(index)),
                ]
        await bus.append_events(facts)
    return ids[:running]


# --- the bare baseline: one reader, a queue per client, nothing else -----------------------------


def bare_app(redis_url: str, keys: Keys):  # type: ignore[no-untyped-def]
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.routing import Route

    followers: dict[str, set[asyncio.Queue[tuple[str, str, str]]]] = defaultdict(set)

    async def reader() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        position = (await client.xinfo_stream(keys.events))["last-generated-id"]
        while True:
            for _, entries in await client.xread({keys.events: position}, count=500, block=5000) or []:
                for entry_id, fields in entries:
                    position = entry_id
                    item = (entry_id, fields["type"], fields["data"])
                    for queue in list(followers[fields.get("job_id", "")]) + list(followers["*"]):
                        if queue.qsize() < 1000:
                            queue.put_nowait(item)

    async def stream(request):  # type: ignore[no-untyped-def]
        key = request.path_params.get("job_id", "*")
        queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        followers[key].add(queue)

        async def events():  # type: ignore[no-untyped-def]
            try:
                yield ServerSentEvent(retry=2000, comment="open")
                while True:
                    entry_id, type_, data = await queue.get()
                    yield ServerSentEvent(data=data, event=type_, id=entry_id)
            finally:
                followers[key].discard(queue)

        return EventSourceResponse(events(), ping=15)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(reader())
        yield
        task.cancel()

    routes = [Route("/jobs/{job_id}/stream", stream), Route("/events/stream", stream)]
    return Starlette(routes=routes, lifespan=lifespan)


def serve_bare(port: int, redis_url: str, namespace: str) -> None:
    import uvicorn

    uvicorn.run(bare_app(redis_url, Keys(namespace)), host="127.0.0.1", port=port, log_level="warning")


# --- the load ------------------------------------------------------------------------------------


async def follow(
    host: str, port: int, path: str, opened: list[int], latencies: list[float], counts: dict[str, int], key: str
) -> None:
    """One SSE client on a raw connection, recording each event's delay since it was appended;
    when the server ends the stream (a client too slow), it reconnects with Last-Event-ID, as a
    browser's EventSource does."""
    last_id = ""
    first = True
    while True:
        reader, writer = await asyncio.open_connection(host, port)
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{resume}\r\n"
        writer.write(request.encode())
        await writer.drain()
        try:
            while line := await reader.readline():
                if line.startswith(b"retry:") and first:
                    opened.append(1)
                    first = False
                elif line.startswith(b"id:"):
                    last_id = line[3:].strip().decode()
                elif line.startswith(b"data:"):
                    found = _AT.search(line)
                    if found:
                        sent = datetime.fromisoformat(found[1].decode()).timestamp()
                        latencies.append(time.time() - sent)
                        counts[key] += 1
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            return
        finally:
            writer.close()
        reconnects[key] += 1


async def append_load(url: str, namespace: str, jobs: list[str], rate: int, seconds: float) -> dict[str, int]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    bus = Bus(client, Keys(namespace), "bench")
    sent: dict[str, int] = defaultdict(int)
    tick = 0.02
    per_tick = max(1, round(rate * tick))
    start = time.perf_counter()
    step = 0
    while time.perf_counter() - start < seconds:
        batch = []
        for _ in range(per_tick):
            job = jobs[step % len(jobs)]
            step += 1
            sent[job] += 1
            batch.append(m.JobProgress(job_id=job, attempt=1, step=step, max_steps=10**9, percent=0.0, loss=1.0))
        await bus.append_events(batch)
        await asyncio.sleep(max(0.0, start + step / rate - time.perf_counter()))
    await client.aclose()
    return sent


async def load(args: argparse.Namespace, port: int, prefix: str, jobs: list[str]) -> None:
    opened: list[int] = []
    latencies: list[float] = []
    counts: dict[str, int] = defaultdict(int)
    tasks = []
    for i in range(args.clients):
        job = jobs[i % len(jobs)]
        path = f"{prefix}/jobs/{job}/stream?since={time.time_ns() // 1_000_000}-0"
        tasks.append(asyncio.create_task(follow("127.0.0.1", port, path, opened, latencies, counts, job)))
    for i in range(ALL_EVENTS_CLIENTS):
        path = f"{prefix}/events/stream"
        tasks.append(asyncio.create_task(follow("127.0.0.1", port, path, opened, latencies, counts, f"*{i}")))
    deadline = time.monotonic() + 60
    while len(opened) < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    print(f"  {len(opened)} of {len(tasks)} streams open")
    sent = await append_load(args.redis_url, args.namespace, jobs, args.rate, args.seconds)
    await asyncio.sleep(2)  # the tail of the deliveries
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    total_sent = sum(sent.values())
    expected = sum(sent[jobs[i % len(jobs)]] for i in range(args.clients)) + ALL_EVENTS_CLIENTS * total_sent
    received = sum(counts.values())
    ms = [x * 1000 for x in latencies]
    print(
        f"  appended {total_sent} events in {args.seconds:.0f} s; delivered {received} of {expected}"
        f" ({expected - received} lost); latency p50 {percentile(ms, 0.5):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms;"
        f" {sum(reconnects.values())} reconnects after being cut off"
    )


def run_load(args: argparse.Namespace, port: int, prefix: str, jobs: list[str]) -> None:
    """In a process of its own, so that the load generator does not share the gateway's."""
    code = (
        "import asyncio, sys, json, argparse; from tests.benchmarks.bench_sse import load; "
        "a = argparse.Namespace(**json.loads(sys.argv[1])); "
        "asyncio.run(load(a, int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])))"
    )
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(vars(args)), str(port), prefix, json.dumps(jobs)], check=True
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def rest_rate(base: str, ids: list[str], seconds: float = 10, concurrency: int = 32) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < stop:
                response = await client.get(f"/jobs/{ids[i % len(ids)]}")
                assert response.status_code == 200
                done += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--total-jobs", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    redis_port = free_port()
    server = embedded_redis.start(workdir / "redis", redis_port, stdout=subprocess.DEVNULL)
    processes: list[subprocess.Popen[bytes]] = [server]
    try:
        wait_for(lambda: redis.Redis(port=redis_port).ping(), 10, "redis-server")
        args.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        args.namespace = f"sse{uuid.uuid4().hex[:6]}"

        async def setup() -> list[str]:
            client = aioredis.Redis.from_url(args.redis_url, decode_responses=True)
            ids = await populate(Bus(client, Keys(args.namespace), "bench"), args.total_jobs, args.jobs)
            await client.aclose()
            return ids

        jobs = anyio.run(setup)
        port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": args.redis_url,
            "NAMESPACE": args.namespace,
            "APP_PORT": str(port),
            "DATA_DIR": str(workdir / "data"),
            "LOG_LEVEL": "WARNING",
        }
        gateway = subprocess.Popen([sys.executable, "-m", "services.cli", "gateway"], env=env)
        processes.append(gateway)
        base = f"http://127.0.0.1:{port}/api/v1/training"
        wait_for(lambda: _answers(f"{base}/jobs/{jobs[0]}"), 60, "the gateway")
        print(
            f"Gateway ({args.total_jobs:,} jobs, {args.jobs} running): {args.clients} job streams + "
            f"{ALL_EVENTS_CLIENTS} all-events streams, {args.rate} events/s for {args.seconds:.0f} s"
        )
        run_load(args, port, "/api/v1/training", jobs)
        print(f"  gateway memory (RSS) after the load: {rss_mib(gateway.pid):.0f} MiB")
        all_ids = [job["job_id"] for job in httpx.get(f"{base}/jobs", params={"size": 500}).json()["jobs"]]
        print(f"  REST GET /jobs/{{id}}: {anyio.run(rest_rate, base, all_ids):,.0f} requests/s (32 concurrent)")

        bare_port = free_port()
        bare = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from tests.benchmarks.bench_sse import serve_bare; "
                "serve_bare(int(sys.argv[1]), sys.argv[2], sys.argv[3])",
                str(bare_port),
                args.redis_url,
                args.namespace,
            ]
        )
        processes.append(bare)
        wait_for(lambda: _open(bare_port), 30, "the bare server")
        print("Bare Starlette SSE endpoint, one shared reader, the same load:")
        run_load(args, bare_port, "", jobs)
        print(f"  memory (RSS) after the load: {rss_mib(bare.pid):.0f} MiB")
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    main()
