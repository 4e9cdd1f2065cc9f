"""The gateway process: the projection's reader and uvicorn in one task group."""

from __future__ import annotations

import socket

import anyio
import redis.asyncio as aioredis
import structlog
import uvicorn
from pydantic import SecretStr

from events.bus import Bus, connect
from services import host_secrets
from services.config import Settings
from services.gateway.app import create_app
from services.gateway.projection import Projection

log = structlog.get_logger("gateway")


async def signing_secret(redis: aioredis.Redis, settings: Settings) -> Settings:
    """Settings with AUTH_SECRET: the configured one, else the one kept in DATA_DIR/secrets, made
    by the first gateway of this DATA_DIR, so that a token one gateway signed is good at every
    other on the host (and after a restart).

    Never in Redis: whoever could read it there could sign an admin's token. A key that an
    earlier version kept there is deleted, so it signs nothing any more."""
    await redis.delete(settings.keys.legacy_auth_secret)
    if settings.auth_secret and settings.auth_secret.get_secret_value():
        return settings
    path = host_secrets.auth_secret_file(settings.data_dir)
    secret = await anyio.to_thread.run_sync(host_secrets.read_or_create, path)
    log.info(
        "browser tokens are signed with the key in a file; gateways on other hosts honour them only "
        "if AUTH_SECRET is set, to the same value, on every gateway",
        path=str(path),
    )
    return settings.model_copy(update={"auth_secret": SecretStr(secret)})


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


async def serve_http(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve until a signal; cancelled (Redis's master changed: the gateway starts again), close
    the listener and the connections first, as a signal would."""
    try:
        await server.serve(sockets=[sock])
    except anyio.get_cancelled_exc_class():
        if server.started:
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                await server.shutdown(sockets=[sock])
        raise


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    settings = await signing_secret(redis, settings)
    # A command is acknowledged (2xx) once it is on the replicas asked for: a failover keeps it.
    bus.replicate_commands(settings.wait_replicas, settings.redis_wait_timeout_ms)
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
                    await serve_http(server, sock)
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
