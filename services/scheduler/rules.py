"""The scheduler's business rules as pure functions: state and a message in, messages out."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from events import messages as m
from events.admission import charge, gpu_quota_block, gpus_quota_block, queue_order, queued_quota_block
from events.bus import Append
from events.dependencies import names, verdict
from events.estimates import Estimate, estimate_queue, placement_request
from events.keys import Keys
from events.placement import (
    foreign_gpus,
    free_mb,
    freeable_gpus,
    in_service,
    matching,
    never_fits,
    node_view,
    readers,
)
from events.policy import Policy
from events.state import (
    ANONYMOUS,
    HOLDS_GPUS,
    TERMINAL,
    YIELDED,
    ExportStatus,
    Job,
    JobStatus,
    State,
    gpu_key,
    new_job,
)

BACKFILL_SCAN = 1000  # queued jobs looked at behind a blocked one, when backfilling

# A command decided by the state, the keys and the command alone.
CommandRule = Callable[[State, Keys, Any], list[Append]]


@dataclass(frozen=True, kw_only=True)
class Limits(Policy):
    """The pool's sharing policy, and the scheduler's other bounds."""

    heartbeat_timeout_s: float  # a GPU of a node silent this long is offered to no one
    foreign_memory_threshold_mb: int
    node_timeout_s: float = 30.0  # a node silent this long is declared lost
    backfill: bool = False  # let short jobs (by time limit) start ahead of a blocked one
    # How long past its time limit a job may hold its GPUs (it is stopped gracefully): a job is
    # backfilled only if its limit plus this ends before the blocked job's estimated start
    backfill_margin_s: float = 0.0
    rendezvous_ports: range = range(29500, 30000)  # torchrun's MASTER_PORT, one per attempt and node
    restart_lost_checkpoints: bool = False  # else a job whose checkpoint no node can read waits
    idle_timeout_s: float | None = None  # IDLE_TIMEOUT_S: training jobs' default (off: None)
    idle_gpu_util_pct: float = 5.0  # a GPU under this is idle


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
    common = {"job_id": job_id, "causation_id": command.id, "actor": command.actor}
    accepted = m.JobAccepted(spec=spec, team=command.team, sweep_id=command.sweep_id, point=command.point, **common)
    impossible = never_fits(spec, state)
    if impossible:
        rejected = m.JobRejected(reason="unsatisfiable", message=impossible, **common)
        return [Append(keys.events, accepted), Append(keys.events, rejected)]
    over = queued_quota_block(state, command.actor or ANONYMOUS, command.team)
    if over:
        rejected = m.JobRejected(reason="quota", message=over, **common)
        return [Append(keys.events, accepted), Append(keys.events, rejected)]
    decided = [Append(keys.events, accepted)]
    if spec.depends_on or (getattr(spec, "source_job_id", None) and not spec.model_path):
        needs = verdict(state, spec)
        if needs.broken is not None:
            return [
                *decided,
                Append(keys.events, m.JobRejected(reason="dependency_failed", message=needs.broken, **common)),
            ]
        if needs.waiting_on:
            return [*decided, Append(keys.events, m.JobWaiting(on=needs.waiting_on, **common))]
        if needs.model_path:  # (the source's export completed since the gateway looked)
            decided.append(Append(keys.events, m.DependenciesMet(model_path=needs.model_path, **common)))
            spec = spec.model_copy(update={"model_path": needs.model_path})
            accepted = accepted.model_copy(update={"spec": spec})
    if spec.hold:
        return [*decided, Append(keys.events, m.JobHeld(**common))]
    decided.append(Append(keys.events, _queued(state, spec.priority, common)))
    # The queue as it will be once these facts are folded in, to place the new job right away.
    return decided + schedule(state, keys, heartbeats, limits, now, command, accepted=accepted)


def _queue(state: State, limits: Limits, accepted: m.JobAccepted | None, skip: frozenset[str]) -> Iterator[Job]:
    """The queue in start order, less the jobs of the owners in ``skip``; with ``accepted``, as
    it will be once that job is queued (left out too, with ``skip``, when it is over quota)."""
    if accepted is not None and skip and _over_quota(state, accepted):
        accepted = None  # over quota from the start of the pass, like the jobs left out
    if accepted is None:
        return iter(queue_order(state, limits.fair_share, skip=skip))
    if limits.fair_share:
        return iter(queue_order(state, True, extra=_new_queued(accepted, state.accepted + 1), skip=skip))
    return _joined(state.queue_iter(skip), accepted, state.accepted + 1)


def _over_quota(state: State, accepted: m.JobAccepted) -> bool:
    return gpus_quota_block(state, accepted.actor or ANONYMOUS, accepted.team, accepted.spec.total_gpus) is not None


def _joined(queue: Iterator[Job], accepted: m.JobAccepted, seq: int) -> Iterator[Job]:
    """The queue with a newly accepted job in its place (the last of its priority). The job is
    made only if a pass gets that far: behind a head that does not fit, it never does."""
    priority = accepted.spec.priority
    for job in queue:
        if job.priority < priority:
            yield _new_queued(accepted, seq)
            yield job
            yield from queue
            return
        yield job
    yield _new_queued(accepted, seq)


def _new_queued(accepted: m.JobAccepted, seq: int) -> Job:
    job = new_job(accepted, seq, "0-0")
    job.status = JobStatus.queued
    return job


def _queued(state: State, priority: int, common: dict[str, str | None], seq: float = math.inf) -> m.JobQueued:
    ahead = state.queued_ahead_of(priority, seq)
    return m.JobQueued(position=ahead + 1, behind_job_id=state.queued_at(ahead) if ahead else None, **common)


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


def _sweep_full(state: State, job: Job, started: Mapping[str, int]) -> bool:
    """Whether a job of a sweep must wait for one of its sweep's jobs to end (max_concurrent)."""
    sweep = state.sweeps.get(job.sweep_id or "")
    if sweep is None or sweep.max_concurrent is None:
        return False
    return state.sweep_running(sweep.sweep_id) + started.get(sweep.sweep_id, 0) >= sweep.max_concurrent


