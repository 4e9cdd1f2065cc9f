"""What every process shares: structured logging, Redis connections, presence heartbeats and a
clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import itertools
import logging
import math
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.bus import Bus, connect
from events.messages import ServiceHeartbeat
from services import metrics
from services.config import Settings

REDIS_RETRY_S = 0.5  # between attempts to reach a Redis that is still starting


def configure_logging(settings: Settings, service: str) -> None:
    """One line per event, with the service and instance bound; stdlib loggers (uvicorn, redis)
    are rendered the same way."""
    level = logging.getLevelNamesMapping()[settings.log_level]
    json_lines = settings.log_format == "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.dict_tracebacks if json_lines else structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every file change at INFO
    structlog.contextvars.bind_contextvars(service=service, instance=settings.instance)


# Redis away (refused, reset, timed out), or full: at maxmemory, with noeviction, it refuses every
# write while reads go on. Either way a service pauses, and starts its work again once Redis is
# back and takes writes (a refused script or transaction has no effect, so nothing is half done).
REDIS_LOST = (RedisConnectionError, RedisTimeoutError, ConnectionError, OutOfMemoryError)


class MasterChanged(RedisConnectionError):
    """Another server answers as the master (Sentinel promoted a replica, or the master restarted)."""


async def server_id(client: aioredis.Redis) -> str:
    """The run id of the server the client reaches: a new one after a failover or a restart."""
    return str((await client.info("server"))["run_id"])


async def watch_master(client: aioredis.Redis, started_on: str, interval_s: float) -> None:
    """Raise MasterChanged once the master is not the server ``started_on`` names. Replication is
    asynchronous: a promoted replica may lack the last writes the old master took, which a
    service may already hold in memory; it starts its work again from what the new master holds.
    (A client reconnects to a new master by itself, and may do so within its retries, unseen.)"""
    while True:
        await anyio.sleep(interval_s)
        try:
            now = await server_id(client)
        except REDIS_LOST:
            continue  # the service's own work meets the outage too; look again
        if now != started_on:
            raise MasterChanged(f"the master is another server now (run id {now}, was {started_on})")


GC_THRESHOLDS = (10_000, 500, 100)  # allocations before a young collection; then older ones


def settle_heap() -> None:
    """Call once a service has folded the log at start-up. What was folded lives as long as the
    process: keep the collector from walking it again at every full collection, and collect far
    less often. With thousands of jobs, each full collection paused the service for tens of
    milliseconds (every live stream of the gateway; every decision of the scheduler); the objects
    made per event form no cycles, so fewer collections cost little memory. A young collection
    walks what was allocated since the last: at 100,000 allocations it paused the scheduler for
    30-50 ms (a decision's whole budget), at 10,000 for 2-7 ms; older collections come as often
    as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def wait_for_redis(client: aioredis.Redis, *, timeout_s: float = math.inf) -> None:
    """Wait (with a deadline) until Redis answers; Redis may still be starting or restarting."""
    log = structlog.get_logger()
    with anyio.fail_after(timeout_s):
        for attempt in itertools.count():
            try:
                await client.ping()
                return
            except (*REDIS_LOST, OSError) as exc:
                if attempt % 20 == 0:
                    log.info("waiting for redis", error=str(exc))
                await anyio.sleep(REDIS_RETRY_S)


async def beat(bus: Bus, settings: Settings, service: str, started: datetime) -> None:
    heartbeat = ServiceHeartbeat(
        service=service,
        instance=settings.instance,
        started_at=started,
        interval_s=settings.heartbeat_interval_s,
        node=settings.node_name,
        metrics=metrics.snapshot(service),
    )
    await bus.append(bus.keys.telemetry, heartbeat, maxlen=settings.telemetry_maxlen)


async def heartbeat_loop(bus: Bus, settings: Settings, service: str) -> None:
    """Tell everyone this instance is alive, every heartbeat interval."""
    started = datetime.now(UTC)
    while True:
        try:
            await beat(bus, settings, service, started)
        except REDIS_LOST as exc:
            structlog.get_logger().warning("heartbeat failed", error=str(exc))
        await anyio.sleep(settings.heartbeat_interval_s)


async def wait_for_room(bus: Bus, settings: Settings, service: str) -> None:
    """Wait until Redis takes writes again (a heartbeat lands): a full Redis answers reads, so
    work started again at once would only fail again, and count another delivery of every
    entry it re-reads."""
    log = structlog.get_logger()
    for attempt in itertools.count():
        try:
            await beat(bus, settings, service, datetime.now(UTC))
            return
        except OutOfMemoryError as exc:
            if attempt % 20 == 0:
                log.warning("redis is full; waiting for room", error=str(exc))
            await anyio.sleep(REDIS_RETRY_S)
        except REDIS_LOST:
            await wait_for_redis(bus.redis)


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            structlog.get_logger().info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return


def _first_leaf(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


ServiceMain = Callable[[Settings, Bus, aioredis.Redis], Awaitable[None]]


async def serve(settings: Settings, service: str, main: ServiceMain, *, heartbeat: bool = True) -> None:
    """Run ``main`` and the heartbeat until a signal arrives. When Redis goes away, ``main`` is
    stopped and started again once Redis is back: every service rebuilds what it needs from
    Redis at start (the runner re-adopts its jobs), so a Redis restart costs a pause, not a crash.
    Through Sentinel, ``main`` also starts again when another server has become the master."""
    log = structlog.get_logger()
    redis = connect(settings.resolved_redis_url)
    bus = Bus(redis, settings.keys, f"{service}@{settings.instance}", settings.archive_dir)
    try:
        async with anyio.create_task_group() as outer:
            outer.start_soon(_stop_on_signal, outer.cancel_scope)
            finished = False
            while not finished:
                await wait_for_redis(redis)
                try:
                    async with anyio.create_task_group() as tg:
                        if settings.redis_sentinel:
                            tg.start_soon(watch_master, redis, await server_id(redis), settings.heartbeat_interval_s)
                        if heartbeat:
                            tg.start_soon(heartbeat_loop, bus, settings, service)
                        await main(settings, bus, redis)
                        tg.cancel_scope.cancel()
                    finished = True
                except* REDIS_LOST as lost:
                    log.warning("lost redis; restarting when it is back", error=_first_leaf(lost))
                    if lost.subgroup(OutOfMemoryError) is not None:
                        await wait_for_room(bus, settings, service)
            outer.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
    log.info("stopped")
