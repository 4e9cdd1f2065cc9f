"""When will a queued job start? Simulate the queue forward against the running jobs' remaining
time and the queued jobs' expected durations. Where a time is not known it says so: nothing is
invented."""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from events.admission import gpu_quota_block, queue_order
from events.messages import GpuInfo
from events.placement import matching
from events.policy import Policy
from events.records import Job, JobStatus, gpu_key
from events.state import State

UNKNOWN = math.inf
OTHERS = ""  # in place of a job id: the GPU is in use by another's processes


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
    return (spec.gpu_count, spec.nodes, spec.node, spec.gpu_model, spec.min_gpu_memory_mb, ids)


class QueueEstimates(Mapping[str, Estimate]):
    """An estimate for every queued job. The queue is simulated up to the first job whose start
    is not known: no GPU's time changes after it, and every job behind it is unknown too, for a
    reason that depends only on what it asks for. That reason is worked out when a job behind is
    asked about (once per kind of request), so a long queue behind a job with no ETA costs
    nothing to estimate."""

    def __init__(
        self,
        state: State,
        simulated: dict[str, Estimate],
        free_at: dict[str, float] | None = None,
        blockers: dict[str, str] | None = None,
        head: str | None = None,
        gpus: Mapping[str, Sequence[GpuInfo]] | None = None,
    ) -> None:
        self._state = state
        self._quotas = bool(state.quotas.users or state.quotas.teams)
        self._simulated = simulated
        self._free_at = free_at  # None: the whole queue was simulated
        self._blockers = blockers or {}
        self._head = head  # the first job whose start is not known
        self._gpus = gpus or {}  # the nodes simulated, and their GPUs
        self._behind: dict[tuple[object, ...], Estimate] = {}

    def __getitem__(self, job_id: str) -> Estimate:
        found = self._simulated.get(job_id)
        if found is not None:
            return found
        job = self._state.jobs.get(job_id)
        if self._free_at is None or job is None or job.status != JobStatus.queued:
            raise KeyError(job_id)
        if self._quotas and (why := gpu_quota_block(self._state, job)):
            return _over_quota(why)
        request = placement_request(job)
        if request not in self._behind:
            best = _earliest(job, self._gpus, self._free_at, 0.0)
            self._behind[request] = _unknown(best, self._blockers, self._head)
        return self._behind[request]

    def __iter__(self) -> Iterator[str]:
        yield from self._simulated
        if self._free_at is not None:
            yield from (job.job_id for job in self._state.queue_iter() if job.job_id not in self._simulated)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _earliest(
    job: Job, gpus: Mapping[str, Sequence[GpuInfo]], free_at: dict[str, float], not_before: float
) -> tuple[float, list[str]] | None:
    """The soonest a job could start on the GPUs of one of the nodes (of as many nodes as a gang
    job asks for), not before the job ahead of it, and on which GPUs."""
    options: list[tuple[float, int, list[str]]] = []
    for order, (name, offered) in enumerate(gpus.items()):
        keys = sorted(
            (free_at[gpu_key(name, g.index)], gpu_key(name, g.index)) for g in matching(job.spec, name, offered)
        )
        if len(keys) >= job.spec.gpu_count:
            chosen = keys[: job.spec.gpu_count]
            options.append((chosen[-1][0], order, [key for _, key in chosen]))
    if len(options) < job.spec.nodes:
        return None
    picked = sorted(options)[: job.spec.nodes]
    return max(picked[-1][0], not_before), [key for _, _, keys in picked for key in keys]


def _over_quota(why: str) -> Estimate:
    return Estimate(None, f"unknown: it waits for its {why}")


def _preemptible_gpus(state: State, policy: Policy | None) -> list[tuple[str, Job]]:
    """GPUs held by jobs that some job could preempt, with their holders."""
    if policy is None or not (policy.preemption or policy.borrowing):
        return []
    return [(key, job) for key, job_id in state.allocations.items() if policy.preemptible(job := state.jobs[job_id])]


