"""Live streams over Server-Sent Events: a job's events, its log lines, every event, the GPUs.

Each stream sends history first (after ``Last-Event-ID``), then live entries from the shared
reader, without a gap or a repeat; a client too slow to keep up is told so and dropped. The GPUs
view is answered here as JSON too, beside the stream that sends it as it changes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from events import audit
from events.bus import entry_id_key, previous_id
from events.codec import DecodeError, entry_type, envelope_json
from events.connection import text_entries
from services.gateway import gpus as gpu_views
from services.gateway.auth import may_see
from services.gateway.context import bus_of, int_param, named_job, projection_of
from services.gateway.errors import ApiError
from services.gateway.projection import Projection

log = structlog.get_logger("gateway")


SSE_PING_S = 15


SSE_RETRY_MS = 2000


CUT_OFF_GRACE_S = 5.0  # how long a client cut off for falling behind keeps its connection


GPU_STREAM_MIN_S = 0.5


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
    return JSONResponse(gpus_view(projection_of(request)))


async def gpus_stream(request: Request) -> EventSourceResponse:
    """The GPUs view, live: sent at once, then whenever a heartbeat or an allocation changes it
    (at most every GPU_STREAM_MIN_S)."""
    return _sse(lambda cut: _gpu_views(projection_of(request)))


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


_ENTRY_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


def is_entry_id(text: str) -> bool:
    """A Redis stream entry id, ``<ms>-<seq>``, each part a 64-bit unsigned integer."""
    found = _ENTRY_ID.match(text)
    return found is not None and all(int(part) < 2**64 for part in found.groups())


def resume_from(request: Request) -> str | None:
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
    job = named_job(request)
    after = resume_from(request) or previous_id(job.first_entry_id)
    return _sse(lambda cut: _events(request, after, job.job_id, lambda job_id, _: job_id == job.job_id, cut))


async def job_log_stream(request: Request) -> EventSourceResponse:
    """A job's output lines: the last ``tail`` (default 200), or those after ``Last-Event-ID``,
    then live as the job writes them."""
    job = named_job(request)
    resume = resume_from(request)
    tail = int_param(request, "tail", 200, 0, 10_000)
    rank = int_param(request, "rank", 0, 0, job.spec.nodes - 1)
    return _sse(lambda cut: _log_lines(request, job.job_id, resume, tail, cut, rank))


async def _log_lines(
    request: Request, job_id: str, resume: str | None, tail: int, cut: asyncio.Event, rank: int = 0
) -> AsyncIterator[ServerSentEvent]:
    projection = projection_of(request)
    bus = bus_of(request)
    key = bus.keys.logs(job_id, rank)
    yield ServerSentEvent(retry=SSE_RETRY_MS, comment="stream open")
    if resume is not None:
        history = [(entry.entry_id, entry.fields) async for entry in bus.entries(key, after=resume)]
        last = resume
    else:
        newest = text_entries(await bus.redis.xrevrange(key, count=max(tail, 1)))
        history = list(reversed(newest))[-tail:] if tail else []
        last = newest[0][0] if newest else "0-0"
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
    state = projection_of(request).state

    def wanted(job_id: str, type_: str) -> bool:
        if query.job_id is not None and job_id != query.job_id:
            return False
        if not audit.type_matches(query.types, type_):
            return False
        job = state.jobs.get(job_id)
        return not job_id or may_see(request, job.submitted_by if job else None)

    return _sse(lambda cut: _events(request, resume_from(request) or state.position, query.job_id, wanted, cut))


async def _events(
    request: Request, after: str, job_id: str | None, wanted: Callable[[str, str], bool], cut: asyncio.Event
) -> AsyncIterator[ServerSentEvent]:
    """History after ``after`` from Redis, then live events from the shared reader, without a gap
    or a repeat: subscribe first, read history, then skip live events the history covered."""
    projection = projection_of(request)
    bus = bus_of(request)
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
