"""What each command decides: submit, cancel, suspend, resume, priorities, quotas, sweeps, exports."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from events import messages as m
from events.admission import queued_quota_block
from events.bus import Append
from events.dependencies import verdict
from events.keys import Keys
from events.placement import never_fits
from events.records import ANONYMOUS, YIELDED, Job, JobStatus
from events.state import State
from services.scheduler.rules.facts import queued, stops
from services.scheduler.rules.limits import Limits
from services.scheduler.rules.passes import schedule


def submit(
    state: State,
    keys: Keys,
    command: m.SubmitJob,
    heartbeats: Mapping[str, m.NodeHeartbeat],
    limits: Limits,
    now: datetime,
) -> list[Append]:
    """Accept a job, queue it, and place it at once when it fits (all in one decision)."""
    job_id = command.job_id or ""
    if job_id in state.jobs:  # a redelivered or repeated submit: already decided
        return []
    spec = command.spec
    common: m.Ids = {"job_id": job_id, "causation_id": command.id, "actor": command.actor}
    accepted = m.JobAccepted(spec=spec, team=command.team, sweep_id=command.sweep_id, point=command.point, **common)
    impossible = never_fits(spec, state)
    if impossible:
        rejected = m.JobRejected(reason=m.FailureReason.UNSATISFIABLE, message=impossible, **common)
        return [Append(keys.events, accepted), Append(keys.events, rejected)]
    over = queued_quota_block(state, command.actor or ANONYMOUS, command.team)
    if over:
        rejected = m.JobRejected(reason=m.FailureReason.QUOTA, message=over, **common)
        return [Append(keys.events, accepted), Append(keys.events, rejected)]
    decided = [Append(keys.events, accepted)]
    if spec.depends_on or (getattr(spec, "source_job_id", None) and not spec.model_path):
        needs = verdict(state, spec)
        if needs.broken is not None:
            return [
                *decided,
                Append(
                    keys.events, m.JobRejected(reason=m.FailureReason.DEPENDENCY_FAILED, message=needs.broken, **common)
                ),
            ]
        if needs.waiting_on:
            return [*decided, Append(keys.events, m.JobWaiting(on=needs.waiting_on, **common))]
        if needs.model_path:  # (the source's export completed since the gateway looked)
            decided.append(Append(keys.events, m.DependenciesMet(model_path=needs.model_path, **common)))
            spec = spec.model_copy(update={"model_path": needs.model_path})
            accepted = accepted.model_copy(update={"spec": spec})
    if spec.hold:
        return [*decided, Append(keys.events, m.JobHeld(**common))]
    decided.append(Append(keys.events, queued(state, spec.priority, common)))
    # The queue as it will be once these facts are folded in, to place the new job right away.
    return decided + schedule(state, keys, heartbeats, limits, now, command, accepted=accepted)


def create_sweep(state: State, keys: Keys, command: m.CreateSweep) -> list[Append]:
    """Record a sweep; its jobs follow as submissions of their own."""
    if command.sweep_id in state.sweeps:
        return []  # redelivered
    created = m.SweepCreated(
        sweep_id=command.sweep_id,
        name=command.name,
        grid=command.grid,
        max_concurrent=command.max_concurrent,
        job_ids=command.job_ids,
        causation_id=command.id,
        actor=command.actor,
    )
    return [Append(keys.events, created)]


def cancel_sweep(state: State, keys: Keys, command: m.CancelSweep) -> list[Append]:
    """Cancel every job of a sweep that has not ended, as a cancel of each would."""
    sweep = state.sweeps.get(command.sweep_id)
    if sweep is None:
        return []
    decided: list[Append] = []
    for job_id in sweep.job_ids:
        each = m.CancelJob(
            id=f"{command.id}-{job_id}", job_id=job_id, actor=command.actor, reason=f"sweep {sweep.sweep_id} cancelled"
        )
        decided += cancel(state, keys, each)
    return decided


def release(state: State, keys: Keys, command: m.ReleaseJob) -> list[Append]:
    """Queue a held job; the scheduling pass that follows job.queued may start it."""
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_release:
        return []
    common: m.Ids = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    return [Append(keys.events, queued(state, job.priority, common, job.seq))]


def cancel(state: State, keys: Keys, command: m.CancelJob) -> list[Append]:
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_cancel:
        return []
    common: m.Ids = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    if job.status in (JobStatus.pending, JobStatus.held, JobStatus.waiting, JobStatus.queued, *YIELDED):
        # (an attempt still stopping after giving up its GPUs was told to stop already)
        return [Append(keys.events, m.JobCancelled(**common))]
    to_runners = stops(keys, job, "cancel", common)
    if job.cancel_requested:
        return to_runners  # asked again: the runner's stop is idempotent, and a stop may have been lost
    return [Append(keys.events, m.JobCancelRequested(reason=command.reason, **common)), *to_runners]


def suspend(state: State, keys: Keys, command: m.SuspendJob) -> list[Append]:
    """Stop a running training job with a checkpoint, free its GPUs, and hold it."""
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_suspend:
        return []
    common: m.Ids = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    return [
        Append(keys.events, m.JobSuspended(attempt=job.attempt, **common)),
        *stops(keys, job, "suspend", common),
    ]


def resume(state: State, keys: Keys, command: m.ResumeJob) -> list[Append]:
    """Queue a suspended job again in its original place (its priority and submit order)."""
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_resume:
        return []
    common: m.Ids = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    ahead = state.queued_ahead_of(job.priority, job.seq)
    resumed = m.JobResumed(position=ahead + 1, behind_job_id=state.queued_at(ahead) if ahead else None, **common)
    return [Append(keys.events, resumed)]


def set_quotas(state: State, keys: Keys, command: m.SetQuotas) -> list[Append]:
    """Replace the quota table. One from the configuration at start is applied only when it
    differs from the last one the configuration gave (an admin's change since then stands)."""
    if command.from_config and command.quotas == state.config_quotas:
        return []
    if not command.from_config and command.quotas == state.quotas:
        return []
    changed = m.QuotasChanged(quotas=command.quotas, from_config=command.from_config, causation_id=command.id)
    return [Append(keys.events, changed.model_copy(update={"actor": command.actor}))]


def set_half_life(state: State, keys: Keys, command: m.SetHalfLife) -> list[Append]:
    if command.half_life_s == state.half_life_s:
        return []
    return [Append(keys.events, m.HalfLifeChanged(half_life_s=command.half_life_s, causation_id=command.id))]


def set_priority(state: State, keys: Keys, command: m.SetPriority) -> list[Append]:
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_reprioritize or job.priority == command.priority:
        return []
    common: m.Ids = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    return [Append(keys.events, m.JobPriorityChanged(priority=command.priority, previous=job.priority, **common))]


def delete(state: State, keys: Keys, command: m.DeleteJob) -> list[Append]:
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_delete:
        return []
    return [Append(keys.events, m.JobDeleted(job_id=job.job_id, causation_id=command.id, actor=command.actor))]


def export(state: State, keys: Keys, job: Job, cause: m.Message) -> list[Append]:
    """Merge a completed LoRA job's adapters into its base model."""
    if not job.may_export or job.last_checkpoint is None:
        return []
    checkpoint = job.last_checkpoint
    output_dir = checkpoint.rstrip("/") + "-merged"
    common: m.Ids = {"job_id": job.job_id, "causation_id": cause.id, "actor": cause.actor}
    return [
        Append(keys.events, m.ExportRequested(checkpoint=checkpoint, output_dir=output_dir, **common)),
        Append(keys.exports, m.StartExport(checkpoint=checkpoint, output_dir=output_dir, hub=job.spec.hub, **common)),
    ]
