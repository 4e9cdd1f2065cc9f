"""The gateway's HTTP surface: REST under ``{API_PREFIX}/training`` and live SSE streams.

Handlers parse, call one function, render. Reads come from the projection; writes append a command
and, for a submit or a new quota table, wait briefly for the scheduler's decision. Besides:
``{API_PREFIX}/admin/quotas`` (admins) and ``{API_PREFIX}/usage``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from pydantic import TypeAdapter, ValidationError
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from events import audit
from events import messages as m
from events.admission import gpu_quota_block, queue_order, queued_quota_block
from events.bus import Bus, entry_id_key, previous_id
from events.codec import DecodeError, entry_type, envelope_json
from events.dependencies import names, verdict
from events.estimates import Estimate
from events.params import JobSpec, TaskType
from events.quotas import EVERYONE, HOUR_S, Quotas, Usage, team_key, user_key
from events.state import HOLDS_GPUS, TERMINAL, Job, JobStatus, State
from services.config import Settings
from services.gateway import catalog, dashboard, metrics, openapi, sweeps, views
from services.gateway import gpus as gpu_views
from services.gateway.auth import (
    METRICS_PATH,
    Auth,
    RequireAuth,
    forget_token,
    issue_token,
    may_see,
    principal,
    require_admin,
    unauthorized,
    whoami,
)
from services.gateway.bodies import read_json, submitted
from services.gateway.edges import Edges, allowed_hosts, split_names
from services.gateway.errors import (
    ApiError,
    api_error,
    http_error,
    redis_unavailable,
    server_error,
    validation_details,
)
from services.gateway.history import audit_routes, job_routes
from services.gateway.projection import Projection
from services.gateway.submit import SwiftFlags, dry_run_launch

log = structlog.get_logger("gateway")

SSE_PING_S = 15
SSE_RETRY_MS = 2000
CUT_OFF_GRACE_S = 5.0  # how long a client cut off for falling behind keeps its connection
GPU_STREAM_MIN_S = 0.5

_SPEC = TypeAdapter(JobSpec)


# ---------------------------------------------------------------------------------------------
# Rendering


def job_view(job: Job, state: State, positions: dict[str, int] | None = None) -> dict[str, Any]:
    view = job.model_dump(mode="json")
    view["task_type"] = job.spec.task_type
    view["suspendable"], view["resumable"] = job.may_suspend, job.may_resume
    view["waiting_on"] = verdict(state, job.spec).waiting_on if job.status == JobStatus.waiting else []
    if positions is None:
        view["queue_position"] = state.queue_position(job.job_id)
    else:
        view["queue_position"] = positions.get(job.job_id)
    return view


def _job(request: Request) -> Job:
    """The job a route names. A job that never was, another user's, and a deleted one answer
    alike: the answer must not tell which ids exist. (An admin reads a deleted job's history at
    /jobs/{id}/timeline.)"""
    job = _projection(request).job(request.path_params["job_id"])
    if job is None or not may_see(request, job.submitted_by):
        raise ApiError(404, "job_not_found", f"no job {request.path_params['job_id']!r}")
    return job


def _actor(request: Request) -> str:
    return principal(request).name


def _fair_share(request: Request) -> bool:
    return bool(request.app.state.settings.fair_share)


def _projection(request: Request) -> Projection:
    return request.app.state.projection  # type: ignore[no-any-return]


def _bus(request: Request) -> Bus:
    return request.app.state.bus  # type: ignore[no-any-return]


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
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


# ---------------------------------------------------------------------------------------------
# Validation of a submit


# ---------------------------------------------------------------------------------------------
# Routes


async def create_job(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    projection = _projection(request)
    submission = await submitted(request, await read_json(request))
    if submission.dry_run:
        launch = dry_run_launch(
            submission.spec, runs_dir=settings.runs_dir, omp_num_threads=settings.job_omp_num_threads
        )
        ranks = _planned_ranks(submission.spec, "<job_id>", settings)
        return JSONResponse(
            {
                "dry_run": True,
                **command_view(launch.argv, launch.env),
                "ranks": [r.model_dump(mode="json") for r in ranks],
            }
        )
    who = principal(request)
    over = queued_quota_block(projection.state, who.name, who.team)
    if over is not None:
        raise _over_quota(over)
    command = m.SubmitJob(job_id=m.new_id(), spec=submission.spec, actor=who.name, team=who.team)
    position = await _bus(request).send(_bus(request).keys.commands, command)
    job_id = command.job_id or ""

    await projection.wait_decided(job_id, settings.submit_wait_s)
    job = projection.job(job_id)
    if job is not None and job.status == JobStatus.failed and job.reason == "quota":
        # Submissions racing past the check above: the scheduler counted them, in log order.
        raise _over_quota(job.message or "over the limit of jobs waiting", job_id)
    body = {
        "job_id": job_id,
        "status": job.status if job else JobStatus.pending,
        "queue_position": _decided_position(job),
        "estimated_wait_time": _wait(projection, job_id),
        "command_position": position,
        "message": _submit_message(job),
    }
    return JSONResponse(body, status_code=202, headers={"Location": f"{request.url.path.rstrip('/')}/{job_id}"})


def _over_quota(why: str, job_id: str | None = None) -> ApiError:
    rejected = f" (job {job_id} was rejected)" if job_id else ""
    return ApiError(
        429,
        "quota_exceeded",
        f"over quota: {why}{rejected}",
        [{"field": "queued", "message": why}],
    )


def command_view(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    return views.CommandLine(argv=argv, env=env, shell=shlex.join(argv)).model_dump(mode="json")


async def job_command(request: Request) -> JSONResponse:
    """The exact command of a job: as started, or as it will be started."""
    job = _job(request)
    settings: Settings = request.app.state.settings
    if job.argv:
        argv, env = job.argv, job.env
        ranks = [
            views.RankCommand(rank=0, node=job.node, argv=argv, env=env, shell=shlex.join(argv)),
            *(
                views.RankCommand(rank=p.rank, node=p.node, argv=p.argv, env=p.env, shell=shlex.join(p.argv))
                for p in job.peer_commands
            ),
        ]
        ranks = ranks if job.spec.nodes > 1 else []
    else:
        launch = dry_run_launch(job.spec, job.job_id, settings.runs_dir, settings.job_omp_num_threads)
        argv, env = launch.argv, launch.env
        ranks = _planned_ranks(job.spec, job.job_id, settings)
    body = views.JobCommand(
        job_id=job.job_id, started=bool(job.argv), argv=argv, env=env, shell=shlex.join(argv), ranks=ranks
    )
    return JSONResponse(body.model_dump(mode="json"))


def _planned_ranks(spec: JobSpec, job_id: str, settings: Settings) -> list[views.RankCommand]:
    """Each rank's command of a gang job as it will start (none for a job on one node)."""
    ranks = []
    for rank in range(spec.nodes if spec.nodes > 1 else 0):
        launch = dry_run_launch(spec, job_id, settings.runs_dir, settings.job_omp_num_threads, rank=rank)
        ranks.append(views.RankCommand(rank=rank, argv=launch.argv, env=launch.env, shell=shlex.join(launch.argv)))
    return ranks


