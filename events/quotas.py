"""Quotas and GPU usage: what a user or a team may hold, and what they have used.

A quota limits, per user (the API key's name) and per team (given in the key entry), the GPUs
held at once by jobs within quota, and the jobs waiting at once (pending, held, queued or
preempted). ``*`` among the users is the limit of every user not listed. Usage is GPU-seconds,
credited from the log as jobs hold GPUs: decayed with a half-life for fair share, and per hour
for the last week's totals. All of it is folded from the log, so a replay gives the same numbers.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

EVERYONE = "*"  # among the users of a quota table: every user not listed by name
Name = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9_.@-]{1,100})$")]
# Decayed usage is kept as log2 of GPU-seconds scaled to this moment: the order between owners
# does not change as time passes, only as usage is added.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
HOUR_S = 3600
WEEK_HOURS = 7 * 24
DEFAULT_HALF_LIFE_S = 7 * 24 * 3600.0


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    gpus: int | None = Field(None, ge=0, le=1_000_000, description="GPUs held at once (None: no limit)")
    queued: int | None = Field(None, ge=0, le=1_000_000, description="jobs waiting at once (None: no limit)")


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    users: dict[Name, Limit] = Field(default_factory=dict, max_length=10_000)
    teams: dict[Name, Limit] = Field(default_factory=dict, max_length=10_000)

    def user(self, name: str) -> Limit | None:
        return self.users.get(name) or self.users.get(EVERYONE)

    def team(self, name: str | None) -> Limit | None:
        return None if name is None else self.teams.get(name)


def user_key(name: str) -> str:
    return f"user:{name}"


def team_key(name: str) -> str:
    return f"team:{name}"


class Usage(BaseModel):
    """One user's or team's GPU usage: decayed (log2 of GPU-seconds scaled to EPOCH; None for
    none yet) and per hour over the last week (hour number since EPOCH -> GPU-seconds)."""

    log2_scaled: float | None = None
    hours: dict[int, float] = Field(default_factory=dict)

    def copy(self) -> Usage:  # type: ignore[override]  # without BaseModel.copy's (deprecated) options
        return Usage(log2_scaled=self.log2_scaled, hours=dict(self.hours))

    def add(self, gpu_seconds: float, at: datetime, half_life_s: float) -> None:
        if gpu_seconds <= 0:
            return
        since = (at - EPOCH).total_seconds()
        self.log2_scaled = log2_add(self.log2_scaled, math.log2(gpu_seconds) + since / half_life_s)
        hour = math.floor(since / HOUR_S)
        self.hours[hour] = self.hours.get(hour, 0.0) + gpu_seconds
        if len(self.hours) > WEEK_HOURS + 1:
            for old in [h for h in self.hours if h < hour - WEEK_HOURS]:
                del self.hours[old]

    def decayed(self, now: datetime, half_life_s: float) -> float:
        """GPU-seconds, each halved for every half-life since it was used."""
        if self.log2_scaled is None:
            return 0.0
        decayed: float = 2.0 ** (self.log2_scaled - (now - EPOCH).total_seconds() / half_life_s)
        return decayed

    def rescaled(self, old_half_life_s: float, new_half_life_s: float, at: datetime) -> None:
        """Keep the decayed value as it is at ``at`` when the half-life changes."""
        if self.log2_scaled is None:
            return
        since = (at - EPOCH).total_seconds()
        self.log2_scaled += since / new_half_life_s - since / old_half_life_s

    def within(self, now: datetime, seconds: float) -> float:
        """GPU-seconds used in the hours that overlap the last ``seconds``."""
        first = math.floor(((now - EPOCH).total_seconds() - seconds) / HOUR_S)
        return sum(used for hour, used in self.hours.items() if hour >= first)


def log2_add(a: float | None, b: float) -> float:
    """log2(2**a + 2**b) without overflow (None: nothing yet)."""
    if a is None:
        return b
    high, low = max(a, b), min(a, b)
    return high + math.log2(1.0 + 2.0 ** (low - high))
