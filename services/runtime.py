"""What every process shares: structured logging, Redis connections, presence heartbeats and a
clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.bus import Bus, connect
from events.messages import ServiceHeartbeat
from services.config import Settings

REDIS_RETRY_S = 0.5  # between attempts to reach a Redis that is still starting


def configure_logging(settings: Settings, service: str) -> None:
    level = logging.getLevelNamesMapping()[settings.log_level]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    structlog.contextvars.bind_contextvars(service=service, instance=settings.instance)


async def wait_for_redis(client: aioredis.Redis, *, timeout_s: float = 60.0) -> None:
    log = structlog.get_logger()
    with anyio.fail_after(timeout_s):
        while True:
            try:
                await client.ping()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError):
                log.info("waiting for redis")
                await anyio.sleep(REDIS_RETRY_S)


async def heartbeat_loop(bus: Bus, settings: Settings, service: str) -> None:
    """Tell everyone this instance is alive, every heartbeat interval."""
    started = datetime.now(UTC)
    while True:
        beat = ServiceHeartbeat(
            service=service,
            instance=settings.instance,
            started_at=started,
            interval_s=settings.heartbeat_interval_s,
        )
        try:
            await bus.append(bus.keys.telemetry, beat, maxlen=settings.telemetry_maxlen)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            structlog.get_logger().warning("heartbeat failed", error=str(exc))
        await anyio.sleep(settings.heartbeat_interval_s)


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            structlog.get_logger().info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return


ServiceMain = Callable[[Settings, Bus, aioredis.Redis], Awaitable[None]]


async def serve(settings: Settings, service: str, main: ServiceMain, *, heartbeat: bool = True) -> None:
    """Connect, then run ``main`` and the heartbeat in one task group until a signal arrives."""
    redis = connect(settings.resolved_redis_url)
    try:
        await wait_for_redis(redis)
        bus = Bus(redis, settings.keys, f"{service}@{settings.instance}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            if heartbeat:
                tg.start_soon(heartbeat_loop, bus, settings, service)
            await main(settings, bus, redis)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
    structlog.get_logger().info("stopped")
