"""What a handler takes from its request: the job a route names, the caller, the bus and the
projection, query parameters; and a command sent on the caller's behalf.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from events import messages as m
from events.bus import Bus
from events.records import TERMINAL, Job
from services.gateway import views
from services.gateway.auth import may_see, principal
from services.gateway.errors import ApiError
from services.gateway.projection import Projection


def named_job(request: Request) -> Job:
    """The job a route names. A job that never was, another user's, and a deleted one answer
    alike: the answer must not tell which ids exist. (An admin reads a deleted job's history at
    /jobs/{id}/timeline.)"""
    job = projection_of(request).job(request.path_params["job_id"])
    if job is None or not may_see(request, job.submitted_by):
        raise ApiError(404, "job_not_found", f"no job {request.path_params['job_id']!r}")
    return job


def actor(request: Request) -> str:
    return principal(request).name


def fair_share(request: Request) -> bool:
    return bool(request.app.state.settings.fair_share)


def projection_of(request: Request) -> Projection:
    projection: Projection = request.app.state.projection
    return projection


def bus_of(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, "bad_parameter", f"{name} must be an integer", [{"field": name, "message": "not an integer"}]
        ) from None
    if not low <= value <= high:
        raise ApiError(
            400,
            "bad_parameter",
            f"{name} must be between {low} and {high}",
            [{"field": name, "message": "out of range"}],
        )
    return value


def choice(request: Request, name: str, allowed: set[str]) -> str | None:
    value = request.query_params.get(name)
    if value is not None and value not in allowed:
        raise ApiError(
            400, "bad_parameter", f"unknown {name} {value!r}", [{"field": name, "message": f"one of {sorted(allowed)}"}]
        )
    return value


def illegal(job: Job, action: str, only: str = "") -> ApiError:
    why = f"it is {job.status}"
    if job.cancel_requested and job.status not in TERMINAL:
        why += ", and being cancelled"
    return ApiError(
        409,
        "illegal_state",
        f"cannot {action} job {job.job_id}: {why}" + (f" ({only})" if only else ""),
        [{"field": "status", "message": job.status}],
    )


async def send_command(request: Request, command: m.Command, message: str, job: Job) -> JSONResponse:
    position = await bus_of(request).send(bus_of(request).keys.commands, command)
    body = views.CommandAccepted(job_id=job.job_id, status=job.status, command_position=position, message=message)
    return JSONResponse(body.model_dump(mode="json"), status_code=202)