def _decided_position(job: Job | None) -> int | None:
    """A job's place in the queue as the scheduler decided it. Not its place when the answer is
    written: the projection may by then have folded later events too (the job ahead starting, or
    cancelled in the same read of commands), and a second job would be told it is first as well."""
    return job.queue_position_at_submit if job is not None and job.status == JobStatus.queued else None


def _wait(projection: Projection, job_id: str) -> float | None:
    """Seconds until a queued job is expected to start (None when unknown or not queued)."""
    computed_at, estimates = projection.estimates()
    estimate = estimates.get(job_id)
    if estimate is None:
        return None
    wait = estimate.view(computed_at, datetime.now(UTC))["estimated_wait_s"]
    return wait if isinstance(wait, float) else None


def _submit_message(job: Job | None) -> str:
    if job is None or job.status == JobStatus.pending:
        return "accepted; the scheduler has not decided yet"
    if job.status == JobStatus.failed:
        return f"rejected: {job.message}"
    if job.status == JobStatus.queued:
        return "queued: waiting for free GPUs"
    if job.status == JobStatus.held:
        return "held: POST /jobs/{id}/start queues it"
    if job.status == JobStatus.waiting:
        return "waiting for the jobs it depends on to end"
    return f"{job.status} on {job.node} GPUs {job.gpu_ids}"


