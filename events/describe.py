"""Log entries in words, for the timeline and the replay table: who did what, and why."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from events import messages as m
from events.bus import Entry
from events.codec import DecodeError, decode, encode, entry_type
from events.quotas import Quotas


def _by(message: m.Message) -> str:
    return f" by {message.actor}" if message.actor else ""


def _short(job_id: str | None) -> str:
    return (job_id or "?")[:12]


def _gpus(gpu_ids: list[int]) -> str:
    return f"GPU{'s' if len(gpu_ids) != 1 else ''} {', '.join(map(str, gpu_ids))}"


def _accepted(e: m.JobAccepted) -> str:
    spec = e.spec
    return (
        f"submitted{_by(e)}: {spec.task_type}, model {spec.model_path}, priority {spec.priority}, "
        f"{spec.gpu_count} GPU{'s' if spec.gpu_count != 1 else ''}"
    )


def _queued(e: m.JobQueued) -> str:
    behind = f", behind job {_short(e.behind_job_id)}" if e.behind_job_id else ", first in line"
    return f"queued at position {e.position}{behind}"


def _scheduled(e: m.JobScheduled) -> str:
    text = f"placed on node {e.node}, {_gpus(e.gpu_ids)} (attempt {e.attempt})"
    if e.peers:
        others = "; ".join(f"rank {i} on node {r.node}, {_gpus(r.gpu_ids)}" for i, r in enumerate(e.peers, 1))
        text = f"placed on {len(e.peers) + 1} nodes: rank 0 on node {e.node}, {_gpus(e.gpu_ids)}; {others}"
        text += f" (attempt {e.attempt}, rendezvous {e.master_addr}:{e.master_port})"
    if e.fresh_start:
        text += f"; from zero: {e.fresh_start}"
    if e.borrowing:
        text += ", borrowing: over its quota, on GPUs no job within quota waited for"
    if e.preempted:
        text += f", preempting job{'s' if len(e.preempted) != 1 else ''} {', '.join(map(_short, e.preempted))}"
    return text


_PREEMPTED_FOR = {"priority": "a higher priority", "borrowing": "within its quota; this one was borrowing"}


def _preempted(e: m.JobPreempted) -> str:
    step = f" at step {e.step}" if e.step is not None else " before its first step"
    return f"preempted by job {_short(e.by_job_id)} ({_PREEMPTED_FOR.get(e.reason, e.reason)}){step}"


_STOPPED_WHY = {"node_lost": " (its node was lost)", "runner_lost": " (its runner was lost)"}


def _stopped(e: m.JobStopped) -> str:
    why = _STOPPED_WHY.get(e.reason, "")
    if e.last_checkpoint:
        step = f" at step {e.step}" if e.step is not None else ""
        return f"stopped{why}; checkpoint{step} saved: {e.last_checkpoint}"
    return f"stopped{why} without a new checkpoint"


def _resumed(e: m.JobResumed) -> str:
    behind = f", behind job {_short(e.behind_job_id)}" if e.behind_job_id else ", first in line"
    return f"resumed{_by(e)}: queued again at position {e.position}{behind}"


def _table(quotas: Quotas) -> str:
    users, teams = len(quotas.users), len(quotas.teams)
    return f"{users} user{'s' if users != 1 else ''}, {teams} team{'s' if teams != 1 else ''}"


def _quotas_changed(e: m.QuotasChanged) -> str:
    if e.from_config:
        return f"quotas set from the QUOTAS setting: {_table(e.quotas)}"
    return f"quotas changed{_by(e)}: {_table(e.quotas)}"


def _started(e: m.JobStarted) -> str:
    rank = f"rank {e.rank} " if e.rank else ""
    return (
        f"{rank}started on {e.node} as pid {e.pid} with CUDA_VISIBLE_DEVICES={e.cuda_visible_devices}"
        f" (attempt {e.attempt})"
    )


def _rank_ended(e: m.RankEnded) -> str:
    if e.failed:
        message = f": {e.message}" if e.message else ""
        return f"rank {e.rank} on node {e.node} failed ({e.reason}, exit code {e.exit_code}){message}"
    return f"rank {e.rank} on node {e.node} ended (exit code {e.exit_code})"


def _progress(e: m.JobProgress) -> str:
    loss = f", loss {e.loss:.4g}" if e.loss is not None else ""
    return f"step {e.step}/{e.max_steps}{loss}"


def _failed(e: m.JobFailed) -> str:
    message = f": {e.message}" if e.message else ""
    return f"failed ({e.reason}, exit code {e.exit_code}){message}"


def _cancelled(e: m.JobCancelled) -> str:
    checkpoint = f", checkpoint kept at {e.last_checkpoint}" if e.last_checkpoint else ""
    return f"cancelled{_by(e) if e.attempt is None else ''}{checkpoint}"


def _cancel_requested(e: m.JobCancelRequested) -> str:
    return f"cancel requested{_by(e)}" + (f": {e.reason}" if e.reason else "")


_TEXT: dict[type[m.Message], Callable[[Any], str]] = {
    # Requests, as the commands stream keeps them (``replay --commands``)
    m.SubmitJob: lambda e: f"submit asked{_by(e)}: {e.spec.task_type}, priority {e.spec.priority}",
    m.CancelJob: lambda e: f"cancel asked{_by(e)}" + (f": {e.reason}" if e.reason else ""),
    m.SetPriority: lambda e: f"priority {e.priority} asked{_by(e)}",
    m.ReleaseJob: lambda e: f"release asked{_by(e)}",
    m.DeleteJob: lambda e: f"delete asked{_by(e)}",
    m.RequestExport: lambda e: f"export asked{_by(e)}",
    m.ProcessQueue: lambda e: f"scheduling pass asked{_by(e)}",
    m.SuspendJob: lambda e: f"suspend asked{_by(e)}",
    m.ResumeJob: lambda e: f"resume asked{_by(e)}",
    m.SetQuotas: lambda e: (
        f"quotas asked{_by(e)}: {_table(e.quotas)}" + (" (the QUOTAS setting)" if e.from_config else "")
    ),
    m.CreateSweep: lambda e: f"sweep {e.sweep_id} asked{_by(e)}: {len(e.job_ids)} points",
    m.CancelSweep: lambda e: f"cancel of sweep {e.sweep_id} asked{_by(e)}",
    m.SweepCreated: lambda e: (
        f"sweep {e.sweep_id} created{_by(e)}: {len(e.job_ids)} points over {', '.join(e.grid)}"
        + (f", at most {e.max_concurrent} at once" if e.max_concurrent else "")
    ),
    m.SetHalfLife: lambda e: f"fair share's half-life of {e.half_life_s / 3600:g} h asked{_by(e)}",
    m.JobAccepted: _accepted,
    m.JobRejected: lambda e: f"rejected ({e.reason}): {e.message}",
    m.JobQueued: _queued,
    m.JobHeld: lambda e: "held: it is queued once released (POST /jobs/{id}/start)",
    m.JobWaiting: lambda e: f"waiting for {', '.join(e.on)} to end before it queues",
    m.DependenciesMet: lambda e: "dependencies met" + (f": it serves {e.model_path}" if e.model_path else ""),
    m.JobScheduled: _scheduled,
    m.JobStarted: _started,
    m.JobProgress: _progress,
    m.CheckpointSaved: lambda e: f"checkpoint at step {e.step}: {e.path}",
    m.JobServing: lambda e: f"serving at {e.endpoint}",
    m.JobSucceeded: lambda e: f"completed (exit code {e.exit_code})",
    m.JobFailed: _failed,
    m.RankEnded: _rank_ended,
    m.JobLost: lambda e: (
        f"attempt {e.attempt} ended while no runner watched it" + (f": {e.message}" if e.message else "")
    ),
    m.JobRequeued: lambda e: f"attempt {e.attempt} lost ({e.reason}); queued again to retry",
    m.JobPriorityChanged: lambda e: f"priority changed from {e.previous} to {e.priority}{_by(e)}",
    m.JobDeleted: lambda e: f"deleted{_by(e)}",
    m.JobCancelRequested: _cancel_requested,
    m.JobCancelled: _cancelled,
    m.JobPreempted: _preempted,
    m.JobSuspended: lambda e: f"suspended{_by(e)}: its GPUs are freed; it waits to be resumed",
    m.JobStopped: _stopped,
    m.JobResumed: _resumed,
    m.QuotasChanged: _quotas_changed,
    m.HalfLifeChanged: lambda e: f"fair share's half-life of usage set to {e.half_life_s / 3600:g} h",
    m.ExportRequested: lambda e: f"export requested{_by(e)}: merge {e.checkpoint}",
    m.ExportStarted: lambda e: "export started",
    m.ExportCompleted: lambda e: f"exported to {e.path}",
    m.ExportFailed: lambda e: f"export failed: {e.message}",
    m.NodeJoined: lambda e: f"node {e.node} joined with {len(e.gpus)} GPU{'s' if len(e.gpus) != 1 else ''}",
    m.NodeLost: lambda e: (
        f"node {e.node} lost ({'its runner stopped' if e.reason == 'runner_lost' else 'no heartbeat'})"
    ),
}


def describe(message: m.Message) -> str:
    text = _TEXT.get(type(message))
    return text(message) if text else message.type


def render(entry: Entry) -> dict[str, Any]:
    """An entry as a JSON object: its id, the message as this release reads it (older versions
    upcast), and its chain hash. An entry this release cannot read is shown raw, with the reason."""
    try:
        message = decode(entry.fields)
    except DecodeError as exc:
        return {
            "entry_id": entry.entry_id,
            "type": entry_type(entry.fields) or None,
            "undecodable": str(exc),
            "raw": entry.fields,
        }
    record: dict[str, Any] = {"entry_id": entry.entry_id, **json.loads(encode(message)["data"])}
    if "hash" in entry.fields:
        record["hash"] = entry.fields["hash"]
    return record