def release(state: State, keys: Keys, command: m.ReleaseJob) -> list[Append]:
    """Queue a held job; the scheduling pass that follows job.queued may start it."""
    job = state.jobs.get(command.job_id or "")
    if job is None or job.status != JobStatus.held:
        return []
    common = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    return [Append(keys.events, _queued(state, job.priority, common, job.seq))]


def cancel(state: State, keys: Keys, command: m.CancelJob) -> list[Append]:
    job = state.jobs.get(command.job_id or "")
    if job is None or job.status not in (set(JobStatus) - {JobStatus.completed, JobStatus.failed, JobStatus.cancelled}):
        return []
    common = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    if job.status in (JobStatus.pending, JobStatus.held, JobStatus.waiting, JobStatus.queued, *YIELDED):
        # (an attempt still stopping after giving up its GPUs was told to stop already)
        return [Append(keys.events, m.JobCancelled(**common))]
    stops = _stops(keys, job, "cancel", common)
    if job.cancel_requested:
        return stops  # asked again: the runner's stop is idempotent, and a stop may have been lost
    return [Append(keys.events, m.JobCancelRequested(reason=command.reason, **common)), *stops]


def _stops(
    keys: Keys, job: Job, reason: str, common: Mapping[str, str | None], *, skip_rank: int | None = None
) -> list[Append]:
    """A stop of the job's attempt to the runner of each of its ranks (one, unless a gang)."""
    return [
        Append(keys.node(rank.node), m.StopJob(attempt=job.attempt, reason=reason, rank=index, **common))  # type: ignore[arg-type]
        for index, rank in enumerate(job.ranks)
        if index != skip_rank
    ]


def suspend(state: State, keys: Keys, command: m.SuspendJob) -> list[Append]:
    """Stop a running training job with a checkpoint, free its GPUs, and hold it."""
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_suspend:
        return []
    common = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    return [
        Append(keys.events, m.JobSuspended(attempt=job.attempt, **common)),
        *_stops(keys, job, "suspend", common),
    ]


def resume(state: State, keys: Keys, command: m.ResumeJob) -> list[Append]:
    """Queue a suspended job again in its original place (its priority and submit order)."""
    job = state.jobs.get(command.job_id or "")
    if job is None or not job.may_resume:
        return []
    common = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
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
    if job is None or job.status != JobStatus.queued or job.priority == command.priority:
        return []
    common = {"job_id": job.job_id, "causation_id": command.id, "actor": command.actor}
    return [Append(keys.events, m.JobPriorityChanged(priority=command.priority, previous=job.priority, **common))]


def delete(state: State, keys: Keys, command: m.DeleteJob) -> list[Append]:
    job = state.jobs.get(command.job_id or "")
    if job is None or job.status not in TERMINAL or job.export.status in (ExportStatus.pending, ExportStatus.running):
        return []
    return [Append(keys.events, m.JobDeleted(job_id=job.job_id, causation_id=command.id, actor=command.actor))]


