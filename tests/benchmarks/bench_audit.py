"""Audit benchmark: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_audit [--events 1000000]

Runs a throwaway redis-server (with AOF, as the embedded one) and prints, in one run:
- append throughput of plain XADD and of the hash-chained append, batched and one per call;
- the Redis memory a log of ``--events`` entries takes (a realistic mix: per job, submit
  decisions, start, progress rows, a checkpoint, the outcome), and per entry of a log of progress
  reports only (training rows as the runner reports them, with the ids it derives; then with every
  metric ms-swift logs; then with random ids, as an evaluation row's) and of a log of the other
  entries only;
- replay (read and decode), rebuild (read and fold) and verify (read and check the chain) in
  events per second, from Redis and from archive files.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis

from events import audit
from events import messages as m
from events.bus import Bus, Entry
from events.codec import decode, encode_fact, progress_id
from events.keys import Keys
from events.log import apply_entry, catch_up
from events.params import LanguageModelJob
from events.state import State
from services import embedded_redis
from tests.conftest import free_port, wait_for

JOB = LanguageModelJob(task_type="language_model", model_path="/models/tiny", data_path="/data/train.jsonl")
PER_JOB = 100


def job_log(job_id: str) -> list[m.Message]:
    """One job's life: 100 entries, most of them progress rows."""
    common = {"job_id": job_id, "source": "bench@host"}
    facts: list[m.Message] = [
        m.JobAccepted(spec=JOB, actor="alice", **common),
        m.JobQueued(position=1, actor="alice", **common),
        m.JobScheduled(node="n1", gpu_ids=[0], attempt=1, **common),
        m.JobStarted(
            attempt=1,
            node="n1",
            pid=10,
            pgid=10,
            run_dir="/r",
            argv=["swift", "sft"],
            cuda_visible_devices="0",
            **common,
        ),
    ]
    steps = PER_JOB - len(facts) - 2
    facts += [  # training rows, with the ids the runner gives them
        m.JobProgress(
            id=progress_id(job_id, 1, s),
            attempt=1,
            step=s,
            max_steps=steps,
            percent=100 * s / steps,
            loss=2.0 - s / 100,
            **common,
        )
        for s in range(1, steps + 1)
    ]
    facts += [
        m.CheckpointSaved(attempt=1, step=steps, path="/r/checkpoint", **common),
        m.JobSucceeded(attempt=1, exit_code=0, run_dir="/r", last_checkpoint="/r/checkpoint", **common),
    ]
    return facts


def progress(job_id: str) -> list[m.Message]:
    return [fact for fact in job_log(job_id) if fact.type == "job.progress"]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} /s"


async def timed(label: str, count: int, work: Callable[[], Coroutine[Any, Any, Any]]) -> float:
    start = time.perf_counter()
    await work()
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {rate(count, seconds)}   ({count:,} in {seconds:.2f} s)")
    return count / seconds


async def append_throughput(client: aioredis.Redis, entries: list[tuple[str, str, str, str]]) -> None:
    print("Append throughput (the same encoded entries; plain XADD vs the hash-chained append):")
    fields = [dict(zip(("type", "job_id", "data", "at"), entry, strict=True)) for entry in entries]
    for batch in (100, 1):
        count = len(fields) if batch > 1 else len(fields) // 10
        plain_stream = f"{{p{uuid.uuid4().hex[:6]}}}:events"
        bus = Bus(client, Keys(f"c{uuid.uuid4().hex[:6]}"), "bench")

        async def plain(stream: str = plain_stream, batch: int = batch, count: int = count) -> None:
            for start in range(0, count, batch):
                async with client.pipeline(transaction=False) as pipe:
                    for item in fields[start : start + batch]:
                        pipe.xadd(stream, item)
                    await pipe.execute()

        async def chained(bus: Bus = bus, batch: int = batch, count: int = count) -> None:
            for start in range(0, count, batch):
                args: list[Any] = []
                for entry in entries[start : start + batch]:
                    args += entry
                await bus._append_events(keys=[bus.keys.events, bus.keys.chain], args=args)

        base = await timed(f"plain XADD, {batch} per round trip", count, plain)
        with_chain = await timed(f"chained append, {batch} per round trip", count, chained)
        print(f"  {'cost of the chain':<44} {100 * (1 - with_chain / base):>9.1f} %")
        await client.delete(plain_stream, bus.keys.events, bus.keys.chain)


