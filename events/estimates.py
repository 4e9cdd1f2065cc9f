"""When will a queued job start? Simulate the queue forward against the running jobs' remaining
time and the queued jobs' expected durations. Where a time is not known it says so: nothing is
invented."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta

from events.placement import matching
from events.state import HOLDS_GPUS, Job, JobStatus, State, gpu_key

UNKNOWN = math.inf


@dataclass(frozen=True)
class Estimate:
    start_in_s: float | None  # None: not known
    basis: str  # how it was estimated, or why it cannot be

    def view(self, computed_at: datetime, now: datetime) -> dict[str, object]:
        if self.start_in_s is None:
            return {"estimated_start_at": None, "estimated_wait_s": None, "estimate_basis": self.basis}
        start = computed_at + timedelta(seconds=self.start_in_s)
        wait = round(max(0.0, (start - now).total_seconds()), 1)
        return {"estimated_start_at": start.isoformat(), "estimated_wait_s": wait, "estimate_basis": self.basis}


def remaining_s(job: Job, now: datetime) -> float:
    """How long a job that holds GPUs will go on holding them."""
    if job.progress is not None and job.progress.remaining_s is not None and job.progress.at is not None:
        return max(0.0, job.progress.remaining_s - (now - job.progress.at).total_seconds())
    if job.spec.time_limit_s is not None:
        since = job.started_at or job.scheduled_at or now
        return max(0.0, job.spec.time_limit_s - (now - since).total_seconds())
    return UNKNOWN


def expected_duration_s(job: Job, history: dict[tuple[str, str], list[float]]) -> float:
    """A queued job's time limit, else the median duration of past jobs like it, else unknown."""
    if job.spec.time_limit_s is not None:
        return float(job.spec.time_limit_s)
    past = history.get((job.spec.task_type, job.spec.model_path))
    return statistics.median(past) if past else UNKNOWN


def durations(state: State) -> dict[tuple[str, str], list[float]]:
    found: dict[tuple[str, str], list[float]] = {}
    for job in state.jobs.values():
        if job.status == JobStatus.completed and job.started_at and job.finished_at:
            key = (job.spec.task_type, job.spec.model_path)
            found.setdefault(key, []).append((job.finished_at - job.started_at).total_seconds())
    return found


def placement_request(job: Job) -> tuple[object, ...]:
    """What decides which GPUs a job may use."""
    spec = job.spec
    ids = None if spec.gpu_ids is None else tuple(spec.gpu_ids)
    return (spec.gpu_count, spec.node, spec.gpu_model, spec.min_gpu_memory_mb, ids)


def estimate_queue(state: State, now: datetime) -> dict[str, Estimate]:
    """An estimate for every queued job, in start order (strict: none starts before the one ahead)."""
    free_at: dict[str, float] = {}  # GPU -> seconds from now until it is free
    for name, node in state.nodes.items():
        if node.up:
            for gpu in node.gpus:
                free_at[gpu_key(name, gpu.index)] = 0.0
    blockers: dict[str, str] = {}  # GPU -> the job whose end time is unknown
    for job in state.jobs.values():
        if job.status in HOLDS_GPUS:
            for index in job.gpu_ids:
                key = gpu_key(job.node or "", index)
                free_at[key] = remaining_s(job, now)
                if free_at[key] == UNKNOWN:
                    blockers[key] = job.job_id
    history = durations(state)
    estimates: dict[str, Estimate] = {}
    not_before = 0.0
    # Once one job's start is unknown, no GPU's time changes and every job behind it is unknown
    # too, for a reason that depends only on what it asks for: worked out once per request.
    unknown: dict[tuple[object, ...], Estimate] = {}
    for job in state.queue_iter():
        if not_before == UNKNOWN:
            request = placement_request(job)
            if request in unknown:
                estimates[job.job_id] = unknown[request]
                continue
        best: tuple[float, list[str]] | None = None
        for name, node in sorted(state.nodes.items()):
            if not node.up:
                continue
            keys = sorted(
                (free_at[gpu_key(name, g.index)], gpu_key(name, g.index)) for g in matching(job.spec, name, node.gpus)
            )
            if len(keys) >= job.spec.gpu_count:
                chosen = keys[: job.spec.gpu_count]
                start = max(chosen[-1][0], not_before)
                if best is None or start < best[0]:
                    best = (start, [key for _, key in chosen])
        if best is None or best[0] == UNKNOWN:
            waiting_on = sorted({blockers[k] for k in (best[1] if best else []) if k in blockers})
            reason = (
                f"job {', '.join(waiting_on)} ahead of it has no ETA, time limit or past runs to go by"
                if waiting_on
                else "no GPU it could use will be free at a known time"
            )
            estimates[job.job_id] = Estimate(None, f"unknown: {reason}")
            if not_before == UNKNOWN:
                unknown[placement_request(job)] = estimates[job.job_id]
            not_before = UNKNOWN
            continue
        start, chosen_keys = best
        duration = expected_duration_s(job, history)
        for key in chosen_keys:
            free_at[key] = start + duration
            if duration == UNKNOWN:
                blockers[key] = job.job_id
        not_before = start
        basis = "GPUs free now" if start == 0 else "running jobs' ETA or time limit, queued jobs' expected durations"
        estimates[job.job_id] = Estimate(start, basis)
    return estimates