def export(state: State, keys: Keys, job: Job, cause: m.Message) -> list[Append]:
    """Merge a completed LoRA job's adapters into its base model."""
    if (
        job.status != JobStatus.completed
        or not job.is_lora
        or not job.last_checkpoint
        or job.export.status in (ExportStatus.pending, ExportStatus.running)
    ):
        return []
    checkpoint = job.last_checkpoint
    output_dir = checkpoint.rstrip("/") + "-merged"
    common = {"job_id": job.job_id, "causation_id": cause.id, "actor": cause.actor}
    return [
        Append(keys.events, m.ExportRequested(checkpoint=checkpoint, output_dir=output_dir, **common)),
        Append(keys.exports, m.StartExport(checkpoint=checkpoint, output_dir=output_dir, hub=job.spec.hub, **common)),
    ]


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
        common = {"job_id": job.job_id, "causation_id": event.id, "actor": event.actor}
        if needs.broken is not None:
            decided.append(Append(keys.events, m.JobFailed(reason="dependency_failed", message=needs.broken, **common)))
        elif needs.met:
            decided.append(Append(keys.events, m.DependenciesMet(model_path=needs.model_path, **common)))
            then = m.JobHeld(**common) if job.spec.hold else _queued(state, job.priority, common, job.seq)
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
            return [_stopped(keys, job, "lost", event)]
        if job is None or job.status not in HOLDS_GPUS or job.attempt != event.attempt:
            return []  # a report of an attempt already ended: the fold ignored it too
        message = "the job ended while no runner watched it" + (f": {event.message}" if event.message else "")
        gang = _stops(keys, job, "preempt", {"job_id": job.job_id, "causation_id": event.id}) if job.peers else []
        return [_retry_or_fail(keys, job, m.NodeLossReason.RUNNER_LOST, message, event), *gang]
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
        common = {"job_id": job.job_id, "causation_id": event.id}
        failed = _retry_or_fail(keys, job, event.reason or "unknown", message, event)
        return [failed, *_stops(keys, job, "preempt", common, skip_rank=event.rank)]
    if isinstance(event, m.JobFailed) and event.causation_id is None:
        # A gang job's rank 0 failed by itself (a time limit, a refused start): the other ranks
        # are told to stop. (The scheduler's own job.failed has stopped them already.)
        job = state.jobs.get(event.job_id or "")
        if job is not None and job.peers and job.attempt == event.attempt:
            return _stops(keys, job, "cancel", {"job_id": job.job_id, "causation_id": event.id}, skip_rank=0)
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


def reclaim_idle(
    state: State,
    keys: Keys,
    heartbeat: m.NodeHeartbeat,
    heartbeats: Mapping[str, m.NodeHeartbeat],
    idle_since: dict[str, datetime],
    limits: Limits,
    now: datetime,
) -> list[Append]:
    """At a node's heartbeat: each training job on it whose GPUs, on every node it runs on, have
    all read under the idle threshold since ``idle_since`` (kept here, heartbeat to heartbeat) for
    its idle timeout is stopped with a checkpoint; its runner reports it failed, reason idle. A
    GPU whose utilisation is not known counts as busy."""
    node = state.nodes.get(heartbeat.node)
    if node is None:
        return []
    decided: list[Append] = []
    for job_id in {state.allocations.get(gpu_key(heartbeat.node, gpu.index)) for gpu in node.gpus} - {None}:
        job = state.jobs.get(job_id or "")
        timeout = (job.spec.idle_timeout_s or limits.idle_timeout_s) if job is not None else None
        if job is None or timeout is None or job.spec.task_type == "deploy" or job.status != JobStatus.running:
            idle_since.pop(job_id or "", None)
            continue
        if job.cancel_requested or job.stopping:
            continue
        if not all(_idle(heartbeats.get(rank.node), rank.gpu_ids, limits) for rank in job.ranks):
            idle_since.pop(job.job_id, None)
            continue
        since = idle_since.setdefault(job.job_id, now)
        if (now - since).total_seconds() < timeout:
            continue
        del idle_since[job.job_id]
        why = f"idle: its GPUs under {limits.idle_gpu_util_pct:g} % for {timeout:g} s"
        common = {"job_id": job.job_id, "causation_id": heartbeat.id}
        decided += [Append(keys.events, m.JobCancelRequested(reason=why, **common)), *_stops(keys, job, "idle", common)]
    return decided


def _idle(beat: m.NodeHeartbeat | None, gpu_ids: Sequence[int], limits: Limits) -> bool:
    if beat is None:
        return False
    readings = {gpu.index: gpu.utilization_pct for gpu in beat.gpus}
    return all((util := readings.get(index)) is not None and util < limits.idle_gpu_util_pct for index in gpu_ids)


def lost_nodes(state: State, last_heard: Mapping[str, datetime], limits: Limits, now: datetime) -> list[str]:
    """Nodes that are up in the log but have not been heard from for the node timeout."""
    deadline = timedelta(seconds=limits.node_timeout_s)
    return [
        name for name, node in sorted(state.nodes.items()) if node.up and now - last_heard.get(name, now) > deadline
    ]


def runner_silent(node: str, runner_heard: Mapping[str, datetime], limits: Limits, now: datetime) -> bool:
    """Whether the node's runner, heard from before, has been silent for the node timeout."""
    heard = runner_heard.get(node)
    return heard is not None and now - heard > timedelta(seconds=limits.node_timeout_s)