def _choice(request: Request, name: str, allowed: set[str]) -> str | None:
    value = request.query_params.get(name)
    if value is not None and value not in allowed:
        raise ApiError(
            400, "bad_parameter", f"unknown {name} {value!r}", [{"field": name, "message": f"one of {sorted(allowed)}"}]
        )
    return value


async def list_jobs(request: Request) -> JSONResponse:
    """Jobs newest first, filtered by status, task type, priority, owner and the job they depend
    on; paged by ``page`` and ``size``, or by ``cursor`` (the ``next_cursor`` of the previous page)."""
    projection = _projection(request)
    state = projection.state
    status = _choice(request, "status", set(JobStatus.__members__))
    task_type = _choice(request, "task_type", set(TaskType.__members__))
    priority = _int_param(request, "priority", -1, 0, 10) if "priority" in request.query_params else None
    owner = request.query_params.get("owner")
    needs = request.query_params.get("depends_on")
    sweep = request.query_params.get("sweep_id")
    page = _int_param(request, "page", 1, 1, 1_000_000)
    size = _int_param(request, "size", 50, 1, 500)
    everything = [*state.jobs.values(), *filter(None, map(projection.job, list(projection.pending)))]
    jobs = [
        job
        for job in everything
        if (status is None or job.status == status)
        and (task_type is None or job.spec.task_type == task_type)
        and (priority is None or job.priority == priority)
        and (owner is None or job.submitted_by == owner)
        and (needs is None or names(job.spec, needs))
        and (sweep is None or job.sweep_id == sweep)
        and may_see(request, job.submitted_by)
    ]
    jobs.sort(key=lambda job: (job.submitted_at, job.job_id), reverse=True)
    cursor = request.query_params.get("cursor")
    if cursor is not None:
        ids = [job.job_id for job in jobs]
        if cursor not in ids:
            raise ApiError(
                400, "bad_parameter", "cursor is not a job of this listing", [{"field": "cursor", "message": "unknown"}]
            )
        start = ids.index(cursor) + 1
    else:
        start = (page - 1) * size
    chunk = jobs[start : start + size]
    positions = {job.job_id: i for i, job in enumerate(state.queue(), start=1)}
    more = start + size < len(jobs)
    return JSONResponse(
        {
            "jobs": [job_view(job, state, positions) for job in chunk],
            "total": len(jobs),
            "page": page,
            "size": size,
            "next_cursor": chunk[-1].job_id if more and chunk else None,
        }
    )


async def get_job(request: Request) -> JSONResponse:
    return JSONResponse(job_view(_job(request), _projection(request).state))


async def job_progress(request: Request) -> JSONResponse:
    job = _job(request)
    progress = job.progress.model_dump() if job.progress else None
    body = views.JobProgress(job_id=job.job_id, status=job.status, progress=progress)
    return JSONResponse(body.model_dump(mode="json"))


async def job_logs(request: Request) -> JSONResponse:
    job = _job(request)
    tail = _int_param(request, "tail", 200, 1, 10_000)
    rank = _int_param(request, "rank", 0, 0, job.spec.nodes - 1)  # a gang job's ranks each keep theirs
    bus = _bus(request)
    entries = await bus.redis.xrevrange(bus.keys.logs(job.job_id, rank), count=tail)
    lines = [{"entry_id": str(i), "fd": f.get("fd"), "line": f.get("line")} for i, f in reversed(entries)]
    return JSONResponse({"job_id": job.job_id, "rank": rank, "lines": lines})


