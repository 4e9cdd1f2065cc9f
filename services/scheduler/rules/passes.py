"""The scheduling pass: queued jobs placed in order, backfilled, borrowing, or preempting."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Literal

from events import messages as m
from events.admission import charge, gpu_quota_block, gpus_quota_block, queue_order
from events.bus import Append
from events.estimates import placement_request
from events.keys import Keys
from events.placement import freeable_gpus
from events.policy import Policy
from events.records import ANONYMOUS, Job, JobStatus
from events.state import State
from events.transitions import new_job
from services.scheduler.rules.facts import stops
from services.scheduler.rules.limits import Limits
from services.scheduler.rules.placing import (
    _ANYWHERE,
    Placement,
    _estimate,
    _fresh_start,
    _master_port,
    _only,
    _resumable_on,
    could_place,
    place,
    place_job,
    usable_gpus,
)

BACKFILL_SCAN = 1000  # queued jobs looked at behind a blocked one, when backfilling


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


def _sweep_full(state: State, job: Job, started: Mapping[str, int]) -> bool:
    """Whether a job of a sweep must wait for one of its sweep's jobs to end (max_concurrent)."""
    sweep = state.sweeps.get(job.sweep_id or "")
    if sweep is None or sweep.max_concurrent is None:
        return False
    return state.sweep_running(sweep.sweep_id) + started.get(sweep.sweep_id, 0) >= sweep.max_concurrent


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
        decisions += _borrow(state, keys, limits, accepted, cause, usable, decisions, ports, heartbeats, started)
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
    sweeps_started: dict[str, int],
) -> list[Append]:
    """Jobs over quota started, in queue order, on the GPUs a pass left over (no job within quota
    was blocked). Every job of the queue not started by the pass is tried: one within quota that
    did not start did not fit then, and fits even less now. A sweep's cap holds for borrowers
    too (``sweeps_started``: its jobs the pass started, counted on)."""
    started = {append.message.job_id for append in decided if isinstance(append.message, m.JobScheduled)}
    decisions: list[Append] = []
    for job in _queue(state, limits, accepted, frozenset()):
        if not any(usable.values()):
            break
        if job.job_id in started or not job.spec.preemptible or job.preemptions >= limits.max_preemptions:
            continue
        if job.sweep_id is not None and _sweep_full(state, job, sweeps_started):
            continue
        where = _resumable_on(state, job, heartbeats, limits)
        if where is not None and not where:
            continue
        placement = place_job(state, job, _only(usable, where))
        if placement is not None:
            if job.sweep_id is not None:
                sweeps_started[job.sweep_id] = sweeps_started.get(job.sweep_id, 0) + 1
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
    common: m.Ids = {"job_id": job.job_id, "causation_id": cause.id}
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
        reason: Literal["priority", "borrowing"] = "borrowing" if victim.borrowing else "priority"
        step = victim.progress.step if victim.progress is not None else None
        common: m.Ids = {"job_id": victim.job_id, "causation_id": cause.id}
        fact = m.JobPreempted(attempt=victim.attempt, by_job_id=job.job_id, reason=reason, step=step, **common)
        decided.append(Append(keys.events, fact))
        decided += stops(keys, victim, "preempt", common)
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