def lost_runners(
    state: State,
    runner_heard: Mapping[str, datetime],
    last_heard: Mapping[str, datetime],
    limits: Limits,
    now: datetime,
) -> list[str]:
    """Nodes up in the log whose runner has stopped sending heartbeats while the node itself is
    still heard from (else the node is lost as a whole): nothing there can start, watch or stop
    a job."""
    alive = timedelta(seconds=limits.node_timeout_s / 2)
    return [
        name
        for name, node in sorted(state.nodes.items())
        if node.up
        and runner_silent(name, runner_heard, limits, now)
        and now - last_heard.get(name, now - 2 * alive) <= alive
    ]


def lose_node(
    state: State, keys: Keys, node: str, cause: m.Message, reason: m.NodeLossReason = m.NodeLossReason.NODE_LOST
) -> list[Append]:
    """Declare a node lost (``reason``: node_lost, or runner_lost when only its runner went
    silent): each of its jobs runs again elsewhere (from its last checkpoint) while it has
    retries left, else fails. The node's runner, should it come back, is told to stop the old
    attempts, whose reports the log ignores anyway."""
    what = "its runner" if reason == m.NodeLossReason.RUNNER_LOST else f"node {node}"
    decided: list[Append] = []
    for job in sorted(state.jobs.values(), key=lambda j: j.seq):
        if job.node == node and job.stopping:
            decided.append(_stopped(keys, job, reason, cause))  # no report will come: stop waiting
            continue
        if job.status not in HOLDS_GPUS or not job.runs_on(node):
            continue
        # An attempt that never ran (a rank had not started: it may have been placed on the node
        # in the moments before its loss was known) costs the job none of its retries.
        never_ran = job.status == JobStatus.scheduled
        decided.append(_retry_or_fail(keys, job, reason, f"{what} stopped sending heartbeats", cause, never_ran))
        # Every rank is told to stop: the others now, this node's should it come back.
        decided += _stops(keys, job, "preempt", {"job_id": job.job_id, "causation_id": cause.id})
    decided.append(Append(keys.events, m.NodeLost(node=node, reason=reason, causation_id=cause.id)))
    return decided


def _stopped(keys: Keys, job: Job, reason: str, cause: m.Message) -> Append:
    """An attempt being stopped whose end nobody will report: the job goes on from the last
    checkpoint the log knows of."""
    stopped = m.JobStopped(
        attempt=job.attempt,
        last_checkpoint=job.last_checkpoint,
        step=job.checkpoint_step,
        reason=reason,
        job_id=job.job_id,
        causation_id=cause.id,
    )
    return Append(keys.events, stopped)


def _retry_or_fail(keys: Keys, job: Job, reason: str, message: str, cause: m.Message, free: bool = False) -> Append:
    """An attempt lost to the infrastructure: run the job again (from its last checkpoint) while
    it has retries left, else fail it. A ``free`` retry uses none of them."""
    common = {"job_id": job.job_id, "causation_id": cause.id}
    if free or job.retries < job.spec.max_retries:
        return Append(keys.events, m.JobRequeued(attempt=job.attempt, reason=reason, retry=not free, **common))
    return Append(keys.events, m.JobFailed(attempt=job.attempt, reason=reason, message=message, **common))


def node_changes(state: State, heartbeat: m.NodeHeartbeat) -> list[m.Message]:
    """A node.joined fact when a node is new, returns, or reports a different inventory. A
    degraded reading (NVML errors) says nothing about the inventory, and GPUs that jobs still
    hold cannot leave it."""
    if heartbeat.degraded:
        return []
    known = state.nodes.get(heartbeat.node)
    inventory = [
        m.GpuInfo(index=g.index, uuid=g.uuid, name=g.name, memory_total_mb=g.memory_total_mb) for g in heartbeat.gpus
    ]
    if (
        known is not None
        and known.up
        and known.gpus == inventory
        and known.simulated == heartbeat.simulated
        and known.addr == heartbeat.addr
    ):
        return []
    held = {int(key.split("/")[1]) for key in state.allocations if key.split("/")[0] == heartbeat.node}
    if not held <= {gpu.index for gpu in inventory}:
        return []
    return [m.NodeJoined(node=heartbeat.node, simulated=heartbeat.simulated, gpus=inventory, addr=heartbeat.addr)]


def usable_gpus(
    state: State, heartbeats: Mapping[str, m.NodeHeartbeat], limits: Limits, now: datetime
) -> dict[str, list[m.GpuSample]]:
    """Per node, the GPUs no job of ours holds and no foreign process uses, as last measured, on
    nodes heard from recently and fully (a degraded reading offers nothing). (The lists are
    shared: not to be changed.)"""
    threshold = limits.foreign_memory_threshold_mb
    live = in_service(state, heartbeats, limits.heartbeat_timeout_s, now)
    return {name: node_view(state, heartbeats[name], threshold).offered(state)[0] for name in live}


