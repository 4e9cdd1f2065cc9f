"""Facts several rules make: a job queued, stopped, retried or failed."""

from __future__ import annotations

import math

from events import messages as m
from events.bus import Append
from events.keys import Keys
from events.records import Job
from events.state import State


def queued(state: State, priority: int, common: m.Ids, seq: float = math.inf) -> m.JobQueued:
    ahead = state.queued_ahead_of(priority, seq)
    return m.JobQueued(position=ahead + 1, behind_job_id=state.queued_at(ahead) if ahead else None, **common)


def stops(keys: Keys, job: Job, reason: str, common: m.Ids, *, skip_rank: int | None = None) -> list[Append]:
    """A stop of the job's attempt to the runner of each of its ranks (one, unless a gang)."""
    return [
        Append(keys.node(rank.node), m.StopJob(attempt=job.attempt, reason=reason, rank=index, **common))  # type: ignore[arg-type]
        for index, rank in enumerate(job.ranks)
        if index != skip_rank
    ]


def stopped(keys: Keys, job: Job, reason: str, cause: m.Message) -> Append:
    """An attempt being stopped whose end nobody will report: the job goes on from the last
    checkpoint the log knows of."""
    fact = m.JobStopped(
        attempt=job.attempt,
        last_checkpoint=job.last_checkpoint,
        step=job.checkpoint_step,
        reason=reason,
        job_id=job.job_id,
        causation_id=cause.id,
    )
    return Append(keys.events, fact)


def retry_or_fail(keys: Keys, job: Job, reason: str, message: str, cause: m.Message, free: bool = False) -> Append:
    """An attempt lost to the infrastructure: run the job again (from its last checkpoint) while
    it has retries left, else fail it. A ``free`` retry uses none of them."""
    common: m.Ids = {"job_id": job.job_id, "causation_id": cause.id}
    if free or job.retries < job.spec.max_retries:
        return Append(keys.events, m.JobRequeued(attempt=job.attempt, reason=reason, retry=not free, **common))
    return Append(keys.events, m.JobFailed(attempt=job.attempt, reason=reason, message=message, **common))
