"""The scheduler process: wins the leader lease, folds the log, and decides.

One consumer loop reads commands, the log and telemetry through the `scheduler` group. Every
decision is made on a state folded up to the log's last entry and committed with the fencing token
and that entry id, so a stale leader, or a decision on an out-of-date state, cannot land.

This module is the wiring; each concept has its own:

- :mod:`.lease`: the leader lease and its fencing token,
- :mod:`.liveness`: who is heard (heartbeats, silent nodes and runners),
- :mod:`.decider`: what a read decides, by the pure :mod:`.rules`,
- :mod:`.committer`: the pipelined, fenced commit with rollback,
- :mod:`.snapshots`: snapshots by a forked child, and the log's retention.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from datetime import UTC, datetime

import anyio
import anyio.abc
import redis.asyncio as aioredis
import structlog

from events import messages as m
from events import snapshot
from events.bus import Bus, Fenced, clock_behind, connect
from events.connection import text_entries
from events.consumer import GroupConsumer
from events.keys import SCHEDULER_GROUP
from events.log import catch_up
from events.state import State
from services.config import Settings
from services.errors import LostLeadership
from services.runtime import REDIS_LOST, settle_heap
from services.scheduler import rules
from services.scheduler.committer import Committer
from services.scheduler.decider import Decider
from services.scheduler.lease import keep_lease, release_lease, take_lease
from services.scheduler.liveness import Liveness
from services.scheduler.snapshots import Snapshots

log = structlog.get_logger("scheduler")

CONSUMER = "leader"  # every leader reads as the same consumer, so a new one inherits the pending
READ_COUNT = 500  # entries per stream and read: decided together, committed in one step
# Telemetry is read in smaller helpings: a heartbeat takes ~0.4 ms to decide at 1,000 GPUs, and
# the heartbeats that pile up while a large read is decided (100+ at 125 nodes) would otherwise be
# decided in one read, ahead of a submission that arrives meanwhile.
TELEMETRY_READ_COUNT = 20


class Scheduler:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.keys = settings.keys
        limits = rules.Limits(
            **asdict(settings.policy),
            heartbeat_timeout_s=settings.heartbeat_interval_s * 5,
            foreign_memory_threshold_mb=settings.foreign_memory_threshold_mb,
            node_timeout_s=settings.node_timeout_s,
            backfill=settings.backfill,
            backfill_margin_s=settings.stop_grace_s,
            rendezvous_ports=settings.rendezvous_ports,
            restart_lost_checkpoints=settings.lost_checkpoint == "restart",
            idle_timeout_s=settings.idle_timeout_s,
            idle_gpu_util_pct=settings.idle_gpu_util_pct,
        )
        self.liveness = Liveness(
            settings.heartbeat_interval_s, settings.node_timeout_s, settings.foreign_memory_threshold_mb
        )
        self.decider = Decider(self.keys, limits, self.liveness)
        self.snapshots = Snapshots(settings, bus)
        self.committer = Committer(bus, self.decider, self.snapshots)
        self.warm = False  # the state is the fold of committed facts only (kept by a standby)

    @property
    def state(self) -> State:
        return self.decider.state

    async def read_clocks(self) -> None:
        """How far this scheduler's clock is ahead of Redis's, by which entry ids are stamped."""
        self.liveness.redis_clock_behind = await clock_behind(self.bus.redis)

    async def recall_runners(self, now: datetime) -> None:
        """Each node's runner's silence, by the heartbeats the telemetry stream still holds."""
        newest_first = await self.bus.redis.xrevrange(self.keys.telemetry, count=self.settings.telemetry_maxlen)
        self.liveness.recall_runners(text_entries(newest_first), now)

    async def stand_by(self) -> int:
        """Keep the state folded up to the end of the log while another scheduler leads, so that
        taking over folds only what was appended since the last look; returns how many entries
        were folded now."""
        cold = not self.warm
        if cold:
            self.decider.state = await snapshot.load(self.bus)
            self.warm = True
        folded = await catch_up(self.bus, self.state)
        if cold:
            settle_heap()  # what was folded lives on: collected once, then left alone
        return folded

    async def lead(self, reader: aioredis.Redis, token: str, tasks: anyio.abc.TaskGroup | None = None) -> None:
        """Run as the leader until the lease is lost; commits in flight and snapshot children
        run in ``tasks``, the term's task group."""
        if not self.warm:
            self.decider.state = await snapshot.load(self.bus)
        self.warm = False  # a leader's state holds decisions in flight: rebuilt once it stands by
        committer = self.committer
        committer.start_term(token, tasks)
        try:
            folded = await committer.catch_up()
            settle_heap()
            self.liveness.hear_anew(self.state, datetime.now(UTC))
            await self.read_clocks()
            await self.recall_runners(datetime.now(UTC))
            log.info("leading", token=token, position=self.state.position, jobs=len(self.state.jobs), folded=folded)
            consumer = GroupConsumer(
                self.bus,
                reader,
                [self.keys.commands, self.keys.events, self.keys.telemetry],
                SCHEDULER_GROUP,
                CONSUMER,
                None,
                block_ms=1000,
                count=READ_COUNT,
                counts={self.keys.telemetry: TELEMETRY_READ_COUNT},
                claim_idle_ms=self.settings.claim_idle_ms,
                max_deliveries=self.settings.max_deliveries,
                batch=committer.handle_batch,
                skip=committer.is_own,
                on_idle=committer.flush_acks,
            )
            await consumer.setup()
            await self.apply_settings()
            await committer.commit_pass()
            await consumer.run()
        finally:
            committer.end_term()

    async def apply_settings(self) -> None:
        """Put the pool's settings that the log folds (the QUOTAS table, the usage half-life) in
        the log when they differ from what it holds: decided like any other command."""
        commands: list[m.Message] = []
        if self.settings.fair_share_half_life_s != self.state.half_life_s:
            commands.append(m.SetHalfLife(half_life_s=self.settings.fair_share_half_life_s, actor="config"))
        configured = self.settings.configured_quotas
        if configured is not None and configured != self.state.config_quotas:
            commands.append(m.SetQuotas(quotas=configured, from_config=True, actor="config"))
        for command in commands:
            await self.bus.send(self.keys.commands, command)


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    scheduler = Scheduler(settings, bus)
    reader = connect(settings.resolved_redis_url, block_ms=1000)
    try:
        while True:
            lease = await take_lease(
                redis,
                settings.keys,
                settings.instance,
                settings.leader_lease_ms,
                replicas=settings.wait_replicas,
                timeout_ms=settings.redis_wait_timeout_ms,
            )
            if lease.token is None:
                # Standby: keep the state folded, and look again when the holder's lease runs out
                # (unless renewed), at the latest a third of a lease from now.
                await scheduler.stand_by()
                await anyio.sleep(min(max(lease.left_ms, 0) + 5, settings.leader_lease_ms / 3) / 1000)
                continue
            try:
                async with anyio.create_task_group() as term:
                    term.start_soon(keep_lease, redis, settings, scheduler.read_clocks)
                    if settings.retention:
                        term.start_soon(scheduler.snapshots.retain)
                    await scheduler.lead(reader, str(lease.token), term)
            except* (LostLeadership, Fenced):
                log.warning("lost the leadership; standing by")
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
            with contextlib.suppress(*REDIS_LOST):  # then the lease simply expires
                await release_lease(redis, settings.keys, settings.instance)