def _estimate(
    state: State,
    heartbeats: Mapping[str, m.NodeHeartbeat],
    limits: Limits,
    now: datetime,
    freeable: Mapping[str, list[m.GpuInfo]],
) -> Mapping[str, Estimate]:
    """Queue estimates over the nodes in service as a pass sees them (the memory each GPU could
    free), GPUs in use by another's processes free at no known time."""
    foreign = foreign_gpus(state, heartbeats, list(freeable), limits.foreign_memory_threshold_mb)
    return estimate_queue(state, now, gpus=freeable, foreign=foreign)


def place(job: Job, usable: Mapping[str, Sequence[m.GpuInfo]]) -> tuple[str, list[int]] | None:
    """The node and GPUs that fit the job best: fewest usable GPUs left idle on the node, then the
    most free memory, then by name and index, so that the same state gives the same answer."""
    spec = job.spec
    count = spec.gpu_count
    any_gpu = spec.node is None and not spec.gpu_model and spec.min_gpu_memory_mb is None and spec.gpu_ids is None
    # Nodes by the GPUs they would leave idle: only those that leave fewest are looked into
    # (at 1,000 GPUs, sorting every node's GPUs by memory had cost most of a decision)
    candidates = sorted((len(gpus) - count, name) for name, gpus in usable.items() if len(gpus) >= count)
    best: tuple[tuple[int, int, str], list[int]] | None = None
    for idle, name in candidates:
        if best is not None and idle > best[0][0]:
            break
        gpus = usable[name]
        fitting = gpus if any_gpu else matching(spec, name, gpus)
        if len(fitting) < count:
            continue
        chosen = (
            fitting if len(fitting) == count else sorted(fitting, key=lambda gpu: (-free_mb(gpu), gpu.index))[:count]
        )
        score = (idle, -sum(free_mb(gpu) for gpu in chosen), name)
        if best is None or score < best[0]:
            best = (score, sorted(gpu.index for gpu in chosen))
    return None if best is None else (best[0][2], best[1])


Placement = list[tuple[str, list[int]]]  # (node, GPU indices) of each rank, rank 0 first
_ANYWHERE: frozenset[str] = frozenset({"*"})  # (a checkpoint no node can read, given up on)


def _resumable_on(
    state: State, job: Job, heartbeats: Mapping[str, m.NodeHeartbeat], limits: Limits
) -> frozenset[str] | None:
    """The nodes where the job may run next: None for anywhere (nothing to resume from); else
    those that can read its last checkpoint (every rank loads it). Empty when none of them is
    in service: it waits for the node that wrote it, unless lost checkpoints are restarted from
    zero (then ``_ANYWHERE``)."""
    if not job.last_checkpoint or job.checkpoint_node is None:
        return None
    able = readers(job.last_checkpoint, job.checkpoint_node, heartbeats)
    if any(node in able and state.nodes[node].up for node in state.nodes):
        return frozenset(able)
    return _ANYWHERE if limits.restart_lost_checkpoints else frozenset()


def _fresh_start(job: Job) -> str:
    return (
        f"its checkpoint {job.last_checkpoint} is on node {job.checkpoint_node}, which is lost,"
        " and no node in service shares that storage: starting from zero"
    )


def _only(gpus: Mapping[str, Sequence[m.GpuInfo]], where: frozenset[str] | None) -> Mapping[str, Sequence[m.GpuInfo]]:
    """The GPUs of the nodes the job may run on."""
    if where is None or where is _ANYWHERE:
        return gpus
    return {name: found for name, found in gpus.items() if name in where}


def place_job(state: State, job: Job, usable: Mapping[str, Sequence[m.GpuInfo]]) -> Placement | None:
    """Where the job's ranks fit best, all of them or none. A gang job takes the ``nodes`` best
    nodes by :func:`place`'s measure, rank 0 on the best that advertises an address."""
    if job.spec.nodes == 1:
        single = place(job, usable)
        return None if single is None else [single]
    options = []
    for name, gpus in usable.items():
        one = place(job, {name: gpus})
        if one is not None:
            chosen = [gpu for gpu in gpus if gpu.index in one[1]]
            options.append(((len(gpus) - len(chosen), -sum(free_mb(gpu) for gpu in chosen), name), one))
    if len(options) < job.spec.nodes:
        return None
    options.sort()
    first = next((i for i, (_, (name, _)) in enumerate(options) if state.nodes[name].addr), None)
    if first is None:
        return None  # no node of these could be its rank 0: none says where to reach it
    ranks = [options[first][1]] + [one for i, (_, one) in enumerate(options) if i != first]
    return ranks[: job.spec.nodes]


