"""How each event of the log changes the state: one function per event type, in ``HANDLERS``.

Each checks that the event applies (else raises IllegalTransition, having changed nothing) and
changes the records; ``State.apply`` keeps its indexes and savepoints around them.

(Longer than most modules here: it is one short function per event type and their table, read
side by side with events/messages.py.)"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from events import messages as m
from events.errors import IllegalTransition
from events.quotas import Usage, team_key, user_key
from events.records import (
    HOLDS_GPUS,
    TERMINAL,
    WAITING,
    YIELDED,
    Export,
    ExportStatus,
    Job,
    JobStatus,
    Node,
    PeerCommand,
    Progress,
    Sweep,
    gpu_key,
)

if TYPE_CHECKING:
    from events.state import State


def _job(state: State, event: m.Message, *allowed: JobStatus) -> Job:
    job = state.jobs.get(event.job_id or "")
    if job is None:
        raise IllegalTransition(f"{event.type} for unknown job {event.job_id!r}")
    if allowed and job.status not in allowed:
        raise IllegalTransition(f"{event.type} is illegal for job {job.job_id} in status {job.status}")
    return job


def _is_stale(state: State, job: Job, attempt: int | None) -> bool:
    """A report of an attempt that is not the current one, or of one already ended by a requeue
    (the job waits for its next attempt: nothing of ours runs it) or by the scheduler (its node
    was lost with no retries left: the paused node's runner reports on when it comes back)."""
    if attempt is None:
        return False
    if attempt == job.attempt and job.stopping:
        return False  # on its way out after giving up its GPUs: its reports still count
    ended = job.status in WAITING or job.status in TERMINAL or job.status in YIELDED
    if attempt != job.attempt or (ended and job.attempt > 0):
        state.stale_reports += 1
        return True
    return False


def _reported(state: State, event: m.Message, *allowed: JobStatus) -> Job | None:
    """The job a runner reports on, or None for a report of a superseded attempt (ignored). An
    attempt being stopped after giving up its GPUs still reports, whatever the job's status."""
    job = _job(state, event)
    if _is_stale(state, job, getattr(event, "attempt", None)):
        return None
    if job.stopping and getattr(event, "attempt", None) == job.attempt:
        return job
    if job.status == JobStatus.scheduled and JobStatus.running in allowed and job.ranks_started:
        return job  # a gang job's rank 0 may report before every other rank's start is in
    return _job(state, event, *allowed)


def _credit(state: State, job: Job, at: datetime) -> None:
    """Credit the GPU time a job has held since it was last credited to its owner and team."""
    if job.status not in HOLDS_GPUS or job.usage_mark is None:
        return
    seconds = (at - job.usage_mark).total_seconds()
    if seconds <= 0:
        return
    job.usage_mark = at
    used = seconds * job.gpu_total
    keys = (user_key(job.owner),) if job.team is None else (user_key(job.owner), team_key(job.team))
    for key in keys:
        usage = state.usage.get(key)
        if usage is None:
            usage = state.usage[key] = Usage()
        usage.add(used, at, state.half_life_s)


def _release(state: State, job: Job, at: datetime) -> None:
    _credit(state, job, at)
    for rank in job.ranks:
        for index in rank.gpu_ids:
            if state.allocations.get(gpu_key(rank.node, index)) == job.job_id:
                del state.allocations[gpu_key(rank.node, index)]
                state.held_changed(rank.node)


def _finish(state: State, job: Job, entry_id: str, event: m.Message, status: JobStatus) -> None:
    _release(state, job, event.at)
    job.stopping = False
    job.status = status
    job.finished_at = event.at
    job.last_entry_id = entry_id


def _accepted(state: State, entry_id: str, event: m.JobAccepted) -> None:
    if not event.job_id or event.job_id in state.jobs:
        raise IllegalTransition(f"job {event.job_id!r} was already accepted")
    state.accepted += 1
    state.jobs[event.job_id] = new_job(event, state.accepted, entry_id)


def new_job(event: m.JobAccepted, seq: int, entry_id: str) -> Job:
    """The record a job.accepted event creates."""
    return Job(
        job_id=event.job_id or "",
        spec=event.spec,
        priority=event.spec.priority,
        seq=seq,
        submitted_at=event.at,
        submitted_by=event.actor,
        team=event.team,
        first_entry_id=entry_id,
        last_entry_id=entry_id,
        sweep_id=event.sweep_id,
        point=event.point,
    )


def _sweep_created(state: State, entry_id: str, event: m.SweepCreated) -> None:
    if event.sweep_id in state.sweeps:
        raise IllegalTransition(f"sweep {event.sweep_id!r} was already created")
    state.sweeps[event.sweep_id] = Sweep(
        sweep_id=event.sweep_id,
        name=event.name,
        grid=event.grid,
        max_concurrent=event.max_concurrent,
        job_ids=event.job_ids,
        created_at=event.at,
        created_by=event.actor,
    )


def _rejected(state: State, entry_id: str, event: m.JobRejected) -> None:
    job = _job(state, event, JobStatus.pending)
    job.reason, job.message = event.reason, event.message
    _finish(state, job, entry_id, event, JobStatus.failed)


def _held(state: State, entry_id: str, event: m.JobHeld) -> None:
    job = _job(state, event, JobStatus.pending)
    job.status = JobStatus.held
    job.last_entry_id = entry_id


def _noted(state: State, entry_id: str, event: m.Message) -> None:
    """A notification about a job: part of its history (where its entries end), nothing more."""
    job = state.jobs.get(event.job_id or "")
    if job is not None:
        job.last_entry_id = entry_id


def _waiting(state: State, entry_id: str, event: m.JobWaiting) -> None:
    job = _job(state, event, JobStatus.pending)
    job.status = JobStatus.waiting
    job.last_entry_id = entry_id


def _dependencies_met(state: State, entry_id: str, event: m.DependenciesMet) -> None:
    job = _job(state, event, JobStatus.waiting, JobStatus.pending)
    job.status = JobStatus.pending  # queued or held by the next fact
    if event.model_path:
        job.spec = job.spec.model_copy(update={"model_path": event.model_path})
    job.last_entry_id = entry_id


def _queued(state: State, entry_id: str, event: m.JobQueued) -> None:
    job = _job(state, event, JobStatus.pending, JobStatus.held)
    job.status = JobStatus.queued
    job.queue_position_at_submit = event.position
    job.last_entry_id = entry_id


def _scheduled(state: State, entry_id: str, event: m.JobScheduled) -> None:
    job = _job(state, event, JobStatus.queued)
    ranks = [m.Rank(node=event.node, gpu_ids=event.gpu_ids), *event.peers]
    if len(ranks) != job.spec.nodes or len({rank.node for rank in ranks}) != len(ranks):
        raise IllegalTransition(f"job {job.job_id} needs {job.spec.nodes} distinct nodes, scheduled on {len(ranks)}")
    for rank in ranks:
        node = state.nodes.get(rank.node)
        if node is None or not node.up:
            raise IllegalTransition(f"job {job.job_id} scheduled on unknown or lost node {rank.node}")
        known = {gpu.index for gpu in node.gpus}
        for index in rank.gpu_ids:
            holder = state.allocations.get(gpu_key(rank.node, index))
            if index not in known or holder is not None:
                raise IllegalTransition(f"GPU {rank.node}/{index} is not free (held by {holder})")
    for rank in ranks:
        for index in rank.gpu_ids:
            state.allocations[gpu_key(rank.node, index)] = job.job_id
        state.held_changed(rank.node)
    job.status = JobStatus.scheduled
    job.node, job.gpu_ids, job.attempt = event.node, list(event.gpu_ids), event.attempt
    job.peers, job.ranks_started, job.master_port = list(event.peers), [], event.master_port
    if event.fresh_start:
        job.last_checkpoint = job.checkpoint_node = None
    job.peer_commands = []
    job.scheduled_at = job.usage_mark = event.at
    job.borrowing, job.preempted_jobs = event.borrowing, list(event.preempted)
    job.checkpoint_at = job.checkpoint_step = None
    job.last_entry_id = entry_id


def _started(state: State, entry_id: str, event: m.JobStarted) -> None:
    job = _reported(state, event, JobStatus.scheduled)
    if job is None:
        return
    if event.rank >= job.spec.nodes or event.rank in job.ranks_started:
        raise IllegalTransition(f"rank {event.rank} of job {job.job_id} started twice or is not one of its ranks")
    job.ranks_started.append(event.rank)
    if event.rank == 0:
        job.pid, job.run_dir, job.argv, job.env = event.pid, event.run_dir, list(event.argv), dict(event.env)
    else:
        started = PeerCommand(rank=event.rank, node=event.node, argv=list(event.argv), env=dict(event.env))
        job.peer_commands = sorted([*job.peer_commands, started], key=lambda peer: peer.rank)
    if len(job.ranks_started) == job.spec.nodes:  # a gang job runs once every rank has started
        _credit(state, job, event.at)
        job.status = JobStatus.running
        job.started_at = event.at
    job.last_entry_id = entry_id


def _rank_ended(state: State, entry_id: str, event: m.RankEnded) -> None:
    """Noted: for a failed rank, the scheduler's job.requeued or job.failed that follows ends
    the attempt (and stops its other ranks)."""
    job = _reported(state, event, *HOLDS_GPUS)
    if job is not None:
        job.last_entry_id = entry_id


def _progress(state: State, entry_id: str, event: m.JobProgress) -> None:
    job = _reported(state, event, JobStatus.running, JobStatus.serving)
    if job is None:
        return
    # (no usage credit here: a run of progress reports folds as its last one alone, see events.log)
    job.progress = Progress.model_validate({**event.payload(), "at": event.at})
    job.last_entry_id = entry_id


def _checkpoint(state: State, entry_id: str, event: m.CheckpointSaved) -> None:
    job = _reported(state, event, JobStatus.running)
    if job is None:
        return
    _credit(state, job, event.at)
    if event.path not in job.checkpoints:
        job.checkpoints.append(event.path)
    job.last_checkpoint, job.checkpoint_node = event.path, job.node
    job.checkpoint_at, job.checkpoint_step = event.at, event.step
    job.last_entry_id = entry_id


def _serving(state: State, entry_id: str, event: m.JobServing) -> None:
    job = _reported(state, event, JobStatus.running)
    if job is None:
        return
    _credit(state, job, event.at)
    job.status = JobStatus.serving
    job.endpoint = event.endpoint
    job.last_entry_id = entry_id


def _succeeded(state: State, entry_id: str, event: m.JobSucceeded) -> None:
    job = _reported(state, event, JobStatus.running)
    if job is None:
        return
    job.exit_code, job.run_dir, job.final = event.exit_code, event.run_dir, dict(event.final)
    if event.last_checkpoint:
        job.last_checkpoint = event.last_checkpoint
    _finish(state, job, entry_id, event, JobStatus.completed)


def _failed(state: State, entry_id: str, event: m.JobFailed) -> None:
    job = _reported(state, event, *(set(JobStatus) - TERMINAL))
    if job is None:
        return
    job.exit_code, job.reason, job.message = event.exit_code, event.reason, event.message
    job.stderr_tail = list(event.stderr_tail)
    _finish(state, job, entry_id, event, JobStatus.failed)


def _lost(state: State, entry_id: str, event: m.JobLost) -> None:
    """Noted: the scheduler's job.requeued, job.failed or (an attempt being stopped)
    job.stopped that follows ends the attempt."""
    job = _reported(state, event, *HOLDS_GPUS)
    if job is not None:
        job.last_entry_id = entry_id


def _requeued(state: State, entry_id: str, event: m.JobRequeued) -> None:
    job = _job(state, event, *HOLDS_GPUS)
    if event.attempt != job.attempt:
        raise IllegalTransition(f"job {job.job_id} requeued for attempt {event.attempt}, not {job.attempt}")
    _release(state, job, event.at)
    job.status = JobStatus.queued
    job.retries += 1 if event.retry else 0
    job.last_entry_id = entry_id


def _current_attempt(job: Job, event: m.JobPreempted | m.JobSuspended) -> None:
    if event.attempt != job.attempt or job.stopping:
        raise IllegalTransition(f"{event.type} for attempt {event.attempt} of job {job.job_id} (at {job.attempt})")


def _preempted(state: State, entry_id: str, event: m.JobPreempted) -> None:
    job = _job(state, event, JobStatus.running, JobStatus.serving)
    _current_attempt(job, event)
    _release(state, job, event.at)
    job.status = JobStatus.preempted
    job.stopping, job.borrowing = True, False
    job.preemptions += 1
    job.preempted_by = event.by_job_id
    job.last_entry_id = entry_id


def _suspended(state: State, entry_id: str, event: m.JobSuspended) -> None:
    job = _job(state, event, JobStatus.running)
    _current_attempt(job, event)
    _release(state, job, event.at)
    job.status = JobStatus.suspended
    job.stopping, job.borrowing = True, False
    job.last_entry_id = entry_id


def _stopped(state: State, entry_id: str, event: m.JobStopped) -> None:
    """The attempt that gave up its GPUs is gone: a preempted job is queued again (in its
    original place: its priority and submit order are unchanged)."""
    job = _job(state, event)
    if event.attempt != job.attempt or not job.stopping:
        state.stale_reports += 1
        return
    job.stopping = False
    job.exit_code = event.exit_code
    if event.last_checkpoint:
        if event.last_checkpoint not in job.checkpoints:
            job.checkpoints.append(event.last_checkpoint)
        job.last_checkpoint, job.checkpoint_node = event.last_checkpoint, job.node
        job.checkpoint_at, job.checkpoint_step = event.at, event.step
    if job.status == JobStatus.preempted:
        job.status = JobStatus.queued
    job.last_entry_id = entry_id


def _resumed(state: State, entry_id: str, event: m.JobResumed) -> None:
    job = _job(state, event, JobStatus.suspended)
    job.status = JobStatus.queued  # in the queue once its attempt is gone (see queue_key)
    job.last_entry_id = entry_id


def _quotas_changed(state: State, entry_id: str, event: m.QuotasChanged) -> None:
    state.quotas = event.quotas
    if event.from_config:
        state.config_quotas = event.quotas


def _half_life_changed(state: State, entry_id: str, event: m.HalfLifeChanged) -> None:
    for usage in state.usage.values():
        usage.rescaled(state.half_life_s, event.half_life_s, event.at)
    state.half_life_s = event.half_life_s


def _priority_changed(state: State, entry_id: str, event: m.JobPriorityChanged) -> None:
    job = _job(state, event, JobStatus.queued)
    job.priority = event.priority
    job.last_entry_id = entry_id


def _deleted(state: State, entry_id: str, event: m.JobDeleted) -> None:
    job = _job(state, event, *TERMINAL)
    if job.export.status in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"job {job.job_id} is being exported")
    del state.jobs[job.job_id]
    state.deleted.add(job.job_id)


