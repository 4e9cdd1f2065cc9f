"""The log's hash chain, its verification, archives and retention, against a real Redis."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import anyio
import redis
import redis.asyncio as aioredis

from events import audit, snapshot
from events import messages as m
from events.bus import Append, Bus, entry_id_key
from events.codec import decode
from events.keys import Keys
from events.log import catch_up
from events.state import State
from tests.conftest import RedisServer, wait_for
from tests.system import System

DATA = Path(__file__).parent / "data"


def progress(job_id: str, step: int) -> m.JobProgress:
    return m.JobProgress(job_id=job_id, attempt=1, step=step, max_steps=100, percent=float(step))


async def fill(bus: Bus, count: int, job_id: str = "job-1") -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 100):
        ids += await bus.append(bus.keys.events, *(progress(job_id, i) for i in range(start, min(count, start + 100))))
    return ids


async def copy_with(redis: aioredis.Redis, stream: str, change: dict[str, dict[str, str]]) -> None:
    """Rewrite the stream with some entries' fields changed (what someone editing the log does)."""
    entries = await redis.xrange(stream)
    await redis.delete(stream)
    for entry_id, fields in entries:
        await redis.xadd(stream, {**fields, **change.get(entry_id, {})}, id=entry_id)


async def test_every_append_is_chained_and_verifies_intact(bus: Bus) -> None:
    # Given facts appended one by one, in batches, and by a commit beside other streams
    first = await bus.append(bus.keys.events, progress("a", 1))
    batch = await bus.append(bus.keys.events, progress("a", 2), progress("a", 3))
    result = await bus.commit(
        [Append(bus.keys.events, progress("a", 4)), Append(bus.keys.node("n1"), m.StopJob(attempt=1, reason="cancel"))]
    )
    # Then each entry carries its hash: the 20 bytes of SHA-1 over its predecessor's hash, its id
    # and its fields (base64)
    entries = await bus.redis.xrange(bus.keys.events)
    assert [e[0] for e in entries] == [*first, *batch, result.entry_ids[0]]
    before = ""
    for entry_id, fields in entries:
        assert list(fields) == ["type", "job_id", "data", "at", "hash"]
        text = "\n".join(
            [before, entry_id, *(f"{len(k)}:{k}={len(v.encode())}:{v}" for k, v in fields.items() if k != "hash")]
        )
        assert base64.urlsafe_b64decode(fields["hash"] + "=") == hashlib.sha1(text.encode()).digest()
        assert fields["hash"] == audit.entry_hash(before, entry_id, fields)
        before = fields["hash"]
    assert "hash" not in (await bus.redis.xrange(bus.keys.node("n1")))[0][1]
    # And verification walks all four
    report = await audit.verify(bus)
    assert report.intact and report.checked == 4 and report.head_id == entries[-1][0]


async def test_an_edited_field_is_named_by_its_entry(bus: Bus) -> None:
    # Given a chained log
    ids = await fill(bus, 50)
    # When one field of one entry is edited
    entries = dict(await bus.redis.xrange(bus.keys.events))
    data = json.loads(entries[ids[20]]["data"])
    data[0][1] = 999  # the step, in the progress report's positional payload
    await copy_with(bus.redis, bus.keys.events, {ids[20]: {"data": json.dumps(data)}})
    # Then verify names that entry, and says it was altered
    report = await audit.verify(bus)
    assert report.first_break is not None and report.first_break.entry_id == ids[20]
    assert "altered" in report.first_break.reason and report.checked == 20


async def test_a_removed_entry_breaks_the_chain_at_the_next_one(bus: Bus) -> None:
    ids = await fill(bus, 30)
    await bus.redis.xdel(bus.keys.events, ids[10])
    report = await audit.verify(bus)
    assert report.first_break is not None and report.first_break.entry_id == ids[11]
    assert "removed" in report.first_break.reason


async def test_a_removed_last_entry_is_found_from_the_chain_head(bus: Bus) -> None:
    ids = await fill(bus, 5)
    await bus.redis.xdel(bus.keys.events, ids[-1])
    report = await audit.verify(bus)
    assert report.first_break is not None and report.first_break.entry_id == ids[-1]