async def cancel_job(request: Request) -> JSONResponse:
    job = _job(request)
    if job.status in TERMINAL:
        raise ApiError(
            409,
            "illegal_state",
            f"job {job.job_id} is already {job.status}",
            [{"field": "status", "message": job.status}],
        )
    return await _command(request, m.CancelJob(job_id=job.job_id, actor=_actor(request)), "cancel requested", job)


async def start_job(request: Request) -> JSONResponse:
    """Release a job submitted with ``hold``: it joins the queue by its priority and submit order."""
    job = _job(request)
    if job.status != JobStatus.held:
        raise _illegal(job, "start")
    return await _command(request, m.ReleaseJob(job_id=job.job_id, actor=_actor(request)), "released to the queue", job)


async def suspend_job(request: Request) -> JSONResponse:
    """Stop a running training job with a checkpoint, free its GPUs, and hold it until resumed."""
    job = _job(request)
    if not job.may_suspend:
        if job.spec.task_type == TaskType.deploy:
            raise ApiError(
                409,
                "illegal_state",
                f"cannot suspend job {job.job_id}: a deploy job is not suspended (it is {job.status})",
                [{"field": "status", "message": job.status}],
            )
        raise _illegal(job, "suspend", "only a running training job can be" if job.status != JobStatus.running else "")
    return await _command(request, m.SuspendJob(job_id=job.job_id, actor=_actor(request)), "suspend requested", job)


async def resume_job(request: Request) -> JSONResponse:
    """Queue a suspended job again in its original place (its priority and submit order)."""
    job = _job(request)
    if not job.may_resume:
        raise _illegal(job, "resume", "only a suspended job can be")
    return await _command(request, m.ResumeJob(job_id=job.job_id, actor=_actor(request)), "resume requested", job)


async def export_job(request: Request) -> JSONResponse:
    job = _job(request)
    if job.status != JobStatus.completed or not job.is_lora or not job.last_checkpoint:
        raise ApiError(
            409,
            "illegal_state",
            "only a completed LoRA job with a checkpoint can be exported",
            [{"field": "status", "message": job.status}],
        )
    return await _command(request, m.RequestExport(job_id=job.job_id, actor=_actor(request)), "export requested", job)


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
        e for e in _queue_entries(_projection(request), _fair_share(request)) if may_see(request, e["submitted_by"])
    ]
    return JSONResponse({"queue": entries})


async def queue_status(request: Request) -> JSONResponse:
    job = _job(request)
    entries = _queue_entries(_projection(request), _fair_share(request))
    entry = next((e for e in entries if e["job_id"] == job.job_id), None)
    return JSONResponse({"job_id": job.job_id, "status": job.status, "queued": entry is not None, **(entry or {})})


def _illegal(job: Job, action: str, only: str = "") -> ApiError:
    why = f"it is {job.status}"
    if job.cancel_requested and job.status not in TERMINAL:
        why += ", and being cancelled"
    return ApiError(
        409,
        "illegal_state",
        f"cannot {action} job {job.job_id}: {why}" + (f" ({only})" if only else ""),
        [{"field": "status", "message": job.status}],
    )


async def _command(request: Request, command: m.Command, message: str, job: Job) -> JSONResponse:
    position = await _bus(request).send(_bus(request).keys.commands, command)
    body = views.CommandAccepted(job_id=job.job_id, status=job.status, command_position=position, message=message)
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


async def change_priority(request: Request) -> JSONResponse:
    job = _job(request)
    body = await read_json(request)
    priority = body.get("priority") if isinstance(body, dict) else None
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 10:
        raise ApiError(
            422, "validation_error", "priority must be an integer 0-10", [{"field": "priority", "message": "0-10"}]
        )
    if job.status != JobStatus.queued:
        raise _illegal(job, "change the priority of")
    return await _command(
        request,
        m.SetPriority(job_id=job.job_id, priority=priority, actor=_actor(request)),
        "priority change requested",
        job,
    )


