"""The queue routes: the queue in start order with why each job is where it is, a job's place,
priority changes, removal, and a forced scheduling pass.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from events import messages as m
from events.admission import gpu_quota_block, queue_order
from events.estimates import Estimate
from events.quotas import HOUR_S, user_key
from events.records import JobStatus
from services.gateway import views
from services.gateway.auth import may_see
from services.gateway.bodies import read_json
from services.gateway.context import actor, bus_of, fair_share, illegal, named_job, projection_of, send_command
from services.gateway.errors import ApiError
from services.gateway.projection import Projection


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _queue_entries(projection: Projection, fair_share: bool) -> list[dict[str, Any]]:
    """The queue in the order jobs start (with fair share, fair share's order), each entry with
    why it is where it is and what it waits for."""
    state = projection.state
    now = datetime.now(UTC)
    computed_at, estimates = projection.estimates(fresh=True)
    unknown = Estimate(None, "not estimated yet")
    entries = []
    submitted: dict[tuple[int, str | None], int] = {}  # how many of a level (and owner) came before
    decayed: dict[str, float] = {}
    for i, job in enumerate(queue_order(state, fair_share), start=1):
        level = (job.priority, job.owner if fair_share else None)
        submitted[level] = nth = submitted.get(level, 0) + 1
        if fair_share:
            if job.owner not in decayed:
                used = state.usage.get(user_key(job.owner))
                decayed[job.owner] = used.decayed(now, state.half_life_s) / HOUR_S if used else 0.0
            order = (
                f"priority {job.priority}; fair share: owner {job.owner} used {decayed[job.owner]:.1f} GPU-h"
                f" (decayed), submitted {_ordinal(nth)} of theirs"
            )
        else:
            order = f"priority {job.priority}, submitted {_ordinal(nth)}"
        blocked = gpu_quota_block(state, job)
        entries.append(
            {
                "position": i,
                "job_id": job.job_id,
                "name": job.spec.name,
                "priority": job.priority,
                "gpu_count": job.spec.gpu_count,
                "submitted_at": job.submitted_at.isoformat(),
                "submitted_by": job.submitted_by,
                "team": job.team,
                "order_reason": order,
                "waiting_reason": "quota" if blocked else "gpus",
                "waiting_message": blocked or "waiting for free GPUs",
                **estimates.get(job.job_id, unknown).view(computed_at, now),
            }
        )
    return entries


async def queue(request: Request) -> JSONResponse:
    """Queued jobs in start order; a user sees their own, with their places in the whole queue."""
    entries = [
        e for e in _queue_entries(projection_of(request), fair_share(request)) if may_see(request, e["submitted_by"])
    ]
    return JSONResponse({"queue": entries})


async def queue_status(request: Request) -> JSONResponse:
    job = named_job(request)
    entries = _queue_entries(projection_of(request), fair_share(request))
    entry = next((e for e in entries if e["job_id"] == job.job_id), None)
    return JSONResponse({"job_id": job.job_id, "status": job.status, "queued": entry is not None, **(entry or {})})


async def change_priority(request: Request) -> JSONResponse:
    job = named_job(request)
    body = await read_json(request)
    priority = body.get("priority") if isinstance(body, dict) else None
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 10:
        raise ApiError(
            422, "validation_error", "priority must be an integer 0-10", [{"field": "priority", "message": "0-10"}]
        )
    if not job.may_reprioritize:
        raise illegal(job, "change the priority of")
    return await send_command(
        request,
        m.SetPriority(job_id=job.job_id, priority=priority, actor=actor(request)),
        "priority change requested",
        job,
    )


async def remove_from_queue(request: Request) -> JSONResponse:
    job = named_job(request)
    if job.status not in (JobStatus.pending, JobStatus.queued):
        raise illegal(job, "remove from the queue")
    command = m.CancelJob(job_id=job.job_id, reason="removed from the queue", actor=actor(request))
    return await send_command(request, command, "removal requested", job)


async def process_queue(request: Request) -> JSONResponse:
    position = await bus_of(request).send(bus_of(request).keys.commands, m.ProcessQueue(actor=actor(request)))
    body = views.ProcessRequested(command_position=position, message="scheduling pass requested")
    return JSONResponse(body.model_dump(mode="json"), status_code=202)
