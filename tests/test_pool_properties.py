"""Property-based: sharing the pool. Random sequences of submits by 2-4 owners (some in a team,
jobs preemptible or not), suspends, resumes, stopped reports (with or without a checkpoint
saved on the way out), checkpoints, quota tables (an admin's or the configuration's), the
clock moving past the minimum runtime, half-life changes, and the operations of
test_scheduler_properties, applied through the scheduler's real rules and the fold, with
preemption, borrowing and fair share each on or off. After every decision: a preemption names
victims it may take (a priority at least the gap below the preemptor's and run for the minimum
runtime, or borrowing while the preemptor is within quota), each of them needed, and its
preemptor starts in the same decision on their GPUs; no job within quota starts past a waiting
one that could start once our jobs end, and no job borrows while one within quota is blocked;
no user or team holds more than its quota within quota; no stopping job is scheduled. After
every step: no GPU is held twice, the queue (in fair share's order too) is as the jobs say, the
indexes are as counted from the jobs, nothing that could start now waits, a preempted job is
queued in its original place once stopped, and the emitted log folds from scratch to the same
state."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from events import messages as m
from events.admission import decayed_usage, gpu_quota_block, queue_order, queued_quota_block, usage_rank
from events.bus import Append
from events.placement import freeable_gpus
from events.quotas import Limit, Quotas, team_key, user_key
from events.records import HOLDS_GPUS, QUEUED_FOR_QUOTA, TERMINAL, WAITING, YIELDED, Job, JobStatus, gpu_key
from events.state import State
from events.transitions import new_job
from services.scheduler import rules
from tests.examples import LM, started
from tests.test_scheduler_rules import KEYS, LIMITS, NOW, Cluster

NODES = {"a": 2, "b": 4}
USERS = ("alice", "bob", "carol", "dave")
TEAMS = (None, "ml", "cv")
MIN_RUNTIME_S = 300.0


@dataclass(frozen=True)
class Pool:
    """What an example draws once: the rules' settings, the owners and their teams, and the
    quota table the configuration gives (if any)."""

    limits: rules.Limits
    teams: dict[str, str | None]  # owner -> team
    quotas: Quotas | None


limit = st.builds(Limit, gpus=st.sampled_from([None, 0, 1, 2, 3, 4, 6]), queued=st.sampled_from([None, None, 2, 6]))
quotas = st.builds(
    Quotas,
    users=st.dictionaries(st.sampled_from([*USERS, "*"]), limit, max_size=3),
    teams=st.dictionaries(st.sampled_from([t for t in TEAMS if t]), limit, max_size=2),
)


def pool(
    preemption: bool = True,
    borrowing: bool = False,
    fair_share: bool = False,
    gap: int = 1,
    most: int = 1,
    owners: int = 2,
    teams: Sequence[str | None] = (None,) * 4,
    table: Quotas | None = None,
) -> Pool:
    limits = rules.Limits(
        heartbeat_timeout_s=LIMITS.heartbeat_timeout_s,
        foreign_memory_threshold_mb=LIMITS.foreign_memory_threshold_mb,
        preemption=preemption,
        preempt_gap=gap,
        preempt_min_runtime_s=MIN_RUNTIME_S,
        max_preemptions=most,
        borrowing=borrowing,
        fair_share=fair_share,
    )
    return Pool(limits, dict(zip(USERS[:owners], teams, strict=False)), table)


pools = st.builds(
    pool,
    st.sampled_from([True, True, True, False]),  # preemption: the rules most of these are about
    st.booleans(),
    st.booleans(),
    st.sampled_from([1, 1, 3]),
    st.sampled_from([1, 1, 2]),  # most preemptions
    st.integers(2, 4),
    st.lists(st.sampled_from(TEAMS), min_size=4, max_size=4),
    st.none() | quotas,
)
job = st.integers(0, 30)  # the index of a job, in submit order


def submits(priorities: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[object, ...]]:
    return st.tuples(
        st.just("submit"),
        st.integers(0, 3),  # the owner, among the example's
        priorities,
        st.integers(1, 4),  # GPUs
        st.sampled_from([None, None, "a", "b"]),
        st.integers(0, 1),  # retries
        st.sampled_from([True, True, False]),  # preemptible
    )


OPERATIONS = {
    "submit": submits(st.integers(0, 4)),
    "urgent": submits(st.integers(4, 8)),  # (once jobs of lower priorities run)
    "start": st.tuples(st.just("start")),  # the runners report every scheduled job started
    "advance": st.tuples(st.just("advance"), st.sampled_from([30, MIN_RUNTIME_S + 1, MIN_RUNTIME_S + 1, 3600])),
    "succeed": st.tuples(st.just("succeed"), job),
    "fail": st.tuples(st.just("fail"), job),
    "cancel": st.tuples(st.just("cancel"), job),
    "priority": st.tuples(st.just("priority"), job, st.integers(0, 6)),
    "checkpoint": st.tuples(st.just("checkpoint"), job),
    "suspend": st.tuples(st.just("suspend"), job),
    "resume": st.tuples(st.just("resume"), job),
    "stopped": st.tuples(st.just("stopped"), job, st.booleans()),
    "quotas": st.tuples(st.just("quotas"), quotas, st.booleans()),
    "half_life": st.tuples(st.just("half_life"), st.sampled_from([3600.0, 7 * 24 * 3600.0])),
    "late": st.tuples(st.just("late"), job),
    "runner_lost": st.tuples(st.just("runner_lost"), job),
    "heartbeat": st.tuples(st.just("heartbeat"), st.sampled_from(sorted(NODES)), st.sampled_from([0, 0, 0, 5000])),
    "lose": st.tuples(st.just("lose"), st.sampled_from(sorted(NODES))),
}
# Weighted so that the pool fills and jobs contend: submits, starts and the clock often, the
# loss of a node (and of its jobs) seldom
WEIGHTS = {
    "submit": 12,
    "urgent": 6,
    "start": 8,
    "succeed": 6,
    "advance": 8,
    "stopped": 6,
    "suspend": 3,
    "checkpoint": 4,
    "heartbeat": 3,
}
SELDOM = {"lose", "half_life", "late"}
operation = st.sampled_from(
    [kind for kind in OPERATIONS for _ in range(WEIGHTS.get(kind, 1 if kind in SELDOM else 2))]
).flatmap(OPERATIONS.__getitem__)
# The jobs an operation picks among (all jobs when none is)
TARGETS = {
    "succeed": lambda job: job.status == JobStatus.running or job.stopping,
    "fail": lambda job: job.status in HOLDS_GPUS or job.stopping,
    "cancel": lambda job: job.status not in TERMINAL,
    "priority": lambda job: job.status == JobStatus.queued,
    "checkpoint": lambda job: job.status == JobStatus.running or job.stopping,
    "suspend": lambda job: job.status == JobStatus.running,
    "resume": lambda job: job.status == JobStatus.suspended,
    "stopped": lambda job: job.stopping,
    "runner_lost": lambda job: job.status in HOLDS_GPUS or job.stopping,
}


@dataclass
class Before:
    """What a decision is checked against: the state it was decided on."""

    jobs: dict[str, Job]  # copies, the job a submit adds among them
    order: list[str]  # the queue in the order a pass takes it
    usable: dict[str, list[m.GpuSample]]
    freeable: dict[str, list[m.GpuInfo]]


class Scheduler(Cluster):
    """The cluster on a clock of its own, every fact stamped with it and every decision checked
    as it is folded, with a second state folding the same log from scratch."""

    def __init__(self, pool: Pool) -> None:
        self.pool, self.limits = pool, pool.limits
        self.now = NOW
        self.replica = State()
        self.facts: list[m.Message] = []  # the last decision's
        self.logged: list[tuple[str, m.Message]] = []
        self.preempted: dict[str, int] = {}  # job -> its job.preempted facts
        self.stopping: dict[str, int] = {}  # job -> its attempt that gave up its GPUs, not yet gone
        self.held: dict[str, tuple[datetime, int, list[str]]] = {}  # job -> since, GPUs, its keys
        self.used: dict[str, float] = {}  # user:/team: key -> GPU-seconds held by jobs that let go
        self.returning: dict[str, tuple[int, int]] = {}  # preempted job -> (priority, seq) then
        self.checkpoints = 0
        super().__init__(NODES)
        if pool.quotas is not None:  # QUOTAS, applied at start
            self.decide(rules.set_quotas(self.state, KEYS, m.SetQuotas(quotas=pool.quotas, from_config=True)))

    def heartbeat(self, name: str, count: int, used_mb: int = 0, at: datetime | None = None) -> None:
        super().heartbeat(name, count, used_mb, self.now if at is None else at)
        # One file system shared by every node: a job resumes from its checkpoint on any of them
        # (where each may resume is tests/test_storage.py's)
        shared = m.StorageRoot(path="/", nodes=sorted(NODES))
        self.heartbeats[name] = self.heartbeats[name].model_copy(update={"roots": [shared]})

    # --- deciding

    def fold(self, appends: list[Append]) -> list[m.Message]:
        """Fold one decision's facts, stamped with the clock, checking it on the way."""
        facts = [item.message.model_copy(update={"at": self.now}) for item in appends if item.stream == KEYS.events]
        before = self.before(facts) if any(isinstance(f, (m.JobScheduled, m.JobPreempted)) for f in facts) else None
        victims: list[m.JobPreempted] = []
        for fact in facts:
            if isinstance(fact, m.JobPreempted):
                victims.append(fact)
            elif isinstance(fact, m.JobScheduled):
                assert before is not None
                self.check_start(fact, victims, before)
                victims = []
            else:
                assert not victims, f"{fact.type} between job.preempted and the preemptor's job.scheduled"
            self.apply(fact)
        assert not victims, "job.preempted with no job.scheduled of its preemptor after it"
        if before is not None:
            self.check_decision(facts, before)
        self.facts = facts
        return [item.message for item in appends if item.stream != KEYS.events]

    def apply(self, fact: m.Message) -> None:
        """Fold one fact, keeping apart what the facts say of it: which attempts gave up their
        GPUs and are not known to be gone yet, and the GPU-seconds each owner and team held."""
        self.n += 1
        entry_id = f"{self.n}-0"
        job = self.state.jobs.get(fact.job_id or "")
        stale = self.state.stale_reports
        if isinstance(fact, m.JobScheduled):
            assert fact.job_id not in self.stopping, f"{fact.job_id} scheduled while its attempt is stopping"
        self.state.apply(entry_id, fact)  # raises on an illegal decision
        self.replica.apply(entry_id, fact)
        self.logged.append((entry_id, fact))
        if job is None:
            return
        if isinstance(fact, m.JobScheduled):
            self.held[job.job_id] = (self.now, len(fact.gpu_ids), keys_of(job))
        elif job.job_id in self.held and job.status not in HOLDS_GPUS:
            since, gpus, keys = self.held.pop(job.job_id)
            for key in keys:
                self.used[key] = self.used.get(key, 0.0) + (self.now - since).total_seconds() * gpus
        if isinstance(fact, (m.JobPreempted, m.JobSuspended)):
            self.stopping[job.job_id] = fact.attempt
        if isinstance(fact, m.JobPreempted):
            self.returning[job.job_id] = (job.priority, job.seq)
            self.preempted[job.job_id] = self.preempted.get(job.job_id, 0) + 1
        if isinstance(fact, m.JobStopped):
            if self.stopping.get(job.job_id) != fact.attempt:
                assert self.state.stale_reports == stale + 1, "a report of no attempt being stopped counted"
            else:
                del self.stopping[job.job_id]
                if job.job_id in self.returning:  # preempted: queued in its original place
                    assert job.status == JobStatus.queued, f"{job.job_id} is {job.status} once stopped"
                    assert (job.priority, job.seq) == self.returning.pop(job.job_id)
                    assert job.job_id in [j.job_id for j in self.state.queue_iter()]
        if job.status in TERMINAL:
            self.stopping.pop(job.job_id, None)
            self.returning.pop(job.job_id, None)

    def decide(self, appends: list[Append]) -> list[m.Message]:
        """As the scheduler decides a command or a report: its facts folded, the facts the rules
        add in response to them, then scheduling passes until one decides nothing (as the passes
        that heartbeats call for every few seconds would)."""
        commands: list[m.Message] = []
        while appends:
            commands += self.fold(appends)
            appends = [r for fact in self.facts for r in rules.react(self.state, KEYS, fact)]
        self.settle()
        return commands

    def settle(self) -> None:
        for _ in range(50):
            decided = rules.schedule(self.state, KEYS, self.heartbeats, self.limits, self.now, m.ProcessQueue())
            if not decided:
                return
            self.fold(decided)
        raise AssertionError("scheduling passes never stop deciding")

    # --- checks of one decision

    def before(self, facts: Sequence[m.Message]) -> Before:
        state, fair = self.state, self.limits.fair_share
        jobs = {job_id: job.model_copy() for job_id, job in state.jobs.items()}
        order = [job.job_id for job in queue_order(state, fair)]
        accepted = next((f for f in facts if isinstance(f, m.JobAccepted)), None)
        if accepted is not None and any(isinstance(f, m.JobQueued) for f in facts):
            new = new_job(accepted, state.accepted + 1, "0-0")
            new.status = JobStatus.queued
            jobs[new.job_id] = new
            if fair:
                order = [job.job_id for job in queue_order(state, True, extra=new)]
            else:
                ahead = [job_id for job_id in order if jobs[job_id].priority >= new.priority]
                order = [*ahead, new.job_id, *order[len(ahead) :]]
        offered = rules.usable_gpus(state, self.heartbeats, self.limits, self.now)
        freeable = freeable_gpus(state, self.heartbeats, offered, self.limits.foreign_memory_threshold_mb)
        return Before(jobs, order, {name: list(gpus) for name, gpus in offered.items()}, freeable)

    def check_start(self, scheduled: m.JobScheduled, victims: list[m.JobPreempted], before: Before) -> None:
        """A start, with the job.preempted facts just before it (its victims)."""
        limits, node = self.limits, scheduled.node
        job = before.jobs[scheduled.job_id or ""]
        assert [v.job_id for v in victims] == scheduled.preempted
        assert all(v.by_job_id == scheduled.job_id for v in victims)
        usable = before.usable.get(node, [])
        if victims:
            assert not scheduled.borrowing, "a borrowing job preempted"
            freed = {gpu.index: gpu for gpu in before.freeable[node]}
            taken = {v.job_id: before.jobs[v.job_id or ""] for v in victims}
            assert set(scheduled.gpu_ids) <= {g.index for g in usable} | {i for v in taken.values() for i in v.gpu_ids}
            for fact in victims:
                victim = taken[fact.job_id or ""]
                assert victim.node == node and fact.attempt == victim.attempt
                assert victim.status in (JobStatus.running, JobStatus.serving) and not victim.stopping
                assert victim.spec.preemptible and not victim.cancel_requested
                assert victim.preemptions < limits.max_preemptions
                assert victim.started_at is not None
                runtime = (self.now - victim.started_at).total_seconds()
                if limits.borrowing and victim.borrowing:
                    assert fact.reason == "borrowing"  # (the preemptor is within quota: see check_decision)
                else:
                    assert limits.preemption and fact.reason == "priority"
                    assert victim.priority <= job.priority - limits.preempt_gap, (
                        f"{victim.job_id} ({victim.priority}) preempted by {job.job_id} ({job.priority})"
                    )
                    assert runtime >= limits.preempt_min_runtime_s, f"{victim.job_id} ran {runtime} s"
                # Needed: without it, the preemptor would not fit (and it starts on its GPUs)
                assert set(victim.gpu_ids) & set(scheduled.gpu_ids), f"{job.job_id} took none of {victim.job_id}'s GPUs"
                others = [freed[i] for v in taken.values() if v is not victim for i in v.gpu_ids if i in freed]
                assert rules.place(job, {node: [*usable, *others]}) is None, f"{victim.job_id} was not needed"
        else:
            assert {g.index for g in usable} >= set(scheduled.gpu_ids), "started on GPUs not free"
        before.usable[node] = [gpu for gpu in usable if gpu.index not in scheduled.gpu_ids]

    def check_decision(self, facts: Sequence[m.Message], before: Before) -> None:
        state, limits = self.state, self.limits
        starts = [f for f in facts if isinstance(f, m.JobScheduled)]
        started_ids = {f.job_id for f in starts}
        # GPUs victims within quota held before: what an owner's holding was, at most, while the
        # pass went through the queue (the starts within quota add to it, the victims take away)
        freed: dict[str, int] = {}
        for fact in facts:
            if isinstance(fact, m.JobPreempted) and not before.jobs[fact.job_id or ""].borrowing:
                victim = before.jobs[fact.job_id or ""]
                for key in keys_of(victim):
                    freed[key] = freed.get(key, 0) + victim.spec.gpu_count

        def within_quota(job: Job) -> bool:
            return gpu_quota_block(state, job, freed) is None

        waiting = [
            job_id
            for job_id in before.order
            if job_id not in started_ids and state.jobs[job_id].status == JobStatus.queued
        ]
        position = {job_id: i for i, job_id in enumerate(before.order)}
        for scheduled in starts:
            job = state.jobs[scheduled.job_id or ""]
            assert job.job_id in position, f"{job.job_id} started from outside the queue"
            if scheduled.borrowing:
                assert limits.borrowing and job.spec.preemptible
                assert not within_quota(job), f"{job.job_id} borrowed within its quota"
                # No job within quota was blocked (it could start once our jobs end)
                for job_id in waiting:
                    if within_quota(state.jobs[job_id]):
                        assert rules.place(state.jobs[job_id], before.freeable) is None, (
                            f"{job.job_id} borrowed while {job_id} was blocked"
                        )
                continue
            # Within quota: its owner and team hold no more than their quota
            for name, key, allowed in quota_limits(state, job):
                assert state.holding(key) <= allowed, f"{name} holds {state.holding(key)} GPUs of {allowed}"
            # No job within quota that could start once our jobs end waits ahead of it
            for job_id in waiting:
                if position[job_id] < position[job.job_id] and within_quota(state.jobs[job_id]):
                    assert rules.place(state.jobs[job_id], before.freeable) is None, f"{job.job_id} jumped {job_id}"
        for fact in facts:
            if isinstance(fact, m.JobRejected) and fact.reason == "quota":
                job = state.jobs[fact.job_id or ""]
                assert queued_quota_block(state, job.owner, job.team) is not None

    # --- checks after every step

    def check(self) -> None:
        state, limits = self.state, self.limits
        holders: dict[str, str] = {}
        for job in state.jobs.values():
            count = self.preempted.get(job.job_id, 0)
            assert job.preemptions == count <= limits.max_preemptions, f"{job.job_id} preempted {count} times"
            if job.stopping:
                assert job.status in (*YIELDED, JobStatus.queued), f"{job.job_id} stopping while {job.status}"
            if job.status in HOLDS_GPUS:
                for index in job.gpu_ids:
                    key = gpu_key(job.node or "", index)
                    assert key not in holders, f"GPU {key} held by {holders.get(key)} and {job.job_id}"
                    holders[key] = job.job_id
                assert state.nodes[job.node or ""].up
        assert holders == state.allocations
        queued = [j for j in state.jobs.values() if j.status == JobStatus.queued and not j.stopping]
        assert [j.job_id for j in state.queue_iter()] == [j.job_id for j in sorted(queued, key=fifo)]
        # Fair share: within a priority, by the owner's decayed usage, then submit order
        rank = usage_rank(state)
        fair = [j.job_id for j in sorted(queued, key=lambda j: (-j.priority, rank(j.owner), j.seq))]
        assert [j.job_id for j in state.fair_queue_iter(rank)] == fair
        owners = sorted({j.owner for j in state.jobs.values()}, key=rank)
        used = [decayed_usage(state, owner, self.now) for owner in owners]
        assert used == sorted(used), "an owner's place is not by decayed usage"
        check_indexes(state)
        self.check_usage()
        self.check_idle()
        check_same(state, self.replica)

    def check_usage(self) -> None:
        """Each owner's and team's usage (credited as the log goes, up to each job's mark) is the
        GPU-seconds their jobs held."""
        state, now = self.state, self.now
        assert {j.job_id: j.attempt for j in state.jobs.values() if j.stopping} == self.stopping
        held = dict(self.used)
        credited: dict[str, float] = {}
        for job_id, (since, gpus, keys) in self.held.items():
            job = state.jobs[job_id]
            for key in keys:
                held[key] = held.get(key, 0.0) + (now - since).total_seconds() * gpus
                if job.usage_mark is not None:
                    credited[key] = credited.get(key, 0.0) + (now - job.usage_mark).total_seconds() * gpus
        for key in {*held, *state.usage}:
            usage = state.usage.get(key)
            total = credited.get(key, 0.0) + (sum(usage.hours.values()) if usage is not None else 0.0)
            assert math.isclose(total, held.get(key, 0.0), rel_tol=1e-9, abs_tol=1e-6), f"{key} used {total}"

    def check_idle(self) -> None:
        """Nothing waits that could start now: in the order a pass takes the queue, every job
        within quota ahead of the first blocked one finds no free GPUs (else a pass would have
        started it), and with no job within quota blocked, no job that may borrow does either."""
        state, limits = self.state, self.limits
        usable = rules.usable_gpus(state, self.heartbeats, limits, self.now)
        freeable = freeable_gpus(state, self.heartbeats, usable, limits.foreign_memory_threshold_mb)
        borrowers: list[Job] = []
        for job in queue_order(state, limits.fair_share):
            if gpu_quota_block(state, job) is not None:
                if limits.borrowing and job.spec.preemptible and job.preemptions < limits.max_preemptions:
                    borrowers.append(job)
                continue
            assert rules.place(job, usable) is None, f"{job.job_id} could start now"
            if rules.place(job, freeable) is not None:
                # Blocked: it holds up those behind it, and borrowers. It may not preempt: with
                # every job it may preempt stopped, it would still not fit.
                for node, gpus in freeable.items():
                    known = {gpu.index: gpu for gpu in gpus}
                    freed = [known[i] for victim in self.victims(job, node) for i in victim.gpu_ids if i in known]
                    assert rules.place(job, {node: [*usable[node], *freed]}) is None, f"{job.job_id} could preempt"
                return
        for job in borrowers:
            assert rules.place(job, usable) is None, f"{job.job_id} could borrow GPUs no one waits for"

    def victims(self, job: Job, node: str) -> list[Job]:
        """The jobs of a node that a job may preempt, were it blocked."""
        limits = self.limits
        return [
            victim
            for victim in self.state.jobs.values()
            if victim.node == node
            and victim.status in (JobStatus.running, JobStatus.serving)
            and victim.started_at is not None
            and not victim.stopping
            and not victim.cancel_requested
            and victim.spec.preemptible
            and victim.preemptions < limits.max_preemptions
            and (
                (limits.borrowing and victim.borrowing)
                or (
                    limits.preemption
                    and victim.priority <= job.priority - limits.preempt_gap
                    and (self.now - victim.started_at).total_seconds() >= limits.preempt_min_runtime_s
                )
            )
        ]

    # --- operations

    def run(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind in ("submit", "urgent"):
            _, owner, priority, gpus, node, retries, preemptible = op
            users = sorted(self.pool.teams)
            user = users[int(owner) % len(users)]  # type: ignore[call-overload]
            fields = {
                "priority": priority,
                "gpu_count": gpus,
                "node": node,
                "max_retries": retries,
                "preemptible": preemptible,
            }
            spec = LM.model_validate({**LM.model_dump(), **fields})
            team = self.pool.teams[user]
            command = m.SubmitJob(job_id=f"j{self.n}", spec=spec, actor=user, team=team)
            limits = [
                (user_key(user), self.state.quotas.user(user)),
                (team_key(team or ""), self.state.quotas.team(team)),
            ]
            over = any(q is not None and q.queued is not None and self.state.waiting(k) >= q.queued for k, q in limits)
            self.decide(rules.submit(self.state, KEYS, command, self.heartbeats, self.limits, self.now))
            job = self.state.jobs[command.job_id or ""]
            if over and job.reason != "unsatisfiable":  # one job too many waiting
                assert (job.status, job.reason) == (JobStatus.failed, "quota")
        elif kind == "start":
            for job in sorted(self.state.jobs.values(), key=lambda job: job.seq):
                if job.status == JobStatus.scheduled:
                    self.decide([Append(KEYS.events, started(job.job_id, job.attempt, job.node or "", ""))])
        elif kind == "advance":
            delta = timedelta(seconds=float(op[1]))  # type: ignore[arg-type]
            self.now += delta
            self.heartbeats = {
                n: beat.model_copy(update={"at": beat.at + delta}) for n, beat in self.heartbeats.items()
            }
            self.settle()
        elif kind == "quotas":
            _, table, from_config = op
            command = m.SetQuotas(quotas=table, from_config=from_config, actor="root")  # type: ignore[arg-type]
            self.decide(rules.set_quotas(self.state, KEYS, command))
        elif kind == "half_life":
            self.decide(rules.set_half_life(self.state, KEYS, m.SetHalfLife(half_life_s=op[1])))  # type: ignore[arg-type]
        elif kind == "heartbeat":
            _, node, used = op
            self.heartbeat(node, NODES[node], used_mb=used)  # type: ignore[arg-type,index]
            self.decide([Append(KEYS.events, f) for f in rules.node_changes(self.state, self.heartbeats[node])])  # type: ignore[index]
        elif kind == "lose":
            node = str(op[1])
            if self.state.nodes[node].up:
                self.decide(rules.lose_node(self.state, KEYS, node, m.ProcessQueue()))
                assert not any(j.stopping and j.node == node for j in self.state.jobs.values())
                self.heartbeats[node] = self.heartbeats[node].model_copy(update={"at": self.now - timedelta(hours=1)})
                self.settle()
        else:
            picked = self.pick(int(op[1]), TARGETS.get(str(kind), lambda job: True))  # type: ignore[call-overload]
            if picked is not None:
                self.on_job(op, picked)
        self.settle()

    def pick(self, index: int, target: Callable[[Job], bool]) -> Job | None:
        jobs = sorted(self.state.jobs.values(), key=lambda job: job.seq)
        jobs = [job for job in jobs if target(job)] or jobs
        return jobs[index % len(jobs)] if jobs else None

    def on_job(self, op: tuple[object, ...], job: Job) -> None:
        kind, job_id, attempt = op[0], job.job_id, job.attempt
        report = self.decide  # a runner's report: folded, then reacted to
        if kind == "succeed" and (job.status == JobStatus.running or job.stopping):
            report([Append(KEYS.events, m.JobSucceeded(job_id=job_id, attempt=attempt, exit_code=0, run_dir="/r"))])
            assert job.status == JobStatus.completed and not job.stopping
        elif kind == "fail" and (job.status in HOLDS_GPUS or job.stopping):
            report([Append(KEYS.events, m.JobFailed(job_id=job_id, attempt=attempt, reason="oom"))])
            assert job.status == JobStatus.failed and not job.stopping
        elif kind == "checkpoint" and (job.status == JobStatus.running or job.stopping):
            self.checkpoints += 1
            path = f"/r/{job_id}/checkpoint-{self.checkpoints}"
            saved = m.CheckpointSaved(job_id=job_id, attempt=attempt, step=self.checkpoints, path=path)
            report([Append(KEYS.events, saved)])
            assert (job.last_checkpoint, job.checkpoint_at) == (path, self.now)
        elif kind == "cancel":
            status = job.status
            stops = self.decide(rules.cancel(self.state, KEYS, m.CancelJob(job_id=job_id)))
            if status in YIELDED:
                assert job.status == JobStatus.cancelled and not job.stopping and not stops
            if stops and job.status == JobStatus.scheduled:  # the runner ends it
                report([Append(KEYS.events, m.JobCancelled(job_id=job_id, attempt=attempt))])
        elif kind == "priority":
            self.decide(rules.set_priority(self.state, KEYS, m.SetPriority(job_id=job_id, priority=op[2])))  # type: ignore[arg-type]
        elif kind == "suspend":
            may = job.may_suspend
            stops = self.decide(rules.suspend(self.state, KEYS, m.SuspendJob(job_id=job_id)))
            assert bool(stops) == may
            if may:
                assert (
                    job.status == JobStatus.suspended and job.stopping and job_id not in self.state.allocations.values()
                )
                assert [(s.attempt, s.reason) for s in stops if isinstance(s, m.StopJob)] == [(attempt, "suspend")]
        elif kind == "resume":
            may = job.may_resume
            self.decide(rules.resume(self.state, KEYS, m.ResumeJob(job_id=job_id)))
            if may:
                assert job.status in (JobStatus.queued, JobStatus.scheduled) and job.attempt >= attempt
                if job.stopping:  # its old attempt is still on its way out: it waits for that
                    assert job.attempt == attempt and self.state.queue_position(job_id) is None
        elif kind == "stopped":
            checkpoint = f"/r/{job_id}/checkpoint-out-{self.n}" if op[2] else None
            stopped = m.JobStopped(
                job_id=job_id,
                attempt=attempt,
                exit_code=0,
                last_checkpoint=checkpoint,
                step=self.n if checkpoint else None,
                reason="preempt" if job.status == JobStatus.preempted else "suspend",
            )
            if job.stopping:
                was = job.status
                report([Append(KEYS.events, stopped)])
                assert not job.stopping
                if checkpoint and job.attempt == attempt:
                    assert job.last_checkpoint == checkpoint
                if was == JobStatus.suspended:
                    assert job.status == JobStatus.suspended
            else:  # a late or repeated report: changes nothing
                self.late(job, stopped)
        elif kind == "late":  # a stopped process of an ended attempt reports
            ended = job.status in WAITING or job.status in YIELDED
            late = attempt if ended else attempt - 1
            if late >= 1 and not job.stopping:
                self.late(job, m.JobFailed(job_id=job_id, attempt=late, reason="killed"))
        elif kind == "runner_lost" and (job.status in HOLDS_GPUS or job.stopping):
            retried = job.retries < job.spec.max_retries
            stopping, status = job.stopping, job.status
            report([Append(KEYS.events, m.JobLost(job_id=job_id, attempt=attempt))])
            if stopping:  # it was on its way out: it goes on from its last checkpoint
                assert not job.stopping
                if status == JobStatus.suspended:
                    assert job.status == JobStatus.suspended
                else:  # queued again (and perhaps started at once)
                    assert job.status in (JobStatus.queued, JobStatus.scheduled)
            else:
                assert job.status in ((JobStatus.queued, JobStatus.scheduled) if retried else (JobStatus.failed,))

    def late(self, job: Job, report: m.Message) -> None:
        before, stale = job.model_dump(), self.state.stale_reports
        self.decide([Append(KEYS.events, report)])
        assert job.model_dump() == before and self.state.stale_reports == stale + 1


def fifo(job: Job) -> tuple[int, int]:
    return (-job.priority, job.seq)


def keys_of(job: Job) -> list[str]:
    return [user_key(job.owner)] + ([team_key(job.team)] if job.team else [])


def quota_limits(state: State, job: Job) -> Iterable[tuple[str, str, int]]:
    checks = [(job.owner, user_key(job.owner), state.quotas.user(job.owner))]
    if job.team:
        checks.append((job.team, team_key(job.team), state.quotas.team(job.team)))
    for name, key, allowed in checks:
        if allowed is not None and allowed.gpus is not None:
            yield name, key, allowed.gpus


def check_indexes(state: State) -> None:
    """The indexes the fold keeps as jobs change are what counting the jobs gives."""
    waiting: dict[str, int] = {}
    holding: dict[str, int] = {}
    for job in state.jobs.values():
        for key in keys_of(job):
            if job.status in QUEUED_FOR_QUOTA:
                waiting[key] = waiting.get(key, 0) + 1
            if job.status in HOLDS_GPUS and not job.borrowing:
                holding[key] = holding.get(key, 0) + job.spec.gpu_count
    private = state.__pydantic_private__
    for key in {*waiting, *holding, *private["_waiting"], *private["_holding"]}:
        assert state.waiting(key) == waiting.get(key, 0), f"{key} waiting"
        assert state.holding(key) == holding.get(key, 0), f"{key} holding"


def check_same(state: State, replica: State) -> None:
    """The same state, indexes and orders included."""
    assert replica.model_dump() == state.model_dump()
    keys = {*state.__pydantic_private__["_waiting"], *state.__pydantic_private__["_holding"]}
    keys |= {*replica.__pydantic_private__["_waiting"], *replica.__pydantic_private__["_holding"]}
    for key in keys:
        assert (replica.waiting(key), replica.holding(key)) == (state.waiting(key), state.holding(key)), key
    assert [j.job_id for j in replica.queue_iter()] == [j.job_id for j in state.queue_iter()]
    ranked = [j.job_id for j in replica.fair_queue_iter(usage_rank(replica))]
    assert ranked == [j.job_id for j in state.fair_queue_iter(usage_rank(state))]


# Scenarios too long for random sequences to come by often, tried first on every run
SCENARIOS = [
    # A job preempted once (MAX_PREEMPTIONS 1) runs again and is spared: the bigger job is taken
    (
        pool(),
        [
            ("submit", 0, 0, 4, None, 0, True),  # on b
            ("submit", 0, 0, 2, None, 0, True),  # on a
            ("start",),
            ("advance", MIN_RUNTIME_S + 1),
            ("submit", 0, 8, 2, None, 0, True),  # preempts the job on a (it loses least)
            ("stopped", 0, True),
            ("start",),
            ("succeed", 1),  # the urgent job ends: the preempted job runs again on a
            ("start",),
            ("advance", MIN_RUNTIME_S + 1),
            ("submit", 0, 8, 2, None, 0, True),  # preempts the job on b
        ],
    ),
    # Stopping the 1-GPU job first would not do: only the 3-GPU job is preempted
    (
        pool(),
        [
            ("submit", 0, 0, 2, "a", 0, False),
            ("submit", 0, 0, 1, "b", 0, True),
            ("submit", 0, 0, 3, "b", 0, True),
            ("start",),
            ("advance", MIN_RUNTIME_S + 1),
            ("submit", 0, 8, 3, None, 0, True),
        ],
    ),
    # Two jobs blocked until their victims have run long enough preempt one each in one pass
    (
        pool(),
        [
            ("submit", 0, 0, 2, "a", 0, True),
            ("submit", 0, 0, 4, "b", 0, True),
            ("start",),
            ("submit", 0, 8, 2, None, 0, True),
            ("submit", 1, 8, 2, None, 0, True),
            ("advance", MIN_RUNTIME_S + 1),
        ],
    ),
    # A job being cancelled is no victim, though it would lose least
    (
        pool(),
        [
            ("submit", 0, 0, 2, "a", 0, True),
            ("submit", 0, 0, 4, "b", 0, True),
            ("start",),
            ("advance", MIN_RUNTIME_S + 1),
            ("cancel", 0),
            ("submit", 0, 8, 2, None, 0, True),
        ],
    ),
    # A node is lost while a job preempted there is being stopped: it is queued again
    (
        pool(),
        [
            ("submit", 0, 0, 2, "a", 0, True),
            ("start",),
            ("advance", MIN_RUNTIME_S + 1),
            ("submit", 0, 8, 2, "a", 0, True),
            ("lose", "a"),
        ],
    ),
    # bob, over his quota, borrows nothing while alice's pair waits for GPUs
    (
        pool(preemption=False, borrowing=True, table=Quotas(users={"bob": Limit(gpus=0)})),
        [
            ("submit", 0, 5, 4, None, 0, True),
            ("submit", 0, 5, 1, None, 0, True),
            ("submit", 0, 5, 2, None, 0, True),
            ("submit", 1, 9, 1, None, 0, True),
        ],
    ),
]


def scenarios(test: Callable[..., None]) -> Callable[..., None]:
    for scenario, operations in SCENARIOS:
        test = example(scenario, operations)(test)
    return test


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools, st.lists(operation, min_size=20, max_size=60))
@scenarios
def test_any_sequence_keeps_the_pool_sharing_invariants(pool: Pool, operations: list[tuple[object, ...]]) -> None:
    cluster = Scheduler(pool)
    cluster.check()
    for op in operations:
        cluster.run(op)
        cluster.check()
    rebuilt = State()
    for entry_id, event in cluster.logged:
        rebuilt.apply(entry_id, event)
    check_same(cluster.state, rebuilt)