async def test_an_entry_appended_around_the_chain_is_found(bus: Bus) -> None:
    await fill(bus, 3)
    forged = await bus.redis.xadd(bus.keys.events, {"type": "job.progress", "job_id": "a", "data": "{}"})
    await fill(bus, 2)  # and the chain goes on after it
    report = await audit.verify(bus)
    assert report.first_break is not None and report.first_break.entry_id == forged
    assert "no hash" in report.first_break.reason


APPENDER = """
import asyncio, sys
from events import messages as m
from events.bus import Bus, connect
from events.keys import Keys

async def main(url, namespace, name, count):
    redis = connect(url)
    bus = Bus(redis, Keys(namespace), name)
    for i in range(count):
        fact = m.JobProgress(job_id=name, attempt=1, step=i, max_steps=count, percent=0.0)
        if i % 3:
            await bus.append(bus.keys.events, fact)
        else:
            await bus.append(bus.keys.events, fact, fact.model_copy(update={"id": m.new_id()}))
    await redis.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def test_concurrent_appenders_form_one_unbroken_chain(bus: Bus, keys: Keys, redis_server: RedisServer) -> None:
    # Given four processes appending at once
    writers = [
        subprocess.Popen([sys.executable, "-c", APPENDER, redis_server.url, keys.namespace, f"w{n}", "150"])
        for n in range(4)
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    # Then every entry landed, on a single chain
    report = await audit.verify(bus)
    assert report.intact, report.first_break
    assert report.checked == await bus.redis.xlen(keys.events) == 4 * 200


async def snapshot_now(bus: Bus) -> State:
    state = State()
    await catch_up(bus, state)
    await snapshot.save(bus, state)
    return state


async def test_archive_then_trim_keeps_history_continuous(bus: Bus, tmp_path: Path) -> None:
    # Given a log of 3,500 entries, read up to its end by a snapshot
    bus.archive_dir = tmp_path / "archive"
    ids = await fill(bus, 3500)
    await snapshot_now(bus)
    # When the policy keeps the newest 1,000
    done = await audit.archive_and_trim(bus, max_age_s=None, max_entries=1000, now_ms=0)
    # Then the oldest 2,500 are in an archive file and gone from Redis
    assert done.entries == 2500 and len(done.files) == 1
    assert await bus.redis.xlen(bus.keys.events) == 1000
    assert (await bus.redis.xrange(bus.keys.events, count=1))[0][0] == ids[2500]
    # And history, replay and verify read one continuous log across the boundary
    assert [e.entry_id async for e in audit.history(bus)] == ids
    assert [e.entry_id async for e in audit.history(bus, after=ids[2400], until=ids[2600])] == ids[2401:2601]
    report = await audit.verify(bus)
    assert report.intact and report.checked == 3500
    state = State()
    await catch_up(bus, state)
    assert state.position == ids[-1]
    # And running it again archives nothing more
    again = await audit.archive_and_trim(bus, max_age_s=None, max_entries=1000, now_ms=0)
    assert again.entries == 0 and await bus.redis.xlen(bus.keys.events) == 1000


async def test_an_edit_inside_an_archive_is_named_with_its_file(bus: Bus, tmp_path: Path) -> None:
    bus.archive_dir = tmp_path / "archive"
    ids = await fill(bus, 2000)
    await snapshot_now(bus)
    done = await audit.archive_and_trim(bus, max_age_s=None, max_entries=1000, now_ms=0)
    [path] = done.files
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    record = json.loads(lines[7])
    record["fields"]["job_id"] = "someone-else"
    lines[7] = json.dumps(record)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    report = await audit.verify(bus)
    assert report.first_break is not None
    assert report.first_break.entry_id == ids[7] and report.first_break.where == str(path)


async def test_retention_holds_back_what_readers_still_need(bus: Bus, tmp_path: Path) -> None:
    # Given a snapshot that covers only the first 1,500 of 3,000 entries
    bus.archive_dir = tmp_path / "archive"
    ids = await fill(bus, 1500)
    await snapshot_now(bus)
    ids += await fill(bus, 1500)
    # When the policy would keep only 1,000
    done = await audit.archive_and_trim(bus, max_age_s=None, max_entries=1000, now_ms=0)
    # Then entries after the snapshot stay
    assert done.entries == 1500 and "snapshot" in done.held_back
    assert (await bus.redis.xrange(bus.keys.events, count=1))[0][0] == ids[1500]


async def test_age_limit_archives_entries_older_than_it(bus: Bus, tmp_path: Path) -> None:
    bus.archive_dir = tmp_path / "archive"
    ids = await fill(bus, 300)
    await snapshot_now(bus)
    cut_ms, _ = entry_id_key(ids[150])
    done = await audit.archive_and_trim(bus, max_age_s=10, max_entries=None, now_ms=cut_ms + 10_000)
    remaining = [e[0] for e in await bus.redis.xrange(bus.keys.events)]
    assert done.entries == 300 - len(remaining)
    assert all(entry_id_key(i)[0] >= cut_ms for i in remaining)
    assert all(entry_id_key(i)[0] < cut_ms for i in ids[: done.entries])
    assert (await audit.verify(bus)).intact


async def load_recorded(bus: Bus, name: str) -> list[str]:
    """A log recorded from an earlier release, put back into a Redis as it was."""
    ids = []
    for line in (DATA / name).read_text().splitlines():
        record = json.loads(line)
        await bus.redis.xadd(bus.keys.events, record["fields"], id=record["id"])
        ids.append(record["id"])
    return ids


async def test_a_log_from_before_the_chain_verifies_and_the_chain_begins_after_it(bus: Bus) -> None:
    # Given the log of the first release, which had no hash chain, and newer entries after it
    old = await load_recorded(bus, "log-release-1.jsonl")
    new = await fill(bus, 5)
    # Then verify counts the old entries apart and checks the chain from the first new one
    report = await audit.verify(bus)
    assert report.intact and report.unchained == len(old) and report.checked == len(new)
    assert entry_id_key(new[0]) > entry_id_key(old[-1])


async def test_a_log_of_the_first_release_replays_under_this_one(bus: Bus) -> None:
    # Given the log of a run under the first release: a job trained and exported, one failed and
    # was deleted, one was cancelled while queued (job.queued was v1 then)
    await load_recorded(bus, "log-release-1.jsonl")
    # When this release folds it
    state = State()
    assert await catch_up(bus, state) == 22
    # Then every entry applies, older versions upcast, and the jobs end as they did
    assert state.stale_reports == 0
    statuses = {job_id[:6]: (job.status, job.export.status) for job_id, job in state.jobs.items()}
    assert statuses == {"3ba102": ("completed", "completed"), "7fb956": ("cancelled", "none")}
    assert [d[:6] for d in state.deleted] == ["5283e9"]
    queued = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.events)]
    queued = [q for q in queued if isinstance(q, m.JobQueued)]
    assert len(queued) == 3 and all(q.v == 2 and q.behind_job_id is None for q in queued)


def test_the_leading_scheduler_snapshots_then_archives_and_trims(redis_server: RedisServer, tmp_path: Path) -> None:
    # Given a scheduler applying a retention policy of 1,000 entries every second, and 1,500 facts
    system = System(redis_server.url, tmp_path / "data", RETENTION_INTERVAL_S="1", AUDIT_MAX_ENTRIES="1000")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = Keys(system.namespace)

    async def append() -> None:
        async with aioredis.Redis.from_url(redis_server.url, decode_responses=True) as r:
            bus = Bus(r, keys, "test")
            await fill(bus, 1500)

    anyio.run(append)
    system.start("scheduler")
    try:
        # Then a snapshot of the whole log is stored (written by a child process), the log is
        # trimmed to the newest 1,000 entries, and the rest is archived
        last = client.xrevrange(keys.events, count=1)[0][0]
        wait_for(lambda: client.hget(keys.snapshot, "position") == last, 30, "the snapshot", interval_s=0.2)
        wait_for(lambda: client.xlen(keys.events) == 1000, 30, "the trim", interval_s=0.2)
        archives = sorted((tmp_path / "data" / "archive").rglob("*.gz"))
        assert sum(len(gzip.decompress(path.read_bytes()).splitlines()) for path in archives) == 500
        state = snapshot.unpacked(client.hget(keys.snapshot, "state"))
        assert state.position == last
    finally:
        system.stop()
        client.close()
