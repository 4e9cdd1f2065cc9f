"""What facts of the log call for: dependents released, exports started, stops completed, passes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from events import messages as m
from events.bus import Append
from events.dependencies import names, verdict
from events.keys import Keys
from events.records import HOLDS_GPUS
from events.state import State
from services.scheduler.rules.commands import export
from services.scheduler.rules.facts import queued, retry_or_fail, stopped, stops
from services.scheduler.rules.limits import Limits
from services.scheduler.rules.passes import schedule

# Facts after which a job waiting for its dependencies may start, or never will.
ENDS = (m.JobSucceeded, m.JobFailed, m.JobCancelled, m.JobRejected, m.ExportCompleted, m.ExportFailed, m.JobDeleted)


def release_dependents(state: State, keys: Keys, event: m.Message) -> list[Append]:
    """For each job waiting on the one this fact ended (or exported), in submit order: queued
    (or held) once all it waits for is met, failed with reason ``dependency_failed`` once it
    can no longer be."""
    decided: list[Append] = []
    for job in state.awaiting():
        if not event.job_id or not names(job.spec, event.job_id):
            continue
        needs = verdict(state, job.spec)
        common: m.Ids = {"job_id": job.job_id, "causation_id": event.id, "actor": event.actor}
        if needs.broken is not None:
            decided.append(
                Append(
                    keys.events, m.JobFailed(reason=m.FailureReason.DEPENDENCY_FAILED, message=needs.broken, **common)
                )
            )
        elif needs.met:
            decided.append(Append(keys.events, m.DependenciesMet(model_path=needs.model_path, **common)))
            then = m.JobHeld(**common) if job.spec.hold else queued(state, job.priority, common, job.seq)
            decided.append(Append(keys.events, then))
    return decided


def react(state: State, keys: Keys, event: m.Message) -> list[Append]:
    """Facts the scheduler adds in response to another fact."""
    released = release_dependents(state, keys, event) if isinstance(event, ENDS) and state.awaiting() else []
    return released + _reactions(state, keys, event)


def _reactions(state: State, keys: Keys, event: m.Message) -> list[Append]:
    if isinstance(event, m.JobLost):
        job = state.jobs.get(event.job_id or "")
        if job is not None and job.stopping and job.attempt == event.attempt:
            # It gave up its GPUs and ended unwatched: queued (or held) from its last checkpoint
            return [stopped(keys, job, m.StopReason.LOST, event)]
        if job is None or job.status not in HOLDS_GPUS or job.attempt != event.attempt:
            return []  # a report of an attempt already ended: the fold ignored it too
        message = "the job ended while no runner watched it" + (f": {event.message}" if event.message else "")
        gang = stops(keys, job, "preempt", {"job_id": job.job_id, "causation_id": event.id}) if job.peers else []
        return [retry_or_fail(keys, job, m.NodeLossReason.RUNNER_LOST, message, event), *gang]
    if isinstance(event, m.RankEnded):
        job = state.jobs.get(event.job_id or "")
        if (
            not event.failed
            or job is None
            or job.status not in HOLDS_GPUS
            or job.attempt != event.attempt
            or job.stopping
            or job.cancel_requested
        ):
            return []  # a rank that ended as told, or of an attempt already ended
        # The whole attempt goes: every other rank is stopped, and the job runs again from its
        # last checkpoint while it has retries, else fails with this rank's reason.
        what = event.message or f"exited with code {event.exit_code}"
        message = f"rank {event.rank} on node {event.node} failed: {what}"
        common: m.Ids = {"job_id": job.job_id, "causation_id": event.id}
        failed = retry_or_fail(keys, job, event.reason or "unknown", message, event)
        return [failed, *stops(keys, job, "preempt", common, skip_rank=event.rank)]
    if isinstance(event, m.JobFailed) and event.causation_id is None:
        # A gang job's rank 0 failed by itself (a time limit, a refused start): the other ranks
        # are told to stop. (The scheduler's own job.failed has stopped them already.)
        job = state.jobs.get(event.job_id or "")
        if job is not None and job.peers and job.attempt == event.attempt:
            return stops(keys, job, "cancel", {"job_id": job.job_id, "causation_id": event.id}, skip_rank=0)
    if isinstance(event, m.JobSucceeded):
        job = state.jobs.get(event.job_id or "")
        spec = job.spec if job else None
        if job is not None and spec is not None and getattr(spec, "auto_export", False):
            return export(state, keys, job, event)
    return []


# Facts after which queued jobs may now fit.
RESCHEDULE_ON = (
    m.JobQueued,
    m.JobRequeued,
    m.JobPriorityChanged,
    m.JobSucceeded,
    m.JobFailed,
    m.JobCancelled,
    m.NodeJoined,
    m.NodeLost,
    m.JobPreempted,  # (a victim may free more GPUs than its preemptor takes)
    m.JobSuspended,
    m.JobStopped,
    m.JobResumed,
    m.QuotasChanged,
)


def reschedules(event: m.Message) -> bool:
    """Whether queued jobs may fit after this fact."""
    return isinstance(event, RESCHEDULE_ON)


def on_event(
    state: State,
    keys: Keys,
    heartbeats: Mapping[str, m.NodeHeartbeat],
    limits: Limits,
    now: datetime,
    event: m.Message,
) -> list[Append]:
    """Everything the scheduler decides in response to one fact of the log."""
    decided = react(state, keys, event)
    if isinstance(event, RESCHEDULE_ON):
        decided += schedule(state, keys, heartbeats, limits, now, event)
    return decided
