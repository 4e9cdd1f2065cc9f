"""The gateway process: the projection's reader and uvicorn in one task group."""

from __future__ import annotations

import anyio
import redis.asyncio as aioredis
import structlog
import uvicorn

from events.bus import Bus, connect
from services.config import Settings
from services.gateway.app import create_app
from services.gateway.projection import Projection

log = structlog.get_logger("gateway")


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    reader = connect(settings.resolved_redis_url, block_ms=5000)
    projection = Projection(bus, reader)
    app = create_app(settings, bus, projection)
    config = uvicorn.Config(
        app,
        host=settings.app_host,
        port=settings.app_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    # uvicorn captures SIGTERM/SIGINT while serving, shuts down gracefully, then re-raises the
    # signal, which stops the rest of the process.
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(projection.run)
            await projection.ready.wait()
            log.info("serving", url=f"http://{settings.app_host}:{settings.app_port}{settings.api_prefix}/training")
            try:
                await server.serve()
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