async def remove_from_queue(request: Request) -> JSONResponse:
    job = _job(request)
    if job.status not in (JobStatus.pending, JobStatus.queued):
        raise _illegal(job, "remove from the queue")
    command = m.CancelJob(job_id=job.job_id, reason="removed from the queue", actor=_actor(request))
    return await _command(request, command, "removal requested", job)


async def delete_job(request: Request) -> JSONResponse:
    job = _job(request)
    if job.status not in TERMINAL or job.export.status in ("pending", "running"):
        raise _illegal(job, "delete")
    return await _command(request, m.DeleteJob(job_id=job.job_id, actor=_actor(request)), "deletion requested", job)


async def process_queue(request: Request) -> JSONResponse:
    position = await _bus(request).send(_bus(request).keys.commands, m.ProcessQueue(actor=_actor(request)))
    body = views.ProcessRequested(command_position=position, message="scheduling pass requested")
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


# ---------------------------------------------------------------------------------------------
# Sharing the pool: quotas and usage

DAY_S, WEEK_S = 24 * 3600, 7 * 24 * 3600


def _quota_table(request: Request) -> dict[str, Any]:
    state = _projection(request).state
    auth: Auth = request.app.state.auth
    return {
        "quotas": state.quotas.model_dump(mode="json"),
        "from_config": state.config_quotas is not None and state.quotas == state.config_quotas,
        "known_users": sorted(auth.users),
        "known_teams": sorted(auth.teams),
    }


async def get_quotas(request: Request) -> JSONResponse:
    """The quota table in force, and whether the QUOTAS setting gave it. Admins only."""
    require_admin(request)
    return JSONResponse(_quota_table(request))


def parse_quotas(body: Any, users: set[str], teams: set[str]) -> Quotas:
    """A quota table as an admin sent it; 422 naming each field at fault, and each user or team
    no API key names (a limit for a name no one acts as would never apply)."""
    try:
        quotas = Quotas.model_validate(body)
    except ValidationError as exc:
        details = validation_details(exc)
        fields = ", ".join(dict.fromkeys(d["field"] for d in details))
        raise ApiError(422, "validation_error", f"invalid quotas: {fields}", details) from exc
    unknown = [
        {"field": f"users.{name}", "message": f"no API key has the name {name!r}"}
        for name in quotas.users
        if name != EVERYONE and name not in users
    ]
    unknown += [
        {"field": f"teams.{name}", "message": f"no API key names team {name!r}"}
        for name in quotas.teams
        if name not in teams
    ]
    if unknown:
        names = ", ".join(d["field"] for d in unknown)
        raise ApiError(422, "validation_error", f"unknown users or teams: {names}", unknown)
    return quotas


async def put_quotas(request: Request) -> JSONResponse:
    """Replace the quota table (a quotas.set command with its actor), and answer once it is in
    force: 200, or 202 when the scheduler has not decided within the submit wait."""
    require_admin(request)
    auth: Auth = request.app.state.auth
    quotas = parse_quotas(await read_json(request), auth.users, auth.teams)
    projection = _projection(request)
    position = await _bus(request).send(_bus(request).keys.commands, m.SetQuotas(quotas=quotas, actor=_actor(request)))
    settings: Settings = request.app.state.settings
    applied = await projection.wait_until(lambda: projection.state.quotas == quotas, settings.submit_wait_s)
    body = {**_quota_table(request), "applied": applied, "command_position": position}
    return JSONResponse(body, status_code=200 if applied else 202)