def full_progress(job_id: str) -> list[m.Message]:
    """Progress rows with every metric ms-swift logs, as it logs them (8 decimals; see
    tests/data/logging-with-eval.jsonl), and the percent as the runner rounds it."""
    return [
        m.JobProgress(
            id=progress_id(job_id, 1, s),
            job_id=job_id,
            source="bench@host",
            attempt=1,
            step=s,
            max_steps=500,
            percent=round(100 * s / 500, 2),
            loss=round(5.99777317 - s / 997, 8),
            grad_norm=round(0.96513981 + s / 1009, 8),
            learning_rate=round(0.00497861 - s / 100_003, 8),
            token_acc=round(0.00558659 + s / 1013, 8),
            epoch=round(s / 977, 8),
            elapsed_s=float(s // 3),
            remaining_s=float(500 - s),
            train_speed_s_per_it=0.227063,
        )
        for s in range(1, 95)
    ]


async def memory_per_entry(client: aioredis.Redis, jobs: int) -> None:
    """Bytes per entry of logs holding one kind of entry."""
    print(f"Redis memory per entry of a log of one kind ({jobs:,} jobs):")
    kinds: list[tuple[str, Callable[[str], list[m.Message]]]] = [
        ("progress reports (as above)", progress),
        ("progress reports, every metric ms-swift logs", full_progress),
        (
            "progress reports as above, random ids",
            lambda job: [p.model_copy(update={"id": m.new_id()}) for p in progress(job)],
        ),
        ("the other entries", lambda job: [f for f in job_log(job) if f.type != "job.progress"]),
    ]
    for label, facts in kinds:
        bus = Bus(client, Keys(f"k{uuid.uuid4().hex[:6]}"), "bench")
        before = (await client.info("memory"))["used_memory"]
        count = 0
        for _ in range(jobs):
            batch = facts(uuid.uuid4().hex)
            await bus.append_events(batch)
            count += len(batch)
        used = (await client.info("memory"))["used_memory"] - before
        print(f"  {label:<46} {used / count:>6,.0f} bytes   ({count:,} entries)")
        await client.delete(bus.keys.events, bus.keys.chain)


async def read_rates(bus: Bus, count: int, where: str) -> None:
    print(f"Reading the {count:,}-entry log from {where}:")

    async def replay() -> None:
        async for entry in audit.history(bus):
            decode(entry.fields)

    async def rebuild() -> None:
        state = State()
        await catch_up(bus, state)
        assert len(state.jobs) == count // PER_JOB, len(state.jobs)

    async def rebuild_entry_by_entry() -> None:
        state = State()
        async for entry in audit.history(bus):
            apply_entry(state, entry.entry_id, entry.fields)
        assert len(state.jobs) == count // PER_JOB, len(state.jobs)

    async def verify() -> None:
        result = await audit.verify(bus)
        assert result.intact and result.checked == count + 1, result.first_break

    await timed("replay (read and decode)", count, replay)
    await timed("rebuild (read and fold into the state)", count, rebuild)
    await timed("  (the same, decoding every entry)", count, rebuild_entry_by_entry)
    await timed("verify (read and check the hash chain)", count, verify)


async def main(events: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    port = free_port()
    server = embedded_redis.start(workdir / "redis", port, stdout=subprocess.DEVNULL)
    sync = redis.Redis(port=port)
    wait_for(lambda: sync.ping(), 10, "redis-server")
    client = aioredis.Redis(port=port, decode_responses=True)
    try:
        jobs = events // PER_JOB
        sample = [encode_fact(fact) for fact in job_log("j" * 32)] * 2000
        await append_throughput(client, sample[:200_000])

        keys = Keys("audit")
        bus = Bus(client, keys, "bench")
        before = (await client.info("memory"))["used_memory"]
        start = time.perf_counter()
        gpu = m.GpuInfo(index=0, uuid="GPU-0", name="bench", memory_total_mb=80_000)
        await bus.append_events([m.NodeJoined(node="n1", simulated=True, gpus=[gpu])])
        for _ in range(jobs):
            await bus.append_events(job_log(uuid.uuid4().hex))
        print(f"Built a log of {events:,} entries in {time.perf_counter() - start:.0f} s")
        used = (await client.info("memory"))["used_memory"] - before
        print(f"Redis memory for the log:  {used / 2**20:,.0f} MiB  ({used / events:,.0f} bytes per entry;")
        print(f"                           {used / 2**20 * 1_000_000 / events:,.0f} MiB per 1,000,000 entries)")
        await memory_per_entry(client, min(jobs, 1000))

        await read_rates(bus, events, "Redis")

        archive_dir = workdir / "archive"
        batch: list[Entry] = []
        async for entry in bus.entries(keys.events):
            batch.append(entry)
            if len(batch) == audit.ARCHIVE_FILE_MAX:
                audit.write_archive(archive_dir, batch)
                batch = []
        if batch:
            audit.write_archive(archive_dir, batch)
        size = sum(p.stat().st_size for p in audit.archive_files(archive_dir))
        print(f"Archive files: {size / 2**20:,.0f} MiB compressed ({size / events:,.0f} bytes per entry)")
        archived = Bus(client, Keys("empty"), "bench", archive_dir)
        await read_rates(archived, events, "archive files")
    finally:
        await client.aclose()
        sync.close()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    anyio.run(main, args.events)