def _cancel_requested(state: State, entry_id: str, event: m.JobCancelRequested) -> None:
    job = _job(state, event, *HOLDS_GPUS)
    job.cancel_requested = True
    job.last_entry_id = entry_id


def _cancelled(state: State, entry_id: str, event: m.JobCancelled) -> None:
    job = _reported(state, event, *(set(JobStatus) - TERMINAL))
    if job is None:
        return
    job.exit_code = event.exit_code
    if event.last_checkpoint:
        job.last_checkpoint = event.last_checkpoint
    _finish(state, job, entry_id, event, JobStatus.cancelled)


def _export_requested(state: State, entry_id: str, event: m.ExportRequested) -> None:
    job = _job(state, event, JobStatus.completed)
    if job.export.status in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"export of job {job.job_id} is already {job.export.status}")
    job.export = Export(status=ExportStatus.pending, checkpoint=event.checkpoint, output_dir=event.output_dir)
    job.last_entry_id = entry_id


def _export_started(state: State, entry_id: str, event: m.ExportStarted) -> None:
    job = _job(state, event)
    if job.export.status not in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"export.started for job {job.job_id} with export {job.export.status}")
    job.export.status = ExportStatus.running
    job.last_entry_id = entry_id


def _export_completed(state: State, entry_id: str, event: m.ExportCompleted) -> None:
    job = _job(state, event)
    if job.export.status != ExportStatus.running:
        raise IllegalTransition(f"export.completed for job {job.job_id} with export {job.export.status}")
    job.export.status, job.export.path = ExportStatus.completed, event.path
    job.last_entry_id = entry_id