def _held_now(state: State, now: datetime) -> tuple[dict[str, int], dict[str, float]]:
    """Per ``user:``/``team:`` key: the GPUs its jobs hold (borrowing ones too), and the
    GPU-seconds they have held since the log last credited them (it does so at a job's facts)."""
    in_use: dict[str, int] = {}
    uncredited: dict[str, float] = {}
    for job in state.jobs.values():
        if job.status not in HOLDS_GPUS:
            continue
        since = max(0.0, (now - job.usage_mark).total_seconds()) if job.usage_mark else 0.0
        for key in [user_key(job.owner)] + ([team_key(job.team)] if job.team else []):
            in_use[key] = in_use.get(key, 0) + len(job.gpu_ids)
            uncredited[key] = uncredited.get(key, 0.0) + since * len(job.gpu_ids)
    return in_use, uncredited


def _usage_rows(
    state: State, now: datetime, kind: str, names: set[str], held: tuple[dict[str, int], dict[str, float]]
) -> list[dict[str, Any]]:
    """A row for each user (``kind`` user) or team, its usage counted up to now."""
    in_use, uncredited = held
    rows = []
    for name in sorted(names):
        key = user_key(name) if kind == "user" else team_key(name)
        used = state.usage[key].copy() if key in state.usage else Usage()
        used.add(uncredited.get(key, 0.0), now, state.half_life_s)
        limit = state.quotas.user(name) if kind == "user" else state.quotas.team(name)
        rows.append(
            {
                "name": name,
                "gpus_in_use": in_use.get(key, 0),
                "gpus_within_quota": state.holding(key),
                "jobs_waiting": state.waiting(key),
                "gpu_hours_day": round(used.within(now, DAY_S) / HOUR_S, 4),
                "gpu_hours_week": round(used.within(now, WEEK_S) / HOUR_S, 4),
                "decayed_gpu_hours": round(used.decayed(now, state.half_life_s) / HOUR_S, 4),
                "limit": limit.model_dump(mode="json") if limit is not None else None,
            }
        )
    return rows


async def usage(request: Request) -> JSONResponse:
    """GPU usage and limits per user and team: a user's own row and their team's; an admin's, every
    user and team the keys name or the log has seen."""
    state = _projection(request).state
    who = principal(request)
    auth: Auth = request.app.state.auth
    if who.is_admin:
        users = auth.users | {job.owner for job in state.jobs.values()}
        teams = auth.teams | {job.team for job in state.jobs.values() if job.team is not None}
        users |= {key.removeprefix("user:") for key in state.usage if key.startswith("user:")}
        teams |= {key.removeprefix("team:") for key in state.usage if key.startswith("team:")}
    else:
        users, teams = {who.name}, {who.team} if who.team else set()
    now = datetime.now(UTC)
    held = _held_now(state, now)
    settings: Settings = request.app.state.settings
    body = {
        "at": now.isoformat(),
        "fair_share": settings.fair_share,
        "half_life_s": state.half_life_s,
        "users": _usage_rows(state, now, "user", users, held),
        "teams": _usage_rows(state, now, "team", teams, held),
    }
    return JSONResponse(body)


def gpus_view(projection: Projection, now: datetime | None = None) -> dict[str, Any]:
    """Nodes and their GPUs, as the last heartbeats saw them, and the job that holds each; a
    summary per node and the cluster's."""
    return gpu_views.gpus_view(
        projection.state,
        projection.heartbeats,
        now or datetime.now(UTC),
        projection.heartbeat_timeout_s,
        projection.foreign_memory_threshold_mb,
    )


async def gpus(request: Request) -> JSONResponse:
    return JSONResponse(gpus_view(_projection(request)))


async def gpus_stream(request: Request) -> EventSourceResponse:
    """The GPUs view, live: sent at once, then whenever a heartbeat or an allocation changes it
    (at most every GPU_STREAM_MIN_S)."""
    return _sse(lambda cut: _gpu_views(_projection(request)))


def _moved_on(projection: Projection) -> Callable[[], bool]:
    """Whether a heartbeat or an event has been read since now."""
    positions = (projection.telemetry_position, projection.state.position)
    return lambda: (projection.telemetry_position, projection.state.position) != positions


