"""Who may take GPUs, and in which order: quota checks and fair share's order, shared by the
scheduler (which decides) and the gateway (which shows why a job waits)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime

from events.quotas import Limit, team_key, user_key
from events.records import Job
from events.state import State


def _over(limit: Limit | None, field: str, used: int, adding: int) -> int | None:
    allowed = getattr(limit, field) if limit is not None else None
    return allowed if allowed is not None and used + adding > allowed else None


def gpu_quota_block(state: State, job: Job, taken: Mapping[str, int] | None = None) -> str | None:
    """Why starting the job now would take its owner or team over their GPU quota (None if it
    would not). ``taken``: GPUs handed out within quota earlier in the same decision."""
    return gpus_quota_block(state, job.owner, job.team, job.spec.total_gpus, taken)


def gpus_quota_block(
    state: State, owner: str, team: str | None, need: int, taken: Mapping[str, int] | None = None
) -> str | None:
    """Why taking ``need`` more GPUs now would take the owner or team over their GPU quota."""
    taken = taken or {}
    checks = [("user", owner, state.quotas.user(owner), user_key(owner))]
    if team is not None:
        checks.append(("team", team, state.quotas.team(team), team_key(team)))
    for kind, name, limit, key in checks:
        held = state.holding(key) + taken.get(key, 0)
        allowed = _over(limit, "gpus", held, need)
        if allowed is not None:
            return f"quota: {kind} {name} holds {held} of {allowed} GPUs and the job needs {need}"
    return None


def queued_quota_block(state: State, owner: str, team: str | None) -> str | None:
    """Why one more waiting job would take its owner or team over their limit of jobs waiting
    at once (None if it would not)."""
    checks = [("user", owner, state.quotas.user(owner), user_key(owner))]
    if team is not None:
        checks.append(("team", team, state.quotas.team(team), team_key(team)))
    for kind, name, limit, key in checks:
        waiting = state.waiting(key)
        allowed = _over(limit, "queued", waiting, 1)
        if allowed is not None:
            return f"{kind} {name} has {waiting} jobs waiting, and its quota allows {allowed}"
    return None


def charge(taken: dict[str, int], job: Job) -> None:
    """Count a job started within quota in this decision against its owner and team."""
    for key in (user_key(job.owner),) if job.team is None else (user_key(job.owner), team_key(job.team)):
        taken[key] = taken.get(key, 0) + job.spec.total_gpus


def usage_rank(state: State) -> Callable[[str], float]:
    """An owner's place in fair share's order: their decayed usage's log (lowest first). The
    order between owners does not change as time passes, only as usage is added."""
    usage = state.usage

    def rank(owner: str) -> float:
        used = usage.get(user_key(owner))
        return -math.inf if used is None or used.log2_scaled is None else used.log2_scaled

    return rank


def queue_order(
    state: State, fair_share: bool, extra: Job | None = None, skip: frozenset[str] = frozenset()
) -> Iterator[Job]:
    """Queued jobs in the order they start: by priority, then FIFO, or with fair share by the
    owner's decayed usage before submit order. The jobs of the owners in ``skip`` are left out."""
    if fair_share:
        return state.fair_queue_iter(usage_rank(state), extra, skip)
    return state.queue_iter(skip)


def decayed_usage(state: State, owner: str, now: datetime) -> float:
    used = state.usage.get(user_key(owner))
    return 0.0 if used is None else used.decayed(now, state.half_life_s)
