"""The gateway's read model: one reader tails the log and telemetry, folds the log into state
with the shared fold, and fans every event out to the live streams of all clients.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import redis.asyncio as aioredis
import structlog

from events import messages as m
from events import snapshot
from events.bus import Bus, clock_behind, entry_id_key, entry_time
from events.codec import DecodeError, decode, envelope_json
from events.connection import text_entries, text_streams
from events.estimates import Estimate, estimate_queue
from events.log import apply_entry, catch_up
from events.placement import foreign_gpus, freeable_gpus, in_service
from events.policy import Policy
from events.records import Job, JobStatus
from events.state import State
from events.transitions import new_job
from services.runtime import REDIS_LOST, settle_heap, wait_for_redis

log = structlog.get_logger("gateway.projection")

SUBSCRIBER_BUFFER = 1000  # events a slow client may fall behind before it is disconnected
ESTIMATE_REFRESH_S = 1.0
ESTIMATE_COST_RATIO = 30  # estimates take at most about a thirtieth of the gateway's time
LOG_TURN_MS = 1000  # how soon a newly followed job's output joins the shared read
CLOCK_READ_S = 60.0  # how often Redis's clock is compared with this process's


@dataclass(frozen=True)
class LiveEvent:
    entry_id: str
    job_id: str
    type: str
    data: str  # the entry's JSON envelope, as stored


@dataclass(eq=False)
class Subscription:
    """A client's bounded buffer of live events. (An asyncio queue: the gateway runs on asyncio,
    and a queue costs a fraction of a memory object stream per event, which counts at thousands
    of clients.)"""

    topic: str  # a job id, or ALL
    cut: asyncio.Event = field(default_factory=asyncio.Event)  # set when it falls too far behind
    queue: asyncio.Queue[LiveEvent] = field(init=False)

    def __post_init__(self) -> None:
        # Following everything takes every event: such a client may fall further behind
        self.queue = asyncio.Queue(SUBSCRIBER_BUFFER * (10 if self.topic == ALL else 1))

    @property
    def overflowed(self) -> bool:
        """Cut off for falling too far behind: it ends once drained."""
        return self.cut.is_set()

    async def __aiter__(self) -> AsyncIterator[LiveEvent]:
        while not (self.overflowed and self.queue.empty()):
            yield await self.queue.get()


ALL = "*"  # the topic of a subscription to every event


class Topics:
    """Subscriptions by topic, so that an event is handed only to those following its job (and
    to those following everything), not offered to every client to filter."""

    def __init__(self) -> None:
        self.by_topic: dict[str, set[Subscription]] = {}

    def add(self, topic: str, cut: asyncio.Event | None = None) -> Subscription:
        subscription = Subscription(topic, cut or asyncio.Event())
        self.by_topic.setdefault(topic, set()).add(subscription)
        return subscription

    def remove(self, subscription: Subscription) -> bool:
        """Drop a subscription; True when its topic has no subscribers left."""
        followers = self.by_topic.get(subscription.topic, set())
        followers.discard(subscription)
        if not followers:
            self.by_topic.pop(subscription.topic, None)
            return True
        return False

    def publish(self, event: LiveEvent) -> None:
        for topic in (event.job_id, ALL):
            followers = self.by_topic.get(topic)
            for subscription in list(followers or ()):
                try:
                    subscription.queue.put_nowait(event)
                except asyncio.QueueFull:
                    # A client that cannot keep up is cut off rather than slowing everyone else:
                    # it gets what is buffered, then the end of its stream (it resumes from there).
                    subscription.cut.set()
                    followers.discard(subscription)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return sum(len(followers) for followers in self.by_topic.values())


@dataclass
class Projection:
    bus: Bus
    reader: aioredis.Redis
    state: State = field(default_factory=State)
    telemetry_position: str = "$"
    heartbeats: dict[str, m.NodeHeartbeat] = field(default_factory=dict)
    services: dict[tuple[str, str], m.ServiceHeartbeat] = field(default_factory=dict)
    # Submits the scheduler has not decided on yet: job id -> (command entry id, its fields),
    # decoded only when someone asks for the job
    pending: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    commands_position: str = "0-0"
    subscribers: Topics = field(default_factory=Topics)
    # Output lines of the jobs someone follows: where the shared reader is in each job's stream
    log_positions: dict[str, str] = field(default_factory=dict)
    log_subscribers: Topics = field(default_factory=Topics)
    ready: anyio.Event = field(default_factory=anyio.Event)
    # As the scheduler judges GPUs, for the estimates: nodes in service, GPUs others use
    heartbeat_timeout_s: float = 10.0
    foreign_memory_threshold_mb: int = 1024
    policy: Policy | None = None  # how the scheduler shares the pool (preemption, fair share), for the estimates
    _estimates: tuple[datetime, tuple[object, ...], Mapping[str, Estimate]] | None = None
    redis_clock_behind: timedelta = timedelta(0)  # this process's clock minus Redis's
    _clock_read_at: float = -math.inf
    _heard: int = 0  # node heartbeats taken in: they change which GPUs are free
    _estimate_cost_s: float = 0.0
    _advanced: anyio.Event = field(default_factory=anyio.Event)
    _deciding: dict[str, asyncio.Future[None]] = field(default_factory=dict)  # job id -> done once decided

    def subscribe(self, job_id: str | None = None, cut: asyncio.Event | None = None) -> Subscription:
        """Follow one job's events, or (None) every event; ``cut`` is set if it falls behind."""
        return self.subscribers.add(job_id or ALL, cut)

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscribers.remove(subscription)

    def subscribe_logs(self, job_id: str, after: str, cut: asyncio.Event | None = None) -> Subscription:
        """Follow a job's output lines after ``after``; the shared reader picks the job's stream
        up within a second (it reads on from the earliest position anyone asked for)."""
        subscription = self.log_subscribers.add(job_id, cut)
        known = self.log_positions.get(job_id)
        if known is None or entry_id_key(after) < entry_id_key(known):
            self.log_positions[job_id] = after
        return subscription

    def unsubscribe_logs(self, subscription: Subscription) -> None:
        if self.log_subscribers.remove(subscription):
            self.log_positions.pop(subscription.topic, None)

    async def wait_until(self, predicate: object, timeout_s: float) -> bool:
        """Wait until ``predicate()`` holds for the state, or the timeout passes."""
        with anyio.move_on_after(timeout_s):
            while not predicate():  # type: ignore[operator]
                await self._advanced.wait()
            return True
        return bool(predicate())  # type: ignore[operator]

    def estimates(self, *, fresh: bool = False) -> tuple[datetime, Mapping[str, Estimate]]:
        """Queue estimates as of when they were computed. Simulating a long queue costs time, so
        it is redone only when the log has moved on or a node's heartbeat came in, at most every
        ESTIMATE_REFRESH_S (``fresh``: sooner), and never sooner than ESTIMATE_COST_RATIO times as
        long as the last one took: a burst of submissions, or of dashboards asking for the queue,
        does not simulate a queue of thousands once each."""
        now = datetime.now(UTC)
        cached = self._estimates
        floor = ESTIMATE_COST_RATIO * self._estimate_cost_s
        refresh = timedelta(seconds=floor if fresh else max(ESTIMATE_REFRESH_S, floor))
        if cached is not None and now - cached[0] < refresh:
            return cached[0], cached[2]  # (what changed is looked at only once it may be redone)
        live = in_service(self.state, self.heartbeats, self.heartbeat_timeout_s, now)
        seen = (self.state.position, self._heard, tuple(live))  # a node falling silent counts too
        if cached is None or cached[1] != seen:
            started = time.perf_counter()
            threshold = self.foreign_memory_threshold_mb
            gpus = freeable_gpus(self.state, self.heartbeats, live, threshold)
            foreign = foreign_gpus(self.state, self.heartbeats, live, threshold)
            self._estimates = (now, seen, estimate_queue(self.state, now, gpus, foreign, self.policy))
            self._estimate_cost_s = time.perf_counter() - started
        assert self._estimates is not None
        return self._estimates[0], self._estimates[2]

    def job(self, job_id: str) -> Job | None:
        """A job from the log, or a pending one from its submit command."""
        job = self.state.jobs.get(job_id)
        if job is not None or job_id not in self.pending:
            return job
        entry_id, fields = self.pending[job_id]
        try:
            command = decode(fields)
        except DecodeError:
            return None
        if not isinstance(command, m.SubmitJob):
            return None
        accepted = m.JobAccepted(
            job_id=job_id, spec=command.spec, team=command.team, actor=command.actor, at=command.at
        )
        return new_job(accepted, 0, entry_id)

    def is_decided(self, job_id: str) -> bool:
        job = self.state.jobs.get(job_id)
        return job is not None and job.status != JobStatus.pending

    async def wait_decided(self, job_id: str, timeout_s: float) -> bool:
        """Wait until the scheduler's decision on a submitted job is folded in, or the timeout
        passes. Each waiter is woken by its own job's decision alone."""
        if self.is_decided(job_id):
            return True
        loop = asyncio.get_running_loop()
        decided = self._deciding[job_id] = loop.create_future()

        # A plain future and timer: a cancel scope and an event per request cost more than the
        # rest of the wait, at a thousand submissions a second.
        def expire() -> None:
            if not decided.done():
                decided.set_result(None)

        timer = loop.call_later(timeout_s, expire)
        try:
            await decided
        finally:
            timer.cancel()
            self._deciding.pop(job_id, None)
        return self.is_decided(job_id)

    async def run(self) -> None:
        await self._read_clock()
        await self._recent_telemetry()
        self.state = await snapshot.load(self.bus)
        await catch_up(self.bus, self.state)
        self.pending.clear()  # filled next, from the submits not decided in the log
        async for entry in self.bus.entries(self.bus.keys.commands):
            self._note_command(entry.entry_id, entry.fields)
        settle_heap()  # full collections paused every live stream: p99 250 ms against 17 ms
        self.ready.set()
        self._signal()
        while True:
            try:
                if time.monotonic() - self._clock_read_at > CLOCK_READ_S:
                    await self._read_clock()
                streams = {
                    self.bus.keys.events: self.state.position,
                    self.bus.keys.telemetry: self.telemetry_position,
                    self.bus.keys.commands: self.commands_position,
                    **{self.bus.keys.logs(job): position for job, position in self.log_positions.items()},
                }
                # Followed jobs' output streams join the read at its next turn: turn often then.
                block = LOG_TURN_MS if self.log_positions else 5000
                reply = text_streams(await self.reader.xread(streams, count=500, block=block))  # type: ignore[arg-type]  # redis-py asks an invariant dict[KeyT, StreamIdT]
            except REDIS_LOST as exc:
                # The state is intact: once Redis is back, reading on from the same positions
                # continues exactly where the projection stopped.
                log.warning("lost redis; resuming when it is back", error=str(exc))
                await wait_for_redis(self.reader)
                continue
            for stream, items in reply:
                for entry_id, fields in items:
                    self._take(stream, entry_id, fields)
            if reply:
                self._signal()

    async def _read_clock(self) -> None:
        """How far this process's clock is ahead of Redis's, by which entry ids are stamped."""
        self._clock_read_at = time.monotonic()
        self.redis_clock_behind = await clock_behind(self.bus.redis)

    async def _recent_telemetry(self) -> None:
        """The latest heartbeats, so that GPUs and services show at once after a restart."""
        recent = text_entries(await self.bus.redis.xrevrange(self.bus.keys.telemetry, count=2000))
        self.telemetry_position = recent[0][0] if recent else "0-0"
        for entry_id, fields in reversed(recent):
            self._take(self.bus.keys.telemetry, entry_id, fields)

    def _note_command(self, entry_id: str, fields: dict[str, str]) -> None:
        self.commands_position = entry_id
        job_id = fields.get("job_id")
        if fields.get("type") == "job.submit" and job_id and job_id not in self.state.jobs:
            self.pending[job_id] = (entry_id, fields)

    def _take(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        if stream.startswith(self._logs_prefix):
            job_id = stream.removeprefix(self._logs_prefix)
            if job_id in self.log_positions:
                self.log_positions[job_id] = entry_id
                line = json.dumps({"fd": fields.get("fd"), "line": fields.get("line")})
                self.log_subscribers.publish(LiveEvent(entry_id, job_id, "log", line))
            return
        if stream == self.bus.keys.commands:
            self._note_command(entry_id, fields)
            return
        if stream == self.bus.keys.telemetry:
            self.telemetry_position = entry_id
        elif stream == self.bus.keys.events:
            event = apply_entry(self.state, entry_id, fields)
            if isinstance(event, m.JobAccepted):
                self.pending.pop(event.job_id or "", None)
            if event is not None:
                job_id = fields.get("job_id", "")
                self.subscribers.publish(LiveEvent(entry_id, job_id, event.type, envelope_json(fields, event)))
                waiter = self._deciding.get(job_id)
                if waiter is not None and not waiter.done() and self.is_decided(job_id):
                    waiter.set_result(None)
            return
        try:
            message = decode(fields)
        except DecodeError as exc:
            log.warning("undecodable entry", stream=stream, entry_id=entry_id, reason=str(exc))
            return
        if isinstance(message, m.NodeHeartbeat):
            # aged by its arrival in Redis, as the scheduler does: not by the node's clock
            arrived = min(datetime.now(UTC), entry_time(entry_id) + self.redis_clock_behind)
            self.heartbeats[message.node] = message.model_copy(update={"at": arrived})
            self._heard += 1
        elif isinstance(message, m.ServiceHeartbeat):
            self.services[(message.service, message.instance)] = message

    @property
    def _logs_prefix(self) -> str:
        return self.bus.keys.logs("")

    def _signal(self) -> None:
        self._advanced.set()
        self._advanced = anyio.Event()

    def live_services(self, now: datetime | None = None) -> dict[str, list[str]]:
        """Instances per service type whose last heartbeat is recent."""
        now = now or datetime.now(UTC)
        alive: dict[str, list[str]] = {}
        for (service, instance), beat in self.services.items():
            if now - beat.at <= timedelta(seconds=max(3 * beat.interval_s, 5)):
                alive.setdefault(service, []).append(instance)
        return alive
