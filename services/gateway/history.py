"""The history over REST: a job's events and timeline, the audit log with cursors, and the
gateway's folded state (what `swift-trainer audit rebuild` compares with the log)."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from events import audit
from events import messages as m
from events.bus import Entry, previous_id
from events.codec import DecodeError, decode, entry_type
from events.describe import describe, render
from events.times import parse_time
from services.gateway.auth import may_see, principal, require_admin
from services.gateway.context import bus_of, projection_of
from services.gateway.errors import ApiError

_ENTRY_ID = r"^\d{1,20}(-\d{1,20})?$"


def job_query(request: Request) -> audit.Query:
    """Where a job's entries lie in the history: from its first entry to its latest one (the
    whole history for a deleted job, which the projection no longer holds)."""
    projection = projection_of(request)
    job_id = request.path_params["job_id"]
    job = projection.state.jobs.get(job_id)
    if job is not None and may_see(request, job.submitted_by):
        return audit.Query(job_id=job_id, after=previous_id(job.first_entry_id), until=job.last_entry_id)
    if job is None and job_id in projection.state.deleted and principal(request).is_admin:
        return audit.Query(job_id=job_id)  # its owner is no longer at hand: admins only
    raise ApiError(404, "job_not_found", f"no job {job_id!r}")


async def job_events(request: Request) -> JSONResponse:
    q = job_query(request)
    found = [render(entry) async for entry in audit.query(bus_of(request), q)]
    return JSONResponse({"job_id": q.job_id, "events": found})


def _item(entry: Entry, message: m.Message, text: str) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id,
        "at": message.at.isoformat(),
        "type": message.type,
        "actor": message.actor,
        "source": message.source,
        "text": text,
    }


async def job_timeline(request: Request) -> JSONResponse:
    """A job's whole life, readable: who submitted it, each decision with its reason, each state
    change, retries and cancels with who asked. Runs of progress reports become one line."""
    q = job_query(request)
    items: list[dict[str, Any]] = []
    run: list[tuple[Entry, m.JobProgress]] = []

    def close_run() -> None:
        if not run:
            return
        (first_entry, first), (_, last) = run[0], run[-1]
        losses = [p.loss for _, p in run if p.loss is not None]
        loss = f", loss {losses[0]:.4g} → {losses[-1]:.4g}" if losses else ""
        text = f"trained: step {first.step} → {last.step} of {last.max_steps} ({len(run)} reports{loss})"
        items.append(_item(first_entry, first, text))
        run.clear()

    async for entry in audit.query(bus_of(request), q):
        try:
            message = decode(entry.fields)
        except DecodeError as exc:
            close_run()
            items.append(
                {"entry_id": entry.entry_id, "type": entry_type(entry.fields) or None, "text": f"unreadable: {exc}"}
            )
            continue
        if isinstance(message, m.JobProgress):
            run.append((entry, message))
            continue
        close_run()
        items.append(_item(entry, message, describe(message)))
    close_run()
    return JSONResponse({"job_id": q.job_id, "timeline": items})


def _param(request: Request, name: str, pattern: str | None = None) -> str | None:
    value = request.query_params.get(name)
    if value is not None and pattern is not None and not re.match(pattern, value):
        raise ApiError(400, "bad_parameter", f"bad {name}: {value!r}", [{"field": name, "message": "malformed"}])
    return value


def _entry_id(request: Request, name: str) -> str | None:
    """A stream entry id, ``<ms>[-<seq>]``, each part a 64-bit unsigned integer as Redis takes it."""
    value = _param(request, name, _ENTRY_ID)
    if value is not None and any(int(part) >= 2**64 for part in value.split("-")):
        raise ApiError(400, "bad_parameter", f"bad {name}: {value!r}", [{"field": name, "message": "out of range"}])
    return value


async def audit_events(request: Request) -> JSONResponse:
    """The history (archives and the live log) with filters and a cursor: pass ``next_cursor``
    back as ``cursor`` for the next page. Admins only."""
    require_admin(request)
    times: dict[str, int | None] = {}
    for name in ("since", "until"):
        value = _param(request, name)
        try:
            times[name] = parse_time(value) if value is not None else None
        except ValueError as exc:
            raise ApiError(400, "bad_parameter", str(exc), [{"field": name, "message": str(exc)}]) from None
    raw_limit = _param(request, "limit", r"^\d{1,6}$") or "500"
    limit = int(raw_limit)
    if not 1 <= limit <= 10_000:
        raise ApiError(400, "bad_parameter", "limit must be 1 to 10000", [{"field": "limit", "message": "1 to 10000"}])
    cursor, after_id = _entry_id(request, "cursor"), _entry_id(request, "after_id")  # both checked
    q = audit.Query(
        job_id=_param(request, "job_id"),
        types=tuple(request.query_params.getlist("type")),
        since_ms=times["since"],
        until_ms=times["until"],
        after=cursor or after_id or "0-0",
        until=_entry_id(request, "until_id") or "+",
    )
    page: list[dict[str, Any]] = []
    more = False
    async for entry in audit.query(bus_of(request), q):
        if len(page) == limit:
            more = True
            break
        page.append(render(entry))
    return JSONResponse({"events": page, "next_cursor": page[-1]["entry_id"] if more else None})


async def audit_state(request: Request) -> JSONResponse:
    """The state this gateway folded from the log, at its position. Admins only."""
    require_admin(request)
    return JSONResponse(projection_of(request).state.model_dump(mode="json"))


def job_routes() -> list[Route]:
    return [
        Route("/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/jobs/{job_id}/timeline", job_timeline, methods=["GET"]),
    ]


def audit_routes() -> list[Route]:
    return [
        Route("/events", audit_events, methods=["GET"]),
        Route("/state", audit_state, methods=["GET"]),
    ]