def _export_failed(state: State, entry_id: str, event: m.ExportFailed) -> None:
    job = _job(state, event)
    if job.export.status not in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"export.failed for job {job.job_id} with export {job.export.status}")
    job.export.status, job.export.error = ExportStatus.failed, event.message
    job.last_entry_id = entry_id


def _node_joined(state: State, entry_id: str, event: m.NodeJoined) -> None:
    previous = state.nodes.get(event.node)
    if previous is not None and previous.up:
        held = {int(k.split("/")[1]) for k in state.allocations if k.split("/")[0] == event.node}
        if not held <= {gpu.index for gpu in event.gpus}:
            raise IllegalTransition(f"node {event.node} rejoined without GPUs its jobs hold")
    state.nodes[event.node] = Node(
        name=event.node,
        simulated=event.simulated,
        gpus=list(event.gpus),
        addr=event.addr,
        joined_at=event.at,
        epoch=previous.epoch + (0 if previous.up else 1) if previous else 1,
    )


def _node_lost(state: State, entry_id: str, event: m.NodeLost) -> None:
    node = state.nodes.get(event.node)
    if node is None or not node.up:
        raise IllegalTransition(f"node.lost for node {event.node} that is not up")
    if any(key.split("/")[0] == event.node for key in state.allocations):
        raise IllegalTransition(f"node {event.node} lost while jobs still hold its GPUs")
    node.up, node.lost_at = False, event.at


