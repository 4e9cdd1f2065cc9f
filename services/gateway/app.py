"""The gateway's HTTP surface: REST under ``{API_PREFIX}/training`` and live SSE streams.

Handlers parse, call one function, render. Reads come from the projection; writes append a command
and, for a submit or a new quota table, wait briefly for the scheduler's decision. Besides:
``{API_PREFIX}/admin/quotas`` (admins) and ``{API_PREFIX}/usage``.
"""

from __future__ import annotations

import anyio
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from events.bus import Bus
from services.config import Settings
from services.gateway import catalog, dashboard, metrics, openapi, sweeps, views
from services.gateway.auth import METRICS_PATH, Auth, RequireAuth, forget_token, issue_token, unauthorized, whoami
from services.gateway.context import bus_of, projection_of
from services.gateway.edges import Edges, allowed_hosts, split_names
from services.gateway.errors import ApiError, api_error, http_error, redis_unavailable, server_error
from services.gateway.history import audit_routes, job_routes
from services.gateway.jobs import (
    cancel_job,
    create_job,
    delete_job,
    export_job,
    get_job,
    job_command,
    job_logs,
    job_progress,
    list_jobs,
    resume_job,
    start_job,
    suspend_job,
)
from services.gateway.live import events_stream, gpus, gpus_stream, job_log_stream, job_stream
from services.gateway.pool import get_quotas, put_quotas, usage
from services.gateway.projection import Projection
from services.gateway.queue import change_priority, process_queue, queue, queue_status, remove_from_queue
from services.gateway.submit import SwiftFlags

# The notifier is not among them: without webhooks the system does all it must without it.
REQUIRED_SERVICES: tuple[views.ServiceType, ...] = ("gateway", "scheduler", "gpu-monitor", "runner", "exporter")


async def health(request: Request) -> JSONResponse:
    projection = projection_of(request)
    try:
        with anyio.fail_after(2):
            await bus_of(request).redis.ping()
        redis_ok = True
    except (RedisError, TimeoutError, OSError):
        redis_ok = False
    alive = projection.live_services()
    missing: list[views.ServiceType] = [s for s in REQUIRED_SERVICES if s not in alive and s != "gateway"]
    ok = redis_ok and not missing and projection.ready.is_set()
    position = projection.state.position
    body: views.Health | views.Degraded
    if ok:
        body = views.Health(status="ok", redis=True, services=alive, missing=[], log_position=position)
    else:
        body = views.Degraded(status="degraded", redis=redis_ok, services=alive, missing=missing, log_position=position)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


def routes(prefix: str) -> list[Route | Mount]:
    training = [
        *catalog.routes(),  # first: /queue/processor/status is not a job's status
        Route("/jobs", create_job, methods=["POST"]),
        Route("/jobs", list_jobs, methods=["GET"]),
        Route("/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/jobs/{job_id}/progress", job_progress, methods=["GET"]),
        *job_routes(),
        Route("/jobs/{job_id}/logs", job_logs, methods=["GET"]),
        Route("/jobs/{job_id}/command", job_command, methods=["GET"]),
        Route("/jobs/{job_id}/stream", job_stream, methods=["GET"]),
        Route("/jobs/{job_id}/logs/stream", job_log_stream, methods=["GET"]),
        Route("/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/jobs/{job_id}/stop", cancel_job, methods=["POST"]),
        Route("/jobs/{job_id}/start", start_job, methods=["POST"]),
        Route("/jobs/{job_id}/suspend", suspend_job, methods=["POST"]),
        Route("/jobs/{job_id}/resume", resume_job, methods=["POST"]),
        Route("/jobs/{job_id}/export", export_job, methods=["POST"]),
        *sweeps.routes(),
        Route("/queue", queue, methods=["GET"]),
        Route("/queue/{job_id}/status", queue_status, methods=["GET"]),
        Route("/queue/{job_id}", change_priority, methods=["PATCH"]),
        Route("/queue/{job_id}", remove_from_queue, methods=["DELETE"]),
        Route("/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/queue/process", process_queue, methods=["POST"]),
        Route("/events/stream", events_stream, methods=["GET"]),
        Route("/gpus", gpus, methods=["GET"]),
        Route("/gpus/stream", gpus_stream, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    auth = [
        Route("/token", issue_token, methods=["POST"]),
        Route("/token", forget_token, methods=["DELETE"]),
        Route("/me", whoami, methods=["GET"]),
    ]
    return [
        *openapi.routes(),
        *dashboard.routes(),
        *metrics.routes(),
        Mount(f"{prefix}/training", routes=training),
        Mount(f"{prefix}/audit", routes=audit_routes()),
        Mount(
            f"{prefix}/admin",
            routes=[Route("/quotas", get_quotas, methods=["GET"]), Route("/quotas", put_quotas, methods=["PUT"])],
        ),
        Route(f"{prefix}/usage", usage, methods=["GET"]),
        Mount(f"{prefix}/auth", routes=auth),
    ]


def create_app(
    settings: Settings, bus: Bus, projection: Projection, swift_flags: SwiftFlags | None = None
) -> Starlette:
    auth = Auth(settings)
    health_path = f"{settings.api_prefix}/training/health"
    # (/metrics checks its caller itself: an admin's key, or one of the metrics role)
    open_paths = {health_path, "/docs", "/openapi.json", METRICS_PATH, *dashboard.OPEN_PATHS}
    open_prefixes = ("/docs/assets/", *dashboard.OPEN_PREFIXES)
    hosts = allowed_hosts(auth.enabled, settings.app_host, settings.allowed_hosts)
    app = Starlette(
        routes=routes(settings.api_prefix),
        middleware=[
            Middleware(Edges, hosts=hosts, origins=split_names(settings.allowed_origins), any_host=[health_path]),
            Middleware(AuthenticationMiddleware, backend=auth, on_error=unauthorized),
            Middleware(RequireAuth, open_paths=open_paths, open_prefixes=open_prefixes),
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            RedisError: redis_unavailable,
            Exception: server_error,
        },
    )
    app.state.settings = settings
    app.state.auth = auth
    app.state.bus = bus
    app.state.projection = projection
    projection.policy = settings.policy  # the estimates judge preemption and fair share as the scheduler does
    app.state.swift_flags = swift_flags or SwiftFlags(settings.data_dir)
    return app