async def _gpu_views(projection: Projection) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(retry=SSE_RETRY_MS, comment="stream open")
    sent = None
    while True:
        now = datetime.now(UTC)
        seen = gpu_views.inputs(projection.state, projection.heartbeats, now, projection.heartbeat_timeout_s)
        if seen != sent:  # (a job's progress moves the log, not the GPUs: nothing to send)
            sent = seen
            view = json.dumps(gpus_view(projection, now), separators=(",", ":"))
            yield ServerSentEvent(data=view, event="gpus")
        await projection.wait_until(_moved_on(projection), SSE_PING_S)
        await anyio.sleep(GPU_STREAM_MIN_S)  # heartbeats of many nodes: one update for a burst of them


# The notifier is not among them: without webhooks the system does all it must without it.
REQUIRED_SERVICES = ("gateway", "scheduler", "gpu-monitor", "runner", "exporter")


async def health(request: Request) -> JSONResponse:
    projection = _projection(request)
    try:
        with anyio.fail_after(2):
            await _bus(request).redis.ping()
        redis_ok = True
    except (RedisError, TimeoutError, OSError):
        redis_ok = False
    alive = projection.live_services()
    missing = [s for s in REQUIRED_SERVICES if s not in alive and s != "gateway"]
    ok = redis_ok and not missing and projection.ready.is_set()
    view = views.Health if ok else views.Degraded
    body = view(
        status="ok" if ok else "degraded",
        redis=redis_ok,
        services=alive,
        missing=missing,
        log_position=projection.state.position,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


_ENTRY_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


def is_entry_id(text: str) -> bool:
    """A Redis stream entry id, ``<ms>-<seq>``, each part a 64-bit unsigned integer."""
    found = _ENTRY_ID.match(text)
    return found is not None and all(int(part) < 2**64 for part in found.groups())


def _resume_from(request: Request) -> str | None:
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("since")
    if last_event_id is not None and not is_entry_id(last_event_id):
        raise ApiError(
            400,
            "bad_parameter",
            "Last-Event-ID is not a stream entry id",
            [{"field": "Last-Event-ID", "message": "expected <ms>-<seq>"}],
        )
    return last_event_id


class LiveResponse(EventSourceResponse):
    """A live stream that is dropped soon after its client fell too far behind, even while a
    write to it is stuck on a client that stopped reading. (Cheaper than a timeout around every
    write, which counts at thousands of clients.)"""

    def __init__(self, events: AsyncIterator[ServerSentEvent], cut: asyncio.Event) -> None:
        super().__init__(events, ping=SSE_PING_S, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.cut = cut

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def drop_when_cut() -> None:
                await self.cut.wait()
                await anyio.sleep(CUT_OFF_GRACE_S)  # a slow reader gets the rest and the reason
                log.info("live stream dropped: the client fell too far behind", path=scope.get("path"))
                tg.cancel_scope.cancel()

            tg.start_soon(drop_when_cut)
            await super().__call__(scope, receive, send)
            tg.cancel_scope.cancel()


def _sse(make: Callable[[asyncio.Event], AsyncIterator[ServerSentEvent]]) -> LiveResponse:
    cut = asyncio.Event()
    return LiveResponse(make(cut), cut)


async def job_stream(request: Request) -> EventSourceResponse:
    job = _job(request)
    after = _resume_from(request) or previous_id(job.first_entry_id)
    return _sse(lambda cut: _events(request, after, job.job_id, lambda job_id, _: job_id == job.job_id, cut))


async def job_log_stream(request: Request) -> EventSourceResponse:
    """A job's output lines: the last ``tail`` (default 200), or those after ``Last-Event-ID``,
    then live as the job writes them."""
    job = _job(request)
    resume = _resume_from(request)
    tail = _int_param(request, "tail", 200, 0, 10_000)
    rank = _int_param(request, "rank", 0, 0, job.spec.nodes - 1)
    return _sse(lambda cut: _log_lines(request, job.job_id, resume, tail, cut, rank))


async def _log_lines(
    request: Request, job_id: str, resume: str | None, tail: int, cut: asyncio.Event, rank: int = 0
) -> AsyncIterator[ServerSentEvent]:
    projection = _projection(request)
    bus = _bus(request)
    key = bus.keys.logs(job_id, rank)
    yield ServerSentEvent(retry=SSE_RETRY_MS, comment="stream open")
    if resume is not None:
        history = [(entry.entry_id, entry.fields) async for entry in bus.entries(key, after=resume)]
        last = resume
    else:
        newest = await bus.redis.xrevrange(key, count=max(tail, 1))
        history = list(reversed(newest))[-tail:] if tail else []
        last = str(newest[0][0]) if newest else "0-0"
    for entry_id, fields in history:
        last = str(entry_id)
        line = json.dumps({"fd": fields.get("fd"), "line": fields.get("line")})
        yield ServerSentEvent(data=line, event="log", id=last)
    # The shared reader reads on from the last line sent: nothing is missed in between.
    # (followed by the name its stream has after the prefix of every job's: a rank's own)
    subscription = projection.subscribe_logs(key.removeprefix(bus.keys.logs("")), last, cut)
    try:
        async for event in subscription:
            if entry_id_key(event.entry_id) > entry_id_key(last):
                yield ServerSentEvent(data=event.data, event="log", id=event.entry_id)
        if subscription.overflowed:
            yield ServerSentEvent(event="overflow", data='{"reason":"client too slow"}')
    finally:
        projection.unsubscribe_logs(subscription)


async def events_stream(request: Request) -> EventSourceResponse:
    """Every event of the log, live (from now, or after ``Last-Event-ID``/``since``), filtered by
    ``job_id`` and ``type`` (repeatable; ``job.*`` for a prefix). A user gets the events of their
    own jobs and those of no job (nodes joining or lost)."""
    query = audit.Query(job_id=request.query_params.get("job_id"), types=tuple(request.query_params.getlist("type")))
    state = _projection(request).state

    def wanted(job_id: str, type_: str) -> bool:
        if query.job_id is not None and job_id != query.job_id:
            return False
        if not audit.type_matches(query.types, type_):
            return False
        job = state.jobs.get(job_id)
        return not job_id or may_see(request, job.submitted_by if job else None)

    return _sse(lambda cut: _events(request, _resume_from(request) or state.position, query.job_id, wanted, cut))


async def _events(
    request: Request, after: str, job_id: str | None, wanted: Callable[[str, str], bool], cut: asyncio.Event
) -> AsyncIterator[ServerSentEvent]:
    """History after ``after`` from Redis, then live events from the shared reader, without a gap
    or a repeat: subscribe first, read history, then skip live events the history covered."""
    projection = _projection(request)
    bus = _bus(request)
    subscription = projection.subscribe(job_id, cut)  # only this job's events, or all of them
    try:
        yield ServerSentEvent(retry=SSE_RETRY_MS, comment="stream open")
        last = after
        async for entry in bus.entries(bus.keys.events, after=after):
            last = entry.entry_id
            type_ = entry_type(entry.fields)  # (a compact entry may name it by its code)
            if wanted(entry.fields.get("job_id", ""), type_):
                try:
                    data = envelope_json(entry.fields)  # what clients are sent, whatever the entry's layout
                except DecodeError:
                    continue  # (the fold passed over it too)
                yield ServerSentEvent(data=data, event=type_, id=entry.entry_id)
        async for event in subscription:
            if entry_id_key(event.entry_id) <= entry_id_key(last) or not wanted(event.job_id, event.type):
                continue
            yield ServerSentEvent(data=event.data, event=event.type, id=event.entry_id)
        if subscription.overflowed:
            yield ServerSentEvent(event="overflow", data='{"reason":"client too slow"}')
    finally:
        projection.unsubscribe(subscription)


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
