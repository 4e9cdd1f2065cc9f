"""The scheduler process: wins the leader lease, folds the log, and decides.

One consumer loop reads commands, the log and telemetry through the `scheduler` group. Every
decision is made on a state folded up to the log's last entry and committed with the fencing token
and that entry id, so a stale leader, or a decision on an out-of-date state, cannot land.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import anyio
import redis.asyncio as aioredis
import structlog

from events import audit, snapshot
from events import messages as m
from events.bus import Append, Bus, Fenced, connect
from events.consumer import CommitGuard, Delivery, GroupConsumer
from events.keys import SCHEDULER_GROUP
from events.log import catch_up
from events.state import State
from services.config import Settings
from services.runtime import REDIS_LOST
from services.scheduler import rules

log = structlog.get_logger("scheduler")

CONSUMER = "leader"  # every leader reads as the same consumer, so a new one inherits the pending

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class LostLeadership(Exception):
    """The lease expired or another scheduler took it."""


class Scheduler:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.keys = settings.keys
        self.state = State()
        self.unsaved = 0  # events folded since the last snapshot
        self.heartbeats: dict[str, m.NodeHeartbeat] = {}
        self.token: str | None = None
        self.limits = rules.Limits(
            heartbeat_timeout_s=settings.heartbeat_interval_s * 5,
            foreign_memory_threshold_mb=settings.foreign_memory_threshold_mb,
            node_timeout_s=settings.node_timeout_s,
            backfill=settings.backfill,
        )
        self.last_heard: dict[str, datetime] = {}

    async def catch_up(self) -> None:
        """Fold every event appended since the state's position; snapshot now and then."""
        stale = self.state.stale_reports
        self.unsaved += await catch_up(self.bus, self.state)
        if self.state.stale_reports > stale:
            log.warning("ignored reports of superseded attempts", count=self.state.stale_reports - stale)
        if self.unsaved >= snapshot.SNAPSHOT_EVERY:
            await snapshot.save(self.bus, self.state)
            self.unsaved = 0

    def _pass(self, cause: m.Message) -> list[Append]:
        return rules.schedule(self.state, self.keys, self.heartbeats, self.limits, datetime.now(UTC), cause)

    async def handle(self, delivery: Delivery) -> Sequence[Append]:
        await self.catch_up()
        message = delivery.message
        now = datetime.now(UTC)
        if isinstance(message, m.NodeHeartbeat):
            self.heartbeats[message.node] = message
            self.last_heard[message.node] = now  # by this scheduler's clock: no skew between nodes
        if delivery.stream == self.keys.telemetry:
            # Heartbeats arrive every few seconds (this scheduler's own among them): the clock by
            # which silent nodes are found. A telemetry entry carries no request, so deciding only
            # the loss of a node this time costs nothing.
            lost = rules.lost_nodes(self.state, self.last_heard, self.limits, now)
            if lost:
                log.warning("node lost", node=lost[0])
                return rules.lose_node(self.state, self.keys, lost[0], message)
        if isinstance(message, m.NodeHeartbeat):
            joined = rules.node_changes(self.state, message)
            if joined:
                return [Append(self.keys.events, fact) for fact in joined]
            return self._pass(message)
        if isinstance(message, m.SubmitJob):
            now = datetime.now(UTC)
            return rules.submit(self.state, self.keys, message, self.heartbeats, self.limits, now)
        if isinstance(message, m.CancelJob):
            return rules.cancel(self.state, self.keys, message)
        if isinstance(message, m.SetPriority):
            return rules.set_priority(self.state, self.keys, message)
        if isinstance(message, m.DeleteJob):
            return rules.delete(self.state, self.keys, message)
        if isinstance(message, m.ReleaseJob):
            return rules.release(self.state, self.keys, message)
        if isinstance(message, m.RequestExport):
            job = self.state.jobs.get(message.job_id or "")
            return rules.export(self.state, self.keys, job, message) if job else []
        if isinstance(message, m.ProcessQueue):
            return self._pass(message)
        if delivery.stream == self.keys.events:
            now = datetime.now(UTC)
            return rules.on_event(self.state, self.keys, self.heartbeats, self.limits, now, message)
        return []

    async def commit_pass(self) -> None:
        """A scheduling pass outside any delivery (on taking the lead)."""
        cause = m.ProcessQueue(source=self.bus.source)
        while True:
            await self.catch_up()
            decisions = self._pass(cause)
            if not decisions:
                return
            result = await self.bus.commit(decisions, fence_token=self.token, expect_last=self.state.position)
            if result.status != "CONFLICT":
                return

    async def lead(self, reader: aioredis.Redis) -> None:
        """Run as the leader until the lease is lost."""
        self.state = await snapshot.load(self.bus)
        await self.catch_up()
        # Every node gets a full timeout from now: this scheduler has not heard anyone yet.
        self.last_heard = {name: datetime.now(UTC) for name, node in self.state.nodes.items() if node.up}
        log.info("leading", token=self.token, position=self.state.position, jobs=len(self.state.jobs))
        consumer = GroupConsumer(
            self.bus,
            reader,
            [self.keys.commands, self.keys.events, self.keys.telemetry],
            SCHEDULER_GROUP,
            CONSUMER,
            self.handle,
            block_ms=1000,
            claim_idle_ms=self.settings.claim_idle_ms,
            max_deliveries=self.settings.max_deliveries,
            guard=CommitGuard(fence_token=lambda: self.token, expect_last=lambda: self.state.position),
        )
        await consumer.setup()
        await self.commit_pass()
        await consumer.run()

    async def retain(self) -> None:
        """Apply the log's retention policy now and then: archive, then trim. The snapshot is
        saved first, so that nothing a restarting reader needs is trimmed."""
        while True:
            await anyio.sleep(self.settings.retention_interval_s)
            await snapshot.save(self.bus, self.state)
            self.unsaved = 0
            done = await audit.archive_and_trim(
                self.bus,
                max_age_s=self.settings.audit_max_age_s,
                max_entries=self.settings.audit_max_entries,
                now_ms=int(time.time() * 1000),
            )
            if done.entries or done.held_back:
                log.info(
                    "log archived",
                    entries=done.entries,
                    files=[str(f) for f in done.files],
                    kept_from=done.kept_from,
                    held_back=done.held_back,
                )


async def _renew(redis: aioredis.Redis, settings: Settings) -> None:
    renew = redis.register_script(_RENEW_LUA)
    while True:
        await anyio.sleep(settings.leader_lease_ms / 3000)
        if not await renew(keys=[settings.keys.leader], args=[settings.instance, settings.leader_lease_ms]):
            raise LostLeadership


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    scheduler = Scheduler(settings, bus)
    reader = connect(settings.resolved_redis_url, block_ms=1000)
    try:
        while True:
            won = await redis.set(settings.keys.leader, settings.instance, nx=True, px=settings.leader_lease_ms)
            if not won and await redis.get(settings.keys.leader) == settings.instance:
                won = True  # our own lease, from before Redis dropped the connection
            if not won:
                # Standby: the lease is a timer, so checking it on a timer is the protocol.
                await anyio.sleep(settings.leader_lease_ms / 3000)
                continue
            scheduler.token = str(await redis.incr(settings.keys.fence))
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_renew, redis, settings)
                    if settings.retention:
                        tg.start_soon(scheduler.retain)
                    await scheduler.lead(reader)
            except* (LostLeadership, Fenced):
                log.warning("lost the leadership; standing by")
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
            with contextlib.suppress(*REDIS_LOST):  # then the lease simply expires
                await redis.eval(_RELEASE_LUA, 1, settings.keys.leader, settings.instance)
