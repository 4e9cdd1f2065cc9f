"""The gateway process: the projection's reader and uvicorn in one task group."""

from __future__ import annotations

import secrets
import socket

import anyio
import redis.asyncio as aioredis
import structlog
import uvicorn
from pydantic import SecretStr

from events.bus import Bus, connect
from services.config import Settings
from services.gateway.app import create_app
from services.gateway.projection import Projection

log = structlog.get_logger("gateway")


async def shared_secret(redis: aioredis.Redis, settings: Settings) -> Settings:
    """Settings with AUTH_SECRET: the configured one, else one made by the first gateway and kept
    in Redis, so that a token one gateway signed is good at every other (and after a restart)."""
    if settings.auth_secret and settings.auth_secret.get_secret_value():
        return settings
    key = settings.keys.auth_secret
    await redis.set(key, secrets.token_hex(32), nx=True)
    return settings.model_copy(update={"auth_secret": SecretStr(str(await redis.get(key)))})


def listening_socket(settings: Settings) -> socket.socket:
    """The gateway's socket; with APP_REUSE_PORT, one that other gateway processes share."""
    family = socket.AF_INET6 if ":" in settings.app_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.app_reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.app_host, settings.app_port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    settings = await shared_secret(redis, settings)
    reader = connect(settings.resolved_redis_url, block_ms=5000)
    projection = Projection(
        bus,
        reader,
        heartbeat_timeout_s=settings.heartbeat_interval_s * 5,  # as the scheduler counts them
        foreign_memory_threshold_mb=settings.foreign_memory_threshold_mb,
    )
    app = create_app(settings, bus, projection)
    config = uvicorn.Config(
        app,
        host=settings.app_host,
        port=settings.app_port,
        log_config=None,
        access_log=False,
        proxy_headers=False,  # nothing reads the client's address; X-Forwarded-* is not trusted
        server_header=False,
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
                with listening_socket(settings) as sock:  # bound once the projection can answer
                    await server.serve(sockets=[sock])
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
