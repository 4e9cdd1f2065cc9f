"""The consumer-group loop and the atomic commit, against a real redis-server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from events import audit, snapshot
from events import messages as m
from events.bus import MOST_PASSED, Ack, Append, Bus, Fenced
from events.codec import decode, encode
from events.consumer import Delivery, GroupConsumer
from events.keys import Keys
from events.log import catch_up
from events.records import JobStatus
from events.state import State
from services.scheduler.lease import take_lease
from tests.conftest import RedisServer
from tests.examples import LM, started


async def snapshot_of_queued_jobs(bus: Bus, jobs: int) -> State:
    """Append ``jobs`` accepted and queued jobs to the log, and store a snapshot of it."""
    for i in range(jobs):
        await bus.append(
            bus.keys.events, m.JobAccepted(job_id=f"j{i}", spec=LM), m.JobQueued(job_id=f"j{i}", position=i + 1)
        )
    folded = State()
    await catch_up(bus, folded)
    assert await snapshot.save(bus, folded)
    return folded


def make_consumer(bus: Bus, stream: str, name: str, handled: list[Delivery], **kw: object) -> GroupConsumer:
    async def handler(delivery: Delivery) -> Sequence[Append]:
        handled.append(delivery)
        return [
            Append(bus.keys.events, m.JobCancelled(job_id=delivery.message.job_id, causation_id=delivery.message.id))
        ]

    return GroupConsumer(bus, bus.redis, [stream], "workers", name, handler, block_ms=100, **kw)  # type: ignore[arg-type]


async def test_a_garbage_entry_is_dead_lettered_and_the_consumer_carries_on(bus: Bus) -> None:
    stream = bus.keys.commands
    # Given a garbage entry between two good ones
    await bus.append(stream, m.CancelJob(job_id="a"))
    garbage_id = await bus.redis.xadd(stream, {"data": "{definitely not json"})
    await bus.append(stream, m.CancelJob(job_id="b"))
    handled: list[Delivery] = []
    consumer = make_consumer(bus, stream, "c1", handled)
    await consumer.setup()
    # When the consumer reads them
    await consumer.poll(100)
    # Then both good ones were handled, the garbage one is in the dead-letter stream with the
    # reason, and nothing is left pending
    assert [d.message.job_id for d in handled] == ["a", "b"]
    [(_, dead)] = await bus.redis.xrange(bus.keys.dead_letter)
    assert dead["entry_id"] == garbage_id and dead["stream"] == stream
    assert "not JSON" in dead["reason"]
    assert json.loads(dead["fields"]) == {"data": "{definitely not json"}
    assert (await bus.redis.xpending(stream, "workers"))["pending"] == 0
    assert [f["job_id"] for _, f in await bus.redis.xrange(bus.keys.events)] == ["a", "b"]


async def test_a_stream_with_its_own_count_is_read_in_helpings_of_that_size_beside_the_others(bus: Bus) -> None:
    commands, telemetry = bus.keys.commands, bus.keys.telemetry
    seen: list[list[Delivery]] = []

    async def batch(deliveries: list[Delivery], acks: object) -> int:
        seen.append(deliveries)
        return 0

    consumer = GroupConsumer(
        bus, bus.redis, [commands, telemetry], "workers", "c", None, batch=batch, count=50, counts={telemetry: 4}
    )
    await consumer.setup()
    # Given ten entries piled up on telemetry (any message will do), then three commands
    for i in range(10):
        await bus.append(telemetry, m.CancelJob(job_id=f"n{i}"))
    for job in "abc":
        await bus.append(commands, m.CancelJob(job_id=job))
    # When the consumer reads
    await consumer.poll(100)
    # Then one read holds every command and only four heartbeats, the commands first
    [first] = seen
    assert [d.stream for d in first] == [commands] * 3 + [telemetry] * 4
    # And the rest of the heartbeats come four at a time, in order
    while await consumer.poll(None):
        pass
    beats = [d.message.job_id for read in seen for d in read if d.stream == telemetry]
    assert beats == [f"n{i}" for i in range(10)] and [len(read) for read in seen[1:]] == [4, 2]
    # And with every stream empty, a read blocks until an entry arrives on either
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.poll, 5000)
        await bus.append(commands, m.CancelJob(job_id="late"))
    assert [d.message.job_id for d in seen[-1]] == ["late"]


async def test_an_entry_left_pending_by_a_killed_consumer_is_reclaimed_and_processed_once(
    bus: Bus, redis_server: RedisServer
) -> None:
    stream = bus.keys.commands
    await bus.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await bus.append(stream, m.CancelJob(job_id="victim"))
    # Given a consumer in another process that read the entry and was SIGKILLed before acking
    script = (
        "import redis,sys,time\n"
        f"r = redis.Redis.from_url({redis_server.url!r})\n"
        f"r.xreadgroup('workers', 'doomed', {{{stream!r}: '>'}}, count=1)\n"
        "print('read', flush=True)\n"
        "time.sleep(120)\n"
    )
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert doomed.stdout is not None and doomed.stdout.readline().strip() == "read"
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    [pending] = await bus.redis.xpending_range(stream, "workers", min="-", max="+", count=10)
    assert pending["consumer"] == "doomed"
    # When a live consumer runs with a short idle threshold
    handled: list[Delivery] = []
    consumer = make_consumer(bus, stream, "survivor", handled, claim_idle_ms=100)
    with anyio.fail_after(10):
        while not handled:
            await consumer.poll(100)
    # Then it processed the entry exactly once, and nothing is pending any more
    for _ in range(3):
        await consumer.reclaim(force=True)
        await consumer.poll(50)
    assert [d.message.job_id for d in handled] == ["victim"]
    assert handled[0].deliveries == 2
    assert await bus.redis.xlen(bus.keys.events) == 1
    assert (await bus.redis.xpending(stream, "workers"))["pending"] == 0


async def test_a_consumer_first_rereads_its_own_pending_entries_after_a_restart(bus: Bus) -> None:
    stream = bus.keys.commands
    await bus.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await bus.append(stream, m.CancelJob(job_id="x"))
    await bus.redis.xreadgroup("workers", "same-name", {stream: ">"})  # delivered, never acked
    handled: list[Delivery] = []
    consumer = make_consumer(bus, stream, "same-name", handled)
    assert await consumer.drain_own_pending() == 1
    assert [d.message.job_id for d in handled] == ["x"]
    assert (await bus.redis.xpending(stream, "workers"))["pending"] == 0


async def test_an_entry_delivered_too_often_goes_to_the_dead_letter_stream(bus: Bus) -> None:
    stream = bus.keys.commands
    await bus.append(stream, m.CancelJob(job_id="poison"))
    attempts = 0

    async def failing(delivery: Delivery) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("handler bug")

    consumer = GroupConsumer(
        bus, bus.redis, [stream], "workers", "c", failing, block_ms=50, claim_idle_ms=1, max_deliveries=3
    )
    await consumer.setup()
    with anyio.fail_after(10):
        while not await bus.redis.xlen(bus.keys.dead_letter):
            await consumer.reclaim(force=True)
            await consumer.poll(10)
    assert attempts == 3
    [(_, dead)] = await bus.redis.xrange(bus.keys.dead_letter)
    assert "delivered 4 times" in dead["reason"]
    assert (await bus.redis.xpending(stream, "workers"))["pending"] == 0


async def test_commit_appends_and_acks_together_and_a_redelivery_has_no_second_effect(bus: Bus) -> None:
    stream = bus.keys.commands
    await bus.redis.xgroup_create(stream, "g", id="0", mkstream=True)
    [entry_id] = await bus.append(stream, m.CancelJob(job_id="j", id="cmd-1"))
    await bus.redis.xreadgroup("g", "c", {stream: ">"})
    fact = Append(bus.keys.events, m.JobCancelled(job_id="j", causation_id="cmd-1"))
    first = await bus.commit([fact], ack=Ack(stream, "g", entry_id), dedupe_id="cmd-1")
    second = await bus.commit([fact], ack=Ack(stream, "g", entry_id), dedupe_id="cmd-1")
    assert first.status == "OK" and len(first.entry_ids) == 1
    assert second.status == "DUPLICATE"
    assert await bus.redis.xlen(bus.keys.events) == 1
    assert (await bus.redis.xpending(stream, "g"))["pending"] == 0


async def test_one_commit_carries_text_of_any_script_to_several_streams_and_acks_them_all(bus: Bus) -> None:
    # Given entries read through two groups of two streams
    pending = {}
    for stream, group in ((bus.keys.commands, "g"), (bus.keys.telemetry, "h")):
        await bus.redis.xgroup_create(stream, group, id="0", mkstream=True)
        for i in range(3):
            await bus.append(stream, m.ProcessQueue(actor=f"a{i}"))
        reply = await bus.redis.xreadgroup(group, "c", {stream: ">"})
        pending[(stream, group)] = [entry_id for entry_id, _ in reply[0][1]]
    acks = [Ack(stream, group, entry_id) for (stream, group), ids in pending.items() for entry_id in ids]
    # When one commit appends multi-byte text to the log and to two other streams, one of them capped
    reason = "arrêt demandé ✓ 停止 🚀"
    appends = [
        Append(bus.keys.events, m.JobCancelled(job_id="jöb-1", actor=reason)),
        Append(bus.keys.node("nœud"), m.StopJob(job_id="jöb-1", attempt=1, reason="cancel")),
        Append(bus.keys.exports, m.ProcessQueue(actor=reason), maxlen=5),
        Append(bus.keys.events, m.JobCancelled(job_id="jöb-2", actor="")),
    ]
    result = await bus.commit(appends, acks=acks, dedupe_ids=["x:1", "x:2"])
    # Then every entry reads back exactly, the log's chain verifies, and every read entry is acknowledged
    assert result.status == "OK" and len(result.entry_ids) == 4
    for item, entry_id in zip(appends, result.entry_ids, strict=True):
        [(_, fields)] = await bus.redis.xrange(item.stream, min=entry_id, max=entry_id)
        assert decode(fields) == item.message.model_copy(update={"source": bus.source})
        assert fields["job_id"] == (item.message.job_id or "")
    assert (await audit.verify(bus)).intact
    for stream, group in pending:
        assert (await bus.redis.xpending(stream, group))["pending"] == 0


async def test_a_stale_leader_cannot_commit(bus: Bus) -> None:
    await bus.redis.set(bus.keys.fence, "7")
    fact = Append(bus.keys.events, m.ProcessQueue())
    assert (await bus.commit([fact], fence_token="7")).status == "OK"
    await bus.redis.incr(bus.keys.fence)  # a new leader took over
    with pytest.raises(Fenced):
        await bus.commit([fact], fence_token="7")
    assert await bus.redis.xlen(bus.keys.events) == 1


async def test_the_lease_and_its_fencing_token_are_taken_together(bus: Bus) -> None:
    # Given scheduler "a" holding the lease
    first = (await take_lease(bus.redis, bus.keys, "a", 60_000)).token
    assert first is not None
    # Then "b" gets neither the lease nor a token (but how long the lease has left), and "a"
    # finding its own lease gets a newer token
    refused = await take_lease(bus.redis, bus.keys, "b", 60_000)
    assert refused.token is None and 59_000 < refused.left_ms <= 60_000
    assert await bus.redis.get(bus.keys.fence) == str(first)
    assert (await take_lease(bus.redis, bus.keys, "a", 60_000)).token == first + 1
    # And once the lease lapses, "b" takes it with the next token: "a"'s commits are fenced off
    await bus.redis.pexpire(bus.keys.leader, 1)
    with anyio.fail_after(5):
        while (token := (await take_lease(bus.redis, bus.keys, "b", 60_000)).token) is None:
            await anyio.sleep(0.01)
    assert token == first + 2 and await bus.redis.get(bus.keys.leader) == "b"
    with pytest.raises(Fenced):
        await bus.commit([Append(bus.keys.events, m.ProcessQueue())], fence_token=str(first + 1))


async def test_a_standby_keeps_its_state_folded_so_taking_over_folds_only_what_is_new(bus: Bus) -> None:
    from services.config import Settings
    from services.scheduler.service import Scheduler

    # Given a log with a snapshot of its first part, and a standby scheduler that looked at it
    await snapshot_of_queued_jobs(bus, 20)
    await bus.append(bus.keys.events, m.JobCancelled(job_id="j3"))
    settings = Settings(namespace=bus.keys.namespace, _env_file=None)  # type: ignore[call-arg]
    standby = Scheduler(settings, bus)
    assert await standby.stand_by() == 1  # the snapshot, then the one entry after it
    # When the leader appends more, the standby folds just that at its next look
    await bus.append(bus.keys.events, m.JobPriorityChanged(job_id="j7", priority=9, previous=5))
    assert await standby.stand_by() == 1
    assert await standby.stand_by() == 0
    # Then its state is the fold of the whole log
    whole = State()
    await catch_up(bus, whole)
    assert standby.state.model_dump() == whole.model_dump() and standby.warm


async def test_a_new_leader_recalls_how_long_each_runner_was_silent_and_how_far_redis_clock_is(
    bus: Bus,
) -> None:
    from datetime import UTC, datetime, timedelta

    from services.config import Settings
    from services.scheduler.service import Scheduler

    now = datetime.now(UTC)

    def runner(node: str) -> m.ServiceHeartbeat:
        return m.ServiceHeartbeat(service="runner", instance=node, node=node, started_at=now, interval_s=2)

    def monitor(node: str) -> m.NodeHeartbeat:
        return m.NodeHeartbeat(node=node, simulated=True, gpus=[])

    # Given heartbeats in the telemetry stream, seconds ago: n1's runner silent for a minute while
    # its monitor went on every 5 s; n2 silent altogether for ten minutes (a dead node); n3's
    # runner and monitor both silent through a 3-minute Redis outage, the monitor back first
    beats = [(60, runner("n1")), *((s, monitor("n1")) for s in range(55, -1, -5))]
    beats += [(600, runner("n2")), (599, monitor("n2"))]
    beats += [(181, runner("n3")), (180, monitor("n3")), (1, monitor("n3"))]
    for seq, (ago, message) in enumerate(sorted(beats, key=lambda beat: -beat[0])):
        ms = int((now - timedelta(seconds=ago)).timestamp() * 1000)
        await bus.redis.xadd(bus.keys.telemetry, encode(message), id=f"{ms}-{seq}")
    settings = Settings(namespace=bus.keys.namespace, _env_file=None)  # type: ignore[call-arg]
    scheduler = Scheduler(settings, bus)
    # When a scheduler starts a term
    await scheduler.read_clocks()
    await scheduler.recall_runners(now)
    # Then it knows Redis's clock (the same machine's here), and counts a runner's silence only
    # while its node's monitor was heard without a long gap
    assert abs(scheduler.liveness.redis_clock_behind) < timedelta(seconds=1)
    silent = {node: (now - heard).total_seconds() for node, heard in scheduler.liveness.runner_heard.items()}
    assert set(silent) == {"n1", "n2", "n3"}
    assert 59 <= silent["n1"] <= 61 and silent["n2"] <= 2 and silent["n3"] <= 2, silent


async def test_a_decision_on_an_out_of_date_state_conflicts(bus: Bus) -> None:
    [first] = await bus.append(bus.keys.events, m.ProcessQueue())
    [second] = await bus.append(bus.keys.events, m.ProcessQueue())
    fact = Append(bus.keys.events, m.ProcessQueue())
    stale = await bus.commit([fact], expect_last=first)
    assert stale.status == "CONFLICT" and stale.last_id == second
    assert (await bus.commit([fact], expect_last=second)).status == "OK"
    assert await bus.redis.xlen(bus.keys.events) == 3


async def test_entries_pages_through_a_long_stream(bus: Bus, redis_client: aioredis.Redis) -> None:
    async with redis_client.pipeline() as pipe:
        for i in range(2500):
            pipe.xadd(bus.keys.events, encode(m.JobQueued(job_id=f"j{i}", position=1)))
        await pipe.execute()
    ids = [e.entry_id async for e in bus.entries(bus.keys.events)]
    assert len(ids) == 2500 == len(set(ids))
    after = [e.entry_id async for e in bus.entries(bus.keys.events, after=ids[1999])]
    assert after == ids[2000:]


async def test_a_snapshot_plus_the_log_after_it_folds_to_the_whole_log(bus: Bus) -> None:
    from tests.examples import GPU

    # Given a log, a snapshot of part of it, and more events after the snapshot
    await bus.append(bus.keys.events, m.NodeJoined(node="n", simulated=True, gpus=[GPU]))
    early = await snapshot_of_queued_jobs(bus, 30)
    await bus.append(
        bus.keys.events, m.JobCancelled(job_id="j3"), m.JobPriorityChanged(job_id="j7", priority=9, previous=5)
    )
    # When a reader starts from the snapshot
    resumed = await snapshot.load(bus)
    assert resumed.position == early.position
    await catch_up(bus, resumed)
    # Then it has the state of the whole log
    whole = State()
    await catch_up(bus, whole)
    assert resumed.model_dump() == whole.model_dump()
    # And an older snapshot never replaces a newer one
    assert not await snapshot.save(bus, State())
    assert (await snapshot.load(bus)).position == early.position


async def test_a_snapshot_written_by_a_child_process_is_the_state_at_the_fork(
    bus: Bus, redis_server: RedisServer
) -> None:
    from tests.examples import GPU, LM

    # Given a folded state
    await bus.append(bus.keys.events, m.NodeJoined(node="n", simulated=True, gpus=[GPU]))
    for i in range(20):
        await bus.append(
            bus.keys.events, m.JobAccepted(job_id=f"j{i}", spec=LM), m.JobQueued(job_id=f"j{i}", position=i + 1)
        )
    state = State()
    await catch_up(bus, state)
    at_fork = state.model_dump()
    # When a child process writes it, while this process folds more right after the fork
    pid = snapshot.save_in_child(redis_server.url, bus.keys.snapshot, bus.keys.events, state)
    state.apply("9999999999999-0", m.JobCancelled(job_id="j1"))
    # Then the stored snapshot is the state as it was at the fork
    assert await snapshot.child_saved(pid)
    assert (await snapshot.load(bus)).model_dump() == at_fork
    # And a child that cannot store it says so
    unreachable = snapshot.save_in_child("redis://127.0.0.1:1/0", bus.keys.snapshot, bus.keys.events, state)
    assert not await snapshot.child_saved(unreachable)


async def test_a_snapshot_of_a_history_the_log_does_not_hold_is_neither_stored_nor_loaded(bus: Bus) -> None:
    from tests.examples import LM

    # Given a log, and a state folded from it plus an entry the log does not hold (taken from a
    # master that failed over before a replica had it)
    await bus.append(bus.keys.events, m.JobAccepted(job_id="a", spec=LM), m.JobQueued(job_id="a", position=1))
    state = State()
    await catch_up(bus, state)
    state.apply("9999999999999-0", m.JobCancelled(job_id="a"))
    # Then it is not stored
    assert not await snapshot.save(bus, state)
    # And one stored anyway (by a child that began writing before the failover) is not loaded
    # while the log reaches back past its position: a reader folds the whole log instead
    await bus.redis.hset(
        bus.keys.snapshot,
        mapping={"position": state.position, "version": snapshot.SNAPSHOT_VERSION, "state": snapshot._packed(state)},
    )
    assert (await snapshot.load(bus)).position == "0-0"
    # While a snapshot whose position is in the log is
    good = State()
    await catch_up(bus, good)
    await bus.redis.delete(bus.keys.snapshot)
    assert await snapshot.save(bus, good)
    assert (await snapshot.load(bus)).model_dump() == good.model_dump()


async def test_a_reader_group_that_was_caught_up_is_moved_past_its_own_commit(bus: Bus) -> None:
    [first] = await bus.append(bus.keys.events, m.ProcessQueue())
    await bus.redis.xgroup_create(bus.keys.events, "own", id="0")
    await bus.redis.xgroup_create(bus.keys.events, "other", id="0")
    assert len((await bus.redis.xreadgroup("own", "c", {bus.keys.events: ">"}))[0][1]) == 1
    facts = [Append(bus.keys.events, m.ProcessQueue()), Append(bus.keys.events, m.ProcessQueue())]
    done = await bus.commit(facts, expect_last=first, reader_group="own")
    assert done.status == "OK" and done.skipped and len(done.entry_ids) == 2
    assert await bus.redis.xreadgroup("own", "c", {bus.keys.events: ">"}) == []  # nothing to read back
    groups = {g["name"]: g for g in await bus.redis.xinfo_groups(bus.keys.events)}
    assert groups["own"]["last-delivered-id"] == done.entry_ids[-1]
    if "lag" in groups["own"]:  # Redis 7 counts what a group has left to read; 6.2 does not
        assert groups["own"]["lag"] == 0 and groups["other"]["lag"] == 3
    # A group that has not read up to the expected last entry reads the commit like any other
    [later] = (await bus.commit(facts[:1], expect_last=done.entry_ids[-1], reader_group="other")).entry_ids
    assert len((await bus.redis.xreadgroup("other", "c", {bus.keys.events: ">"}))[0][1]) == 4
    assert later == (await bus.redis.xrevrange(bus.keys.events, count=1))[0][0]


async def test_a_handler_refused_by_a_full_redis_stops_the_consumer_without_counting_a_failure(tmp_path: Path) -> None:
    # Given a consumer on a Redis of its own, and an entry whose handler writes to Redis
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    bus = Bus(client, Keys("full"), "test")
    stream = bus.keys.commands
    await bus.append(stream, m.CancelJob(job_id="j1"))
    handled: list[str] = []

    async def writes(delivery: Delivery) -> None:
        await client.hset("full:record", "job", delivery.message.job_id or "")
        handled.append(delivery.entry_id)

    def consumer() -> GroupConsumer:
        return GroupConsumer(bus, client, [stream], "workers", "c", writes, block_ms=50, max_deliveries=2)

    try:
        first = consumer()
        await first.setup()
        # When Redis is full (writes refused) as the handler writes
        await client.config_set("maxmemory", 1)
        # Then the consumer stops on it, as on a lost Redis: the service pauses until it has room
        with pytest.raises(OutOfMemoryError):
            await first.poll(10)
        assert handled == [] and not await client.xlen(bus.keys.dead_letter)
        # And once Redis has room, the entry is handled once by the consumer that starts again
        await client.config_set("maxmemory", 0)
        again = consumer()
        await again.setup()
        await again.drain_own_pending()
        assert len(handled) == 1 and await client.hget("full:record", "job") == "j1"
        assert (await client.xpending(stream, "workers"))["pending"] == 0
        assert not await client.xlen(bus.keys.dead_letter)
    finally:
        await client.aclose()
        server.stop()


async def test_a_read_whose_commit_meets_new_facts_every_time_is_decided_in_halves_not_given_up(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.config import Settings
    from services.scheduler.service import Scheduler

    # Given a read of eight submissions, and runners whose reports land in the log between the
    # scheduler's reading of it and every commit of more than one decision
    deliveries = []
    for i in range(8):
        command = m.SubmitJob(job_id=f"job-{i}", spec=LM)
        [entry_id] = await bus.append(bus.keys.commands, command)
        deliveries.append(Delivery(bus.keys.commands, entry_id, command, 1))
    real_commit = bus.commit
    interrupted = 0

    async def commit(appends: Sequence[Append], **options: object) -> object:
        nonlocal interrupted
        if sum(isinstance(a.message, m.JobAccepted) for a in appends) > 1:
            interrupted += 1
            await bus.append(bus.keys.events, m.HalfLifeChanged(half_life_s=3600.0 + interrupted))
        return await real_commit(appends, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(bus, "commit", commit)
    scheduler = Scheduler(Settings(namespace=bus.keys.namespace, _env_file=None), bus)  # type: ignore[call-arg]
    # When the scheduler commits the read
    await scheduler.committer.commit_batch(deliveries)
    # Then every submission was decided, once, in order, and the runners' reports are in the log
    log = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.events)]
    assert [e.job_id for e in log if isinstance(e, m.JobAccepted)] == [f"job-{i}" for i in range(8)]
    assert interrupted >= 2 and sum(isinstance(e, m.HalfLifeChanged) for e in log) == interrupted


async def test_a_commit_passes_over_reports_of_other_jobs_that_free_nothing_and_returns_them(bus: Bus) -> None:
    events = bus.keys.events
    [first] = await bus.append(events, m.JobCancelled(job_id="a"))
    tolerate = ("job.started", "job.progress")
    # Given reports of another job, of tolerated types, appended after the position a commit expects
    await bus.append(events, started("b", 1, "n1", "0"))
    await bus.append(events, m.JobProgress(job_id="b", attempt=1, step=1, max_steps=10, percent=10.0))
    # When a decision about job a is committed
    result = await bus.commit(
        [Append(events, m.JobCancelled(job_id="a"))], expect_last=first, tolerate=tolerate, touched={"a"}
    )
    # Then it lands after them, and they come back, to be folded first
    assert result.status == "OK"
    assert [decode(entry.fields).type for entry in result.passed] == ["job.started", "job.progress"]
    [*_, (last_id, _)] = await bus.redis.xrange(events)
    assert result.entry_ids == (last_id,) and result.passed[-1].entry_id < last_id
    # But a report about a job the decision touches, of another type, or with nothing tolerated,
    # is a conflict, and so are more reports than a commit may pass over
    for fact, allowed, jobs in [
        (started("a", 1, "n1", "0"), tolerate, {"a"}),
        (m.JobSucceeded(job_id="b", attempt=1, exit_code=0, run_dir="/r"), tolerate, {"a"}),
        (started("c", 1, "n1", "0"), (), {"a"}),
    ]:
        [*_, (expected, _)] = await bus.redis.xrange(events)
        await bus.append(events, fact)
        decision = [Append(events, m.JobCancelled(job_id="a"))]
        result = await bus.commit(decision, expect_last=expected, tolerate=allowed, touched=jobs)
        assert result.status == "CONFLICT", fact
    [*_, (expected, _)] = await bus.redis.xrange(events)
    for step in range(MOST_PASSED + 1):
        await bus.append(events, m.JobProgress(job_id="b", attempt=1, step=step, max_steps=99, percent=1.0))
    result = await bus.commit(
        [Append(events, m.JobCancelled(job_id="a"))], expect_last=expected, tolerate=tolerate, touched={"a"}
    )
    assert result.status == "CONFLICT"


async def test_a_scheduler_commit_that_passed_over_a_runners_report_leaves_the_state_the_logs_fold(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.config import Settings
    from services.scheduler.service import Scheduler

    scheduler = Scheduler(Settings(namespace=bus.keys.namespace, _env_file=None), bus)  # type: ignore[call-arg]
    outcomes: list[str] = []
    reports: list[m.Message] = []  # what a runner appends after the next decision, before its commit
    real_run = bus.run_commit

    async def run_commit(prepared: object, expect_last: str | None = None) -> object:
        while reports:
            await bus.append(bus.keys.events, reports.pop(0))
        result = await real_run(prepared, expect_last)  # type: ignore[arg-type]
        outcomes.append(result.status)
        return result

    monkeypatch.setattr(bus, "run_commit", run_commit)

    async def read(stream: str, message: m.Message) -> None:
        [entry_id] = await bus.append(stream, message)
        await scheduler.committer.commit_batch([Delivery(stream, entry_id, message, 1)])

    async def the_logs_fold() -> State:
        folded = State()
        await catch_up(bus, folded)
        assert scheduler.state.model_dump() == folded.model_dump()
        return folded

    # Given a node of two GPUs, and job a placed on it
    gpus = [
        m.GpuSample(index=i, uuid=f"g{i}", name="NVIDIA H100", memory_total_mb=80_000, memory_used_mb=0)
        for i in range(2)
    ]
    await read(bus.keys.telemetry, m.NodeHeartbeat(node="n1", simulated=True, gpus=gpus))
    await read(bus.keys.commands, m.SubmitJob(job_id="a", spec=LM))
    assert scheduler.state.jobs["a"].status == JobStatus.scheduled
    # When b is submitted, and a's runner reports its start between the decision and its commit
    outcomes.clear()
    reports.append(started("a", 1, "n1", "0"))
    await read(bus.keys.commands, m.SubmitJob(job_id="b", spec=LM))
    # Then the commit landed at once, after the report
    assert outcomes == ["OK"]
    types = [(decode(fields).job_id, decode(fields).type) for _, fields in await bus.redis.xrange(bus.keys.events)]
    assert types.index(("a", "job.started")) < types.index(("b", "job.accepted"))
    # And the scheduler's state is the fold of the log: a running, b placed on the other GPU
    folded = await the_logs_fold()
    assert folded.jobs["a"].status == JobStatus.running and folded.jobs["b"].status == JobStatus.scheduled
    # When a is cancelled while its runner reports a checkpoint of it
    outcomes.clear()
    reports.append(m.CheckpointSaved(job_id="a", attempt=1, step=5, path="/r/checkpoint-5"))
    await read(bus.keys.commands, m.CancelJob(job_id="a"))
    # Then that commit conflicted (the decision is about a) and the cancel was decided again
    assert outcomes == ["CONFLICT", "OK"]
    folded = await the_logs_fold()
    assert folded.jobs["a"].last_checkpoint == "/r/checkpoint-5"
    # When the next two submissions are read one after the other, the second decided while the
    # first one's commit is in flight, and that commit passes over a report of b's start
    outcomes.clear()
    plans = scheduler.decider.plans
    reports.append(started("b", 1, "n1", "1"))
    committer = scheduler.committer
    async with anyio.create_task_group() as term:  # a leader's term: its commits run in flight
        committer.start_term(committer.token or "", term)
        for job_id in ("c", "d"):
            command = m.SubmitJob(job_id=job_id, spec=LM)
            [entry_id] = await bus.append(bus.keys.commands, command)
            await committer.handle_batch([Delivery(bus.keys.commands, entry_id, command, 1)], [])
        await committer.settle()
        committer.end_term()
    # Then both landed, the second decided again after the report was folded in
    assert outcomes == ["OK", "OK"] and scheduler.decider.plans - plans == 3
    folded = await the_logs_fold()
    assert [folded.jobs[job_id].status for job_id in "cd"] == [JobStatus.queued] * 2
    assert folded.jobs["b"].status == JobStatus.running