def _unknown(best: tuple[float, list[str]] | None, blockers: dict[str, str], head: str | None = None) -> Estimate:
    """Why a job's start is not known: what holds the GPUs it would take, or (GPUs it could take
    free at a known time) the job ahead of it in strict order whose own start is not known."""
    if best is None:
        return Estimate(None, "unknown: no node in service has enough GPUs it could use")
    jobs = sorted({blockers[k] for k in best[1] if blockers.get(k, OTHERS) != OTHERS})
    others = [k for k in best[1] if blockers.get(k) == OTHERS]
    reasons = []
    if jobs:
        reasons.append(f"job {', '.join(jobs)} ahead of it has no ETA, time limit or past runs to go by")
    if others:
        reasons.append(f"GPU {', '.join(others)} {'is' if len(others) == 1 else 'are'} in use by another's processes")
    if not reasons:
        reasons.append(f"it starts after job {head}, ahead of it in the queue, whose start is not known")
    return Estimate(None, f"unknown: {'; '.join(reasons)}")


def estimate_queue(
    state: State,
    now: datetime,
    gpus: Mapping[str, Sequence[GpuInfo]] | None = None,
    foreign: Collection[str] = (),
    policy: Policy | None = None,
) -> QueueEstimates:
    """An estimate for every queued job, in start order (strict: none starts before the one ahead,
    unless that one cannot start on the nodes simulated at all). The nodes simulated are those
    up in the log with their GPUs, or (``gpus``) the nodes in service with the memory each GPU
    could free; GPUs in use by another's processes (``foreign``) free at no known time. With a
    ``policy`` that preempts, the GPUs of a job a queued job may preempt are free for it as soon
    as it may; a job over its GPU quota waits for it (its start is not known) and holds up no one;
    with fair share the queue is simulated in fair share's order."""
    if gpus is None:
        gpus = {name: node.gpus for name, node in sorted(state.nodes.items()) if node.up}
    free_at: dict[str, float] = {}  # GPU -> seconds from now until it is free
    for name, offered in gpus.items():
        for gpu in offered:
            free_at[gpu_key(name, gpu.index)] = 0.0
    blockers: dict[str, str] = {}  # GPU -> the job whose end time is unknown
    for key, job_id in state.allocations.items():  # the GPUs that jobs hold
        if key not in free_at:
            continue  # on a node not simulated
        free_at[key] = remaining_s(state.jobs[job_id], now)
        if free_at[key] == UNKNOWN:
            blockers[key] = job_id
    for key in foreign:
        if key in free_at and key not in state.allocations:
            free_at[key], blockers[key] = UNKNOWN, OTHERS
    history: dict[tuple[str, str], list[float]] | None = None  # past durations, gathered when needed
    estimates: dict[str, Estimate] = {}
    not_before = 0.0
    quotas = bool(state.quotas.users or state.quotas.teams)
    preemptible = _preemptible_gpus(state, policy)
    for job in queue_order(state, policy is not None and policy.fair_share):
        if quotas and (why := gpu_quota_block(state, job)):
            estimates[job.job_id] = _over_quota(why)
            continue
        times = free_at
        if preemptible and policy is not None:
            ready = {key: policy.preemptible_in(job, victim, now) for key, victim in preemptible}
            sooner = {key: t for key, t in ready.items() if t is not None and t < free_at.get(key, -1.0)}
            if sooner:
                times = {**free_at, **sooner}
        best = _earliest(job, gpus, times, not_before)
        if best is None:  # not enough of the GPUs it could use are up: it holds up no one
            estimates[job.job_id] = _unknown(best, blockers)
            continue
        if best[0] == UNKNOWN:
            estimates[job.job_id] = _unknown(best, blockers)
            return QueueEstimates(state, estimates, free_at, blockers, head=job.job_id, gpus=gpus)
        start, chosen_keys = best
        if history is None and job.spec.time_limit_s is None:
            history = durations(state)
        duration = expected_duration_s(job, history or {})
        basis = "GPUs free now" if start == 0 else "running jobs' ETA or time limit, queued jobs' expected durations"
        if times is not free_at and any(times[key] < free_at[key] for key in chosen_keys):
            basis = "by preempting lower-priority or borrowing jobs" + (" now" if start == 0 else "")
        for key in chosen_keys:
            free_at[key] = start + duration
            if duration == UNKNOWN:
                blockers[key] = job.job_id
        not_before = start
        estimates[job.job_id] = Estimate(start, basis)
    return QueueEstimates(state, estimates)
