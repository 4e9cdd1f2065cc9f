"""What the system offers and how it is doing: task types and their defaults, bulk deletion of
finished jobs, the scheduler's leadership, and the state of nodes, Redis and the consumers."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel
from redis.exceptions import ResponseError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from events import messages as m
from events.bus import Bus
from events.keys import EXPORTER_GROUP, RUNNER_GROUP, SCHEDULER_GROUP
from events.params import (
    DeployJob,
    DeployParams,
    LanguageModelJob,
    LanguageModelTrainParams,
    MultiModalJob,
    MultiModalTrainParams,
    TaskType,
)
from events.records import TERMINAL, ExportStatus, JobStatus
from events.state import State
from services.gateway import views
from services.gateway.auth import may_see, principal
from services.gateway.context import bus_of, projection_of
from services.gateway.errors import ApiError

_TYPES: dict[TaskType, tuple[type[BaseModel], str, type[BaseModel], str]] = {
    TaskType.multimodal: (MultiModalJob, "train_params", MultiModalTrainParams, "swift sft on a vision-language model"),
    TaskType.language_model: (
        LanguageModelJob,
        "train_params",
        LanguageModelTrainParams,
        "swift sft on a language model",
    ),
    TaskType.deploy: (DeployJob, "deploy_params", DeployParams, "swift deploy: an OpenAI-compatible server"),
}
_JOB_DEFAULTS = ("priority", "gpu_count", "max_retries", "auto_export")


async def supported_types(request: Request) -> JSONResponse:
    types = [
        views.TaskTypeInfo(task_type=task_type, runs=runs, params_field=field)  # type: ignore[arg-type]
        for task_type, (_, field, _, runs) in _TYPES.items()
    ]
    return JSONResponse(views.SupportedTypes(task_types=types, default=TaskType.multimodal).model_dump(mode="json"))


async def default_params(request: Request) -> JSONResponse:
    """The defaults a job of a task type gets for what it leaves out."""
    raw = request.query_params.get("task_type", TaskType.multimodal.value)
    if raw not in TaskType.__members__:
        raise ApiError(
            400,
            "bad_parameter",
            f"unknown task_type {raw!r}",
            [{"field": "task_type", "message": f"one of {', '.join(TaskType.__members__)}"}],
        )
    job, field, params, _ = _TYPES[TaskType(raw)]
    defaults = {name: info.default for name, info in job.model_fields.items() if name in _JOB_DEFAULTS}
    body = views.DefaultParams.model_validate({"task_type": raw, **defaults, field: params().model_dump()})
    return JSONResponse(body.model_dump(mode="json"))


async def delete_finished(request: Request) -> JSONResponse:
    """Delete every finished job the caller may act on (never a running one, nor one whose
    export is under way); each deletion is a command in the log, as one at a time would be."""
    state = projection_of(request).state
    who = principal(request)
    finished = [
        job
        for job in state.jobs.values()
        if job.status in TERMINAL
        and job.export.status not in (ExportStatus.pending, ExportStatus.running)
        and may_see(request, job.submitted_by)
    ]
    bus = bus_of(request)
    commands = [m.DeleteJob(job_id=job.job_id, actor=who.name) for job in finished]
    if commands:
        await bus.append(bus.keys.commands, *commands)
    body = views.DeletedFinished(deleted=[job.job_id for job in finished], count=len(finished))
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


async def processor_status(request: Request) -> JSONResponse:
    """Which scheduler leads, and whether its lease is alive."""
    bus = bus_of(request)
    async with bus.redis.pipeline(transaction=False) as pipe:
        pipe.get(bus.keys.leader)
        pipe.pttl(bus.keys.leader)
        pipe.get(bus.keys.fence)
        leader, ttl_ms, fence = await pipe.execute()
    alive = projection_of(request).live_services().get("scheduler", [])
    body = views.ProcessorStatus(
        running=leader is not None and ttl_ms > 0,
        leader=leader,
        lease_ms_left=max(int(ttl_ms), 0),
        fencing_token=int(fence) if fence else None,
        schedulers=sorted(alive),
    )
    return JSONResponse(body.model_dump(mode="json"))


# Entries after an id, counted inside Redis (nothing travels but the count), at most ARGV[2] of
# them on either side of it: the entries after it, else the stream's length less those up to it.
# nil when both sides are longer than that, rather than holding Redis up to count them.
_LAG_LUA = """
local function count(first, last, cap)
  local n = 0
  while n < cap do
    local page = redis.call('XRANGE', KEYS[1], first, last, 'COUNT', math.min(1000, cap - n))
    if #page == 0 then break end
    n = n + #page
    first = '(' .. page[#page][1]
  end
  return n
end
local cap = tonumber(ARGV[2])
local after = count('(' .. ARGV[1], '+', cap)
if after < cap then return after end
local upto = count('-', ARGV[1], cap)
if upto < cap then return redis.call('XLEN', KEYS[1]) - upto end
return false
"""
LAG_COUNT_MAX = 10_000


async def group_lag(bus: Bus, stream: str, last_delivered_id: str, cap: int = LAG_COUNT_MAX) -> int | None:
    """How many entries of a stream a consumer group has yet to be delivered, for a Redis that
    does not say (XINFO GROUPS reports ``lag`` from Redis 7.0 on, and even then not after some
    deletions)."""
    counted = await bus.redis.eval(_LAG_LUA, 1, stream, last_delivered_id, cap)
    return None if counted is None else int(counted)


async def _groups(bus: Bus, stream: str) -> list[dict[str, Any]]:
    try:
        groups = await bus.redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return []
    return [
        {
            "stream": stream,
            "group": g["name"],
            "consumers": g["consumers"],
            "pending": g["pending"],
            "lag": g["lag"] if g.get("lag") is not None else await group_lag(bus, stream, g["last-delivered-id"]),
        }
        for g in groups
    ]


async def consumer_groups(bus: Bus, state: State) -> list[dict[str, Any]]:
    """The services' consumer groups with their pending entries and lag: the scheduler's on the
    commands and the log, the exporter's, and each node's runner's."""
    keys = bus.keys
    groups = []
    for stream, group in (
        (keys.commands, SCHEDULER_GROUP),
        (keys.events, SCHEDULER_GROUP),
        (keys.exports, EXPORTER_GROUP),
    ):
        groups += [g for g in await _groups(bus, stream) if g["group"] == group]
    for node in state.nodes:
        groups += [g for g in await _groups(bus, keys.node(node)) if g["group"] == RUNNER_GROUP]
    return groups


async def system_status(request: Request) -> JSONResponse:
    """Nodes and their last heartbeat, Redis memory and stream lengths, consumer-group lag, the
    scheduler's leader, and jobs by status."""
    projection = projection_of(request)
    bus = bus_of(request)
    keys = bus.keys
    streams = {"events": keys.events, "commands": keys.commands, "telemetry": keys.telemetry, "dead": keys.dead_letter}
    async with bus.redis.pipeline(transaction=False) as pipe:
        for stream in streams.values():
            pipe.xlen(stream)
        pipe.info("memory")
        pipe.get(keys.leader)
        *lengths, memory, leader = await pipe.execute()
    groups = await consumer_groups(bus, projection.state)
    state = projection.state
    nodes = []
    for name, node in sorted(state.nodes.items()):
        beat = projection.heartbeats.get(name)
        nodes.append(
            {
                "node": name,
                "up": node.up,
                "epoch": node.epoch,
                "gpus": len(node.gpus),
                "simulated": node.simulated,
                "last_heartbeat": beat.at.isoformat() if beat else None,
                "degraded": beat.degraded if beat else None,
            }
        )
    by_status = Counter(job.status.value for job in state.jobs.values())
    return JSONResponse(
        {
            "nodes": nodes,
            "scheduler": {"leader": leader},
            "services": projection.live_services(),
            "redis": {
                "used_memory_bytes": memory["used_memory"],
                "used_memory_human": memory["used_memory_human"],
                "streams": dict(zip(streams, lengths, strict=True)),
            },
            "consumer_groups": groups,
            "jobs_by_status": {status.value: by_status.get(status.value, 0) for status in JobStatus},
            "log_position": state.position,
        }
    )


def routes() -> list[Route]:
    return [
        Route("/supported-types", supported_types, methods=["GET"]),
        Route("/params/default", default_params, methods=["GET"]),
        Route("/jobs", delete_finished, methods=["DELETE"]),
        Route("/queue/processor/status", processor_status, methods=["GET"]),
        Route("/system/status", system_status, methods=["GET"]),
    ]