def could_place(state: State, job: Job, gpus: Mapping[str, Sequence[m.GpuInfo]]) -> bool:
    """Whether :func:`place_job` would find the job a placement on these GPUs (without working
    out the best one: a pass asks it of every GPU the running jobs could free)."""
    spec = job.spec
    count = spec.gpu_count
    any_gpu = spec.node is None and not spec.gpu_model and spec.min_gpu_memory_mb is None and spec.gpu_ids is None
    fitting = (
        name
        for name, found in gpus.items()
        if len(found) >= count and (any_gpu or len(matching(spec, name, found)) >= count)
    )
    if spec.nodes == 1:
        return next(fitting, None) is not None
    names = list(fitting)
    return len(names) >= spec.nodes and any(state.nodes[name].addr for name in names)


def _master_port(
    state: State, job: Job, attempt: int, node: str, limits: Limits, taken: dict[str, set[int]]
) -> int | None:
    """torchrun's rendezvous port for the attempt on its rank 0 node: one that no other attempt
    there holds, from a start that depends on the job (so that a job's attempt after a stopped
    one, still exiting, is unlikely to meet its port). None for a process of its own (one GPU on
    one node, or a deploy)."""
    if job.spec.task_type == "deploy" or job.spec.total_gpus == 1:
        return None
    ports = limits.rendezvous_ports
    if node not in taken:
        holders = {holder for key, holder in state.allocations.items() if key.partition("/")[0] == node}
        taken[node] = {port for holder in holders if (port := state.jobs[holder].master_port) is not None}
    used = taken[node]
    first = int(job.job_id[:8], 16) if len(job.job_id) >= 8 and _is_hex(job.job_id[:8]) else sum(map(ord, job.job_id))
    for step in range(len(ports)):
        port = ports[(first + attempt + step) % len(ports)]
        if port not in used:
            used.add(port)
            return port
    return None  # every port of the range is held: torchrun's default


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def schedule(
    state: State,
    keys: Keys,
    heartbeats: Mapping[str, m.NodeHeartbeat],
    limits: Limits,
    now: datetime,
    cause: m.Message,
    *,
    accepted: m.JobAccepted | None = None,
) -> list[Append]:
    """One scheduling pass: start queued jobs in order while they fit; the first that does not
    fit, but would on the GPUs of the nodes offering GPUs now once they are free, blocks those
    behind it (strict priority order) unless it may preempt running jobs to start at once. One
    that could not start even then (it needs a node that is lost, silent or reads degraded)
    blocks no one. With backfill on, a job behind a blocked one may still start if its time
    limit ends before the blocked job's estimated start. A job over its GPU quota blocks no one;
    with borrowing on, it starts at the end of the pass on GPUs left over, if no job within quota
    was blocked."""
    if accepted is None and next(state.queue_iter(), None) is None:
        return []  # nothing waits (a pass after each heartbeat: what the GPUs read costs at 1,000 GPUs)
    offered = usable_gpus(state, heartbeats, limits, now)
    usable = {name: list(gpus) for name, gpus in offered.items()}  # less what this pass hands out
    quotas = bool(state.quotas.users or state.quotas.teams)
    # Jobs over quota block no one: the owners who hold their whole quota (or whose teams do) are
    # left out of the walk, and borrowers are looked for after it. (With backfill, the jobs looked
    # at behind a blocked one are counted, those over quota among them.)
    skip = state.full_owners() if quotas and not limits.backfill else frozenset()
    queue = _queue(state, limits, accepted, skip)
    freeable: dict[str, list[m.GpuInfo]] | None = None  # worked out at the first job that does not fit
    # Requests that neither fit nor block in this pass: a queue of thousands pinned to a lost node
    # is passed over at a set lookup each (what is usable only shrinks during a pass)
    passed_over: set[tuple[tuple[object, ...], frozenset[str] | None]] = set()
    decisions: list[Append] = []
    backfill_until: float | None = None  # seconds from now by which a backfilled job must end
    taken: dict[str, int] = {}  # GPUs handed out within quota in this pass, per user and team
    ports: dict[str, set[int]] = {}  # rendezvous ports held per node, as handed out in this pass
    blocked_in_quota = False
    victims = _Victims(state, limits, now) if limits.preemption or limits.borrowing else None
    started: dict[str, int] = {}  # jobs of each sweep started in this pass
    for job in queue:
        if not any(usable.values()) and (victims is None or not victims.any()):
            break  # nothing left to hand out
        if backfill_until is not None and (
            job.spec.time_limit_s is None or job.spec.time_limit_s + limits.backfill_margin_s > backfill_until
        ):
            continue  # it might outlast the blocked job's start
        where = _resumable_on(state, job, heartbeats, limits)
        if where is not None and not where:
            continue  # its checkpoint is on a lost node no other shares: it waits for that node
        request = (placement_request(job), where)
        if passed_over and request in passed_over:
            continue
        if quotas and gpu_quota_block(state, job, taken):
            continue  # waits for its quota: it holds up no one
        if job.sweep_id is not None and _sweep_full(state, job, started):
            continue  # its sweep runs as many jobs as it may: it holds up no one
        fresh = None if where != _ANYWHERE else _fresh_start(job)
        placement = place_job(state, job, _only(usable, where))
        if placement is None and backfill_until is not None:
            continue  # a backfill candidate that does not fit
        preempted: list[Job] = []
        if placement is None:
            if freeable is None:
                freeable = freeable_gpus(state, heartbeats, offered, limits.foreign_memory_threshold_mb)
            if not could_place(state, job, _only(freeable, where)):
                passed_over.add(request)
                continue  # it waits on nothing our jobs hold: it holds up no one
            found = victims.choose(job, _only(usable, where), _only(freeable, where)) if victims is not None else None
            if found is None:
                blocked_in_quota = True
                blocked = (
                    _estimate(state, heartbeats, limits, now, freeable).get(job.job_id) if limits.backfill else None
                )
                if blocked is None or blocked.start_in_s is None:
                    break  # strict order (or nothing proves that a job behind would not delay it)
                backfill_until = blocked.start_in_s
                queue = itertools.islice(queue, BACKFILL_SCAN)
                continue
            (node, gpu_ids), preempted = found
            placement = [(node, gpu_ids)]
            decisions += _preempt(keys, job, preempted, victims, cause) if victims is not None else []
        if quotas:
            charge(taken, job)
        if job.sweep_id is not None:
            started[job.sweep_id] = started.get(job.sweep_id, 0) + 1
        decisions += _start(state, keys, limits, job, placement, cause, usable, ports, preempted=preempted, fresh=fresh)
    if quotas and limits.borrowing and not blocked_in_quota and any(usable.values()):
        decisions += _borrow(state, keys, limits, accepted, cause, usable, decisions, ports, heartbeats)
    return decisions