HANDLERS: dict[type[m.Message], Callable[[State, str, Any], None]] = {
    m.JobAccepted: _accepted,
    m.JobRejected: _rejected,
    m.JobQueued: _queued,
    m.JobHeld: _held,
    m.JobWaiting: _waiting,
    m.NotificationDelivered: _noted,
    m.NotificationFailed: _noted,
    m.SweepCreated: _sweep_created,
    m.DependenciesMet: _dependencies_met,
    m.JobScheduled: _scheduled,
    m.JobStarted: _started,
    m.JobProgress: _progress,
    m.CheckpointSaved: _checkpoint,
    m.JobServing: _serving,
    m.JobSucceeded: _succeeded,
    m.JobFailed: _failed,
    m.JobCancelRequested: _cancel_requested,
    m.JobPriorityChanged: _priority_changed,
    m.JobLost: _lost,
    m.RankEnded: _rank_ended,
    m.JobRequeued: _requeued,
    m.JobDeleted: _deleted,
    m.JobCancelled: _cancelled,
    m.ExportRequested: _export_requested,
    m.ExportStarted: _export_started,
    m.ExportCompleted: _export_completed,
    m.ExportFailed: _export_failed,
    m.NodeJoined: _node_joined,
    m.NodeLost: _node_lost,
    m.JobPreempted: _preempted,
    m.JobSuspended: _suspended,
    m.JobStopped: _stopped,
    m.JobResumed: _resumed,
    m.QuotasChanged: _quotas_changed,
    m.HalfLifeChanged: _half_life_changed,
}
