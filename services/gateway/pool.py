"""Sharing the pool: the quota table (admins) and usage per user and team."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from events import messages as m
from events.quotas import EVERYONE, HOUR_S, Quotas, Usage, team_key, user_key
from events.records import HOLDS_GPUS
from events.state import State
from services.config import Settings
from services.gateway.auth import Auth, principal, require_admin
from services.gateway.bodies import read_json
from services.gateway.context import actor, bus_of, projection_of
from services.gateway.errors import ApiError, validation_details

DAY_S, WEEK_S = 24 * 3600, 7 * 24 * 3600


def _quota_table(request: Request) -> dict[str, Any]:
    state = projection_of(request).state
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
    projection = projection_of(request)
    position = await bus_of(request).send(
        bus_of(request).keys.commands, m.SetQuotas(quotas=quotas, actor=actor(request))
    )
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
    state = projection_of(request).state
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