def _borrow(
    state: State,
    keys: Keys,
    limits: Limits,
    accepted: m.JobAccepted | None,
    cause: m.Message,
    usable: dict[str, list[m.GpuSample]],
    decided: Sequence[Append],
    ports: dict[str, set[int]],
    heartbeats: Mapping[str, m.NodeHeartbeat],
) -> list[Append]:
    """Jobs over quota started, in queue order, on the GPUs a pass left over (no job within quota
    was blocked). Every job of the queue not started by the pass is tried: one within quota that
    did not start did not fit then, and fits even less now."""
    started = {append.message.job_id for append in decided if isinstance(append.message, m.JobScheduled)}
    decisions: list[Append] = []
    for job in _queue(state, limits, accepted, frozenset()):
        if not any(usable.values()):
            break
        if job.job_id in started or not job.spec.preemptible or job.preemptions >= limits.max_preemptions:
            continue
        where = _resumable_on(state, job, heartbeats, limits)
        if where is not None and not where:
            continue
        placement = place_job(state, job, _only(usable, where))
        if placement is not None:
            fresh = None if where != _ANYWHERE else _fresh_start(job)
            decisions += _start(state, keys, limits, job, placement, cause, usable, ports, borrowing=True, fresh=fresh)
    return decisions


def _start(
    state: State,
    keys: Keys,
    limits: Limits,
    job: Job,
    placement: Placement,
    cause: m.Message,
    usable: dict[str, list[m.GpuSample]],
    ports: dict[str, set[int]],
    *,
    borrowing: bool = False,
    preempted: Sequence[Job] = (),
    fresh: str | None = None,
) -> list[Append]:
    """The job's next attempt: its facts, and a start to the runner of each of its ranks (from
    its last checkpoint, unless ``fresh`` says why not)."""
    for node, gpu_ids in placement:
        usable[node] = [gpu for gpu in usable.get(node, []) if gpu.index not in gpu_ids]
    attempt = job.attempt + 1
    common = {"job_id": job.job_id, "causation_id": cause.id}
    (node, gpu_ids), peers = placement[0], [m.Rank(node=n, gpu_ids=ids) for n, ids in placement[1:]]
    master_addr = state.nodes[node].addr if peers else None
    master_port = _master_port(state, job, attempt, node, limits, ports)
    scheduled = m.JobScheduled(
        node=node,
        gpu_ids=gpu_ids,
        attempt=attempt,
        borrowing=borrowing,
        preempted=[victim.job_id for victim in preempted],
        peers=peers,
        master_addr=master_addr,
        master_port=master_port,
        fresh_start=fresh,
        **common,
    )
    resume_from = None if fresh else job.last_checkpoint
    starts = [
        Append(
            keys.node(rank_node),
            m.StartJob(
                attempt=attempt,
                node=rank_node,
                gpu_ids=rank_gpus,
                spec=job.spec,
                resume_from=resume_from,
                rank=rank,
                master_addr=master_addr,
                master_port=master_port,
                **common,
            ),
        )
        for rank, (rank_node, rank_gpus) in enumerate(placement)
    ]
    return [Append(keys.events, scheduled), *starts]


def _preempt(keys: Keys, job: Job, preempted: Sequence[Job], victims: _Victims, cause: m.Message) -> list[Append]:
    """Facts and stop commands for the victims of one preemption (before the preemptor's start
    in the node's stream: its runner starts it once their process groups are gone)."""
    decided: list[Append] = []
    for victim in preempted:
        victims.taken.add(victim.job_id)
        reason = "borrowing" if victim.borrowing else "priority"
        step = victim.progress.step if victim.progress is not None else None
        common = {"job_id": victim.job_id, "causation_id": cause.id}
        fact = m.JobPreempted(attempt=victim.attempt, by_job_id=job.job_id, reason=reason, step=step, **common)
        decided.append(Append(keys.events, fact))
        decided += _stops(keys, victim, "preempt", common)
    return decided


class _Victims:
    """Running jobs a blocked job may preempt, found once per pass, and the choice among them."""

    def __init__(self, state: State, limits: Limits, now: datetime) -> None:
        self.state, self.limits, self.now = state, limits, now
        self.policy: Policy = limits
        self.taken: set[str] = set()  # preempted earlier in this pass
        self._running: list[Job] | None = None

    @property
    def running(self) -> list[Job]:
        if self._running is None:
            holders = dict.fromkeys(self.state.allocations.values())  # each job once, in a set order
            self._running = [job for job in map(self.state.jobs.__getitem__, holders) if self.policy.preemptible(job)]
        return self._running

    def any(self) -> bool:
        if self._running is not None:
            return any(job.job_id not in self.taken for job in self._running)
        # Asked by every pass while all GPUs are held: the first holder that may be preempted
        # answers it, without listing them all.
        jobs = self.state.jobs
        return any(
            holder not in self.taken and self.policy.preemptible(jobs[holder])
            for holder in self.state.allocations.values()
        )

    def may_preempt(self, job: Job, victim: Job) -> bool:
        return victim.job_id not in self.taken and self.policy.preemptible_in(job, victim, self.now) == 0

    def loss(self, victim: Job) -> tuple[int, int, float, float]:
        """What preempting a victim costs, lowest first: borrowing ones first, then by priority,
        by the GPU-seconds run since its last checkpoint, and the most recently started."""
        since = max(filter(None, (victim.started_at, victim.checkpoint_at)))
        gpu_seconds = max(0.0, (self.now - since).total_seconds()) * victim.gpu_total
        started = victim.started_at.timestamp() if victim.started_at else 0.0
        return (0 if self.limits.borrowing and victim.borrowing else 1, victim.priority, gpu_seconds, -started)

    def choose(
        self, job: Job, usable: Mapping[str, Sequence[m.GpuInfo]], freeable: Mapping[str, Sequence[m.GpuInfo]]
    ) -> tuple[tuple[str, list[int]], list[Job]] | None:
        """The placement and victims that let the job start now at the least loss, or None when
        no set of victims it may preempt would. Never a useless victim: each one chosen is needed."""
        if job.spec.nodes > 1:
            return None  # a gang job waits for its nodes: it preempts no one
        candidates: dict[str, list[Job]] = {}
        for victim in self.running:
            if self.may_preempt(job, victim):
                for rank in victim.ranks:
                    if rank.node in freeable:
                        candidates.setdefault(rank.node, []).append(victim)
        best: tuple[tuple[object, ...], tuple[str, list[int]], list[Job]] | None = None
        for node, found in candidates.items():
            found.sort(key=self.loss)
            gpus = {gpu.index: gpu for gpu in freeable[node]}
            pool = list(usable.get(node, []))
            chosen: list[Job] = []
            placement = None
            for victim in found:
                chosen.append(victim)
                pool += [gpus[i] for i in victim.gpus_on(node) if i in gpus]
                placement = place(job, {node: pool})
                if placement is not None:
                    break
            if placement is None:
                continue
            for victim in sorted(chosen, key=self.loss, reverse=True):  # drop the ones not needed
                rest = [v for v in chosen if v is not victim]
                without = list(usable.get(node, [])) + [gpus[i] for v in rest for i in v.gpus_on(node) if i in gpus]
                if len(rest) and (fit := place(job, {node: without})) is not None:
                    chosen, placement = rest, fit
            cost = (
                sum(1 for v in chosen if not (self.limits.borrowing and v.borrowing)),
                max(v.priority for v in chosen),
                sum(self.loss(v)[2] for v in chosen),
                len(chosen),
                node,
            )
            if best is None or cost < best[0]:
                best = (cost, placement, chosen)
        return None if best is None else (best[1], best[2])
