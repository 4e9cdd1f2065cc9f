"""Sharing the pool, by example: which running jobs a blocked one preempts (and when none),
suspend and resume, attempts that end while being stopped, quotas with borrowing, the quota
table from the configuration against an admin's, the usage half-life, and fair share's order."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from events import messages as m
from events.admission import decayed_usage, queue_order
from events.bus import Append
from events.quotas import EPOCH, Limit, Quotas, Usage
from events.records import JobStatus
from events.state import State
from services.scheduler import rules
from tests.examples import DEPLOY, LM, started
from tests.test_scheduler_rules import KEYS, LIMITS, NOW, Cluster

PREEMPT = rules.Limits(
    heartbeat_timeout_s=LIMITS.heartbeat_timeout_s,
    foreign_memory_threshold_mb=LIMITS.foreign_memory_threshold_mb,
    preemption=True,
    preempt_gap=1,
    preempt_min_runtime_s=300,
    max_preemptions=3,
)
BORROW = rules.Limits(
    heartbeat_timeout_s=LIMITS.heartbeat_timeout_s,
    foreign_memory_threshold_mb=LIMITS.foreign_memory_threshold_mb,
    borrowing=True,
)
FAIR = rules.Limits(
    heartbeat_timeout_s=LIMITS.heartbeat_timeout_s,
    foreign_memory_threshold_mb=LIMITS.foreign_memory_threshold_mb,
    fair_share=True,
)


class Pool(Cluster):
    """A cluster on a clock of its own: every fact is stamped with it, and the rules decide at it."""

    def __init__(self, nodes: dict[str, int], limits: rules.Limits = PREEMPT) -> None:
        self.limits, self.now = limits, NOW
        self.log: list[tuple[str, m.Message]] = []
        super().__init__(nodes)

    def heartbeat(self, name: str, count: int, used_mb: int = 0, at: datetime | None = None) -> None:
        super().heartbeat(name, count, used_mb, self.now if at is None else at)

    def fold(self, appends: list[Append]) -> list[m.Message]:
        """Fold a decision's facts (stamped now); the commands it sends, in order."""
        commands = []
        for item in appends:
            if item.stream == KEYS.events:
                self.n += 1
                fact = item.message.model_copy(update={"at": self.now})
                self.state.apply(f"{self.n}-0", fact)
                self.log.append((f"{self.n}-0", fact))
            else:
                commands.append(item.message)
        return commands

    def facts(self, appends: list[Append]) -> list[m.Message]:
        """Fold a decision; the facts it adds, in order."""
        start = len(self.log)
        self.fold(appends)
        return [fact for _, fact in self.log[start:]]

    def submit(  # type: ignore[override]
        self,
        job_id: str,
        priority: int = 5,
        gpus: int = 1,
        owner: str = "alice",
        team: str | None = None,
        **request: object,
    ) -> list[m.Message]:
        spec = LM.model_validate({**LM.model_dump(), "priority": priority, "gpu_count": gpus, **request})
        command = m.SubmitJob(job_id=job_id, spec=spec, actor=owner, team=team)
        return self.fold(rules.submit(self.state, KEYS, command, self.heartbeats, self.limits, self.now))

    def run(self, *job_ids: str) -> None:
        """The runner reports each scheduled job started."""
        for job_id in job_ids:
            job = self.state.jobs[job_id]
            self.fold([Append(KEYS.events, started(job_id, job.attempt, job.node or "", ""))])

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.heartbeats = {
            n: b.model_copy(update={"at": b.at + timedelta(seconds=seconds)}) for n, b in self.heartbeats.items()
        }

    def checkpoint(self, job_id: str, step: int) -> None:
        job = self.state.jobs[job_id]
        saved = m.CheckpointSaved(job_id=job_id, attempt=job.attempt, step=step, path=f"/r/{job_id}/checkpoint-{step}")
        self.fold([Append(KEYS.events, saved)])

    def schedule(self) -> list[Append]:
        return rules.schedule(self.state, KEYS, self.heartbeats, self.limits, self.now, m.ProcessQueue())

    def report(self, event: m.Message) -> list[Append]:
        """A runner's report folded; what the scheduler decides in response (not folded yet)."""
        self.fold([Append(KEYS.events, event)])
        return rules.on_event(self.state, KEYS, self.heartbeats, self.limits, self.now, event)

    def stopped(self, job_id: str, checkpoint: str | None = None, step: int | None = None) -> list[Append]:
        job = self.state.jobs[job_id]
        reason = "suspend" if job.status == JobStatus.suspended else "preempt"
        return self.report(
            m.JobStopped(
                job_id=job_id, attempt=job.attempt, exit_code=0, last_checkpoint=checkpoint, step=step, reason=reason
            )
        )


def running(pool: Pool, *jobs: tuple[str, int], gpus: int = 1, owner: str = "alice", **request: object) -> None:
    """Jobs (id, priority) submitted, started, and run past the minimum runtime."""
    for job_id, priority in jobs:
        pool.submit(job_id, priority, gpus, owner, **request)
        assert pool.status(job_id) == JobStatus.scheduled
        pool.run(job_id)
    pool.advance(PREEMPT.preempt_min_runtime_s)


def preempted(facts: list[m.Message]) -> list[str]:
    return [fact.job_id or "" for fact in facts if isinstance(fact, m.JobPreempted)]


# --- which victims


def test_a_blocked_job_preempts_the_lowest_priority_and_starts_on_its_gpus_in_the_same_decision() -> None:
    pool = Pool({"a": 3})
    running(pool, ("mid", 3), ("low", 1), ("high", 5))
    low = pool.state.jobs["low"]
    decision = urgent(pool)
    # job.preempted (with the step the log knew of) before the urgent job's job.scheduled, which
    # names it; on the node's stream, the victim's stop before the urgent job's start
    facts = [a.message for a in decision if a.stream == KEYS.events]
    assert [type(f) for f in facts][-2:] == [m.JobPreempted, m.JobScheduled]
    victim, scheduled = facts[-2], facts[-1]
    assert isinstance(victim, m.JobPreempted) and isinstance(scheduled, m.JobScheduled)
    assert (victim.job_id, victim.attempt, victim.by_job_id, victim.reason) == ("low", 1, "urgent", "priority")
    assert (scheduled.job_id, scheduled.node, scheduled.gpu_ids, scheduled.preempted) == (
        "urgent",
        "a",
        low.gpu_ids,
        ["low"],
    )
    node = [a.message for a in decision if a.stream == KEYS.node("a")]
    assert [(type(c), c.job_id) for c in node] == [(m.StopJob, "low"), (m.StartJob, "urgent")]
    assert isinstance(node[0], m.StopJob) and (node[0].attempt, node[0].reason) == (1, "preempt")
    pool.fold(decision)
    low = pool.state.jobs["low"]
    assert (low.status, low.stopping, low.preemptions, low.preempted_by) == ("preempted", True, 1, "urgent")
    assert pool.state.jobs["urgent"].preempted_jobs == ["low"]
    assert pool.state.allocations[f"a/{low.gpu_ids[0]}"] == "urgent"


def test_among_victims_of_one_priority_the_one_losing_fewest_gpu_seconds_since_its_checkpoint() -> None:
    # Given three jobs of one priority: "old" never checkpointed, "saved" (one GPU) and "pair"
    # (two GPUs) checkpointed 100 s ago: stopping "saved" loses 100 GPU-seconds, "pair" 200
    pool = Pool({"a": 4})
    running(pool, ("old", 1), ("saved", 1))
    running(pool, ("pair", 1), gpus=2)
    pool.checkpoint("saved", 10)
    pool.checkpoint("pair", 10)
    pool.advance(100)
    # Then an urgent job takes the one that loses least
    assert preempted(pool.facts(urgent(pool))) == ["saved"]


def test_among_victims_losing_as_much_the_most_recently_started() -> None:
    # "early" started first and checkpointed when "late" started: both would lose as much
    pool = Pool({"a": 2})
    pool.submit("early", 1)
    pool.run("early")
    pool.advance(60)
    pool.checkpoint("early", 5)
    pool.submit("late", 1)
    pool.run("late")
    pool.advance(PREEMPT.preempt_min_runtime_s)
    assert preempted(pool.facts(urgent(pool))) == ["late"]


def urgent(pool: Pool, job_id: str = "urgent", priority: int = 9, gpus: int = 1, **request: object) -> list[Append]:
    """The decision on an urgent job's submit (not folded yet)."""
    spec = LM.model_validate({**LM.model_dump(), "priority": priority, "gpu_count": gpus, **request})
    command = m.SubmitJob(job_id=job_id, spec=spec, actor="alice")
    return rules.submit(pool.state, KEYS, command, pool.heartbeats, pool.limits, pool.now)


def test_only_the_victims_needed_are_preempted() -> None:
    # Given four low jobs on a 4-GPU node, one a GPU: the later one checkpointed, the less
    # stopping it loses, and the last never did
    pool = Pool({"a": 4})
    running(pool, ("l0", 1), ("l1", 1), ("l2", 1), ("l3", 1))
    on = {job_id: pool.state.jobs[job_id].gpu_ids for job_id in ("l0", "l1", "l2", "l3")}
    assert on == {"l0": [0], "l1": [1], "l2": [2], "l3": [3]}
    for step, job_id in enumerate(("l0", "l1", "l2")):
        pool.advance(10)
        pool.checkpoint(job_id, step)
    # A job pinned to GPUs 2 and 3 tries the cheaper l1 and l0 on its way to l3, but preempts
    # only the jobs on its GPUs
    decision = urgent(pool, gpus=2, node="a", gpu_ids=[2, 3])
    assert sorted(preempted(pool.facts(decision))) == ["l2", "l3"]
    stops = [a.message.job_id for a in decision if isinstance(a.message, m.StopJob)]
    assert sorted(stops) == ["l2", "l3"]
    assert pool.state.jobs["urgent"].gpu_ids == [2, 3]


def test_no_useless_preemption_a_job_that_would_not_fit_even_then_preempts_no_one() -> None:
    # Given a 2-GPU node with a low job that may be preempted and one that may not
    pool = Pool({"a": 2})
    running(pool, ("low", 1))
    running(pool, ("keep", 1), preemptible=False)
    # A 2-GPU urgent job would not fit with "low" stopped: it preempts no one, and waits
    decision = urgent(pool, gpus=2)
    assert preempted(pool.facts(decision)) == [] and not any(isinstance(a.message, m.StopJob) for a in decision)
    assert pool.status("urgent") == "queued" and pool.status("low") == "running"
    # Nor does one when the second job is too young to be preempted, nor one only the gap allows
    pool = Pool({"a": 2})
    running(pool, ("low", 1))
    pool.submit("young", 1)
    pool.run("young")
    assert preempted(pool.facts(urgent(pool, gpus=2))) == []
    pool.advance(PREEMPT.preempt_min_runtime_s)  # now both may go
    assert sorted(preempted(pool.facts(pool.schedule()))) == ["low", "young"]
    assert pool.status("urgent") == "scheduled"


def test_a_job_not_preemptible_or_being_cancelled_is_never_a_victim() -> None:
    pool = Pool({"a": 2})
    running(pool, ("fixed", 1), preemptible=False)
    running(pool, ("leaving", 1))
    pool.fold(rules.cancel(pool.state, KEYS, m.CancelJob(job_id="leaving")))
    assert preempted(pool.facts(urgent(pool))) == [] and pool.status("urgent") == "queued"


def test_a_victim_must_be_the_priority_gap_below_and_have_run_the_minimum_runtime() -> None:
    def victim_run_for(seconds: float) -> Pool:
        pool = Pool({"a": 1}, replace(PREEMPT, preempt_gap=2))
        pool.submit("victim", 4)
        pool.run("victim")
        pool.advance(seconds)
        return pool

    young = victim_run_for(PREEMPT.preempt_min_runtime_s - 1)
    assert preempted(young.facts(urgent(young, "u6", 6))) == []  # 2 above it, but it is too young
    young.advance(1)
    assert preempted(young.facts(young.schedule())) == ["victim"]  # now it may
    pool = victim_run_for(PREEMPT.preempt_min_runtime_s)
    assert preempted(pool.facts(urgent(pool, "u5", 5))) == []  # only 1 above it
    assert preempted(pool.facts(urgent(pool, "u6", 6))) == ["victim"]
    assert (pool.status("u6"), pool.status("u5")) == ("scheduled", "queued")


def test_a_job_preempted_max_preemptions_times_is_not_preempted_again() -> None:
    pool = Pool({"a": 1}, replace(PREEMPT, max_preemptions=1))
    running(pool, ("low", 1))
    assert preempted(pool.facts(urgent(pool, "u1"))) == ["low"]
    pool.fold(pool.stopped("low", "/r/low/checkpoint-7", 7))
    assert pool.status("low") == "queued"
    pool.run("u1")
    pool.fold(pool.report(m.JobSucceeded(job_id="u1", attempt=1, exit_code=0, run_dir="/r")))
    low = pool.state.jobs["low"]
    assert (low.status, low.attempt, low.preemptions) == ("scheduled", 2, 1)
    pool.run("low")
    pool.advance(PREEMPT.preempt_min_runtime_s)
    assert preempted(pool.facts(urgent(pool, "u2"))) == []
    assert pool.status("u2") == "queued" and pool.status("low") == "running"


def test_a_preempted_job_is_queued_again_in_its_original_place_and_resumes_from_its_checkpoint() -> None:
    pool = Pool({"a": 1})
    running(pool, ("low", 1))
    pool.submit("before", 1, hold=True)  # (held: submitted after "low", queued later)
    pool.fold(urgent(pool))
    pool.fold(rules.release(pool.state, KEYS, m.ReleaseJob(job_id="before")))
    pool.submit("after", 1)
    # While its attempt is being stopped, it is not in the queue
    assert [j.job_id for j in pool.state.queue()] == ["before", "after"]
    assert pool.fold(pool.stopped("low", "/r/low/checkpoint-40", 40)) == []
    # Once stopped: in its place (priority 1, submitted first), with the checkpoint it saved
    assert [j.job_id for j in pool.state.queue()] == ["low", "before", "after"]
    low = pool.state.jobs["low"]
    assert (low.priority, low.seq, low.last_checkpoint, low.stopping) == (1, 1, "/r/low/checkpoint-40", False)
    pool.run("urgent")
    [start] = [
        c
        for c in pool.fold(pool.report(m.JobSucceeded(job_id="urgent", attempt=1, exit_code=0, run_dir="/r")))
        if isinstance(c, m.StartJob)
    ]
    assert (start.job_id, start.attempt, start.resume_from) == ("low", 2, "/r/low/checkpoint-40")


# --- quotas and borrowing


def quotas(pool: Pool, table: Quotas, from_config: bool = False) -> None:
    pool.fold(rules.set_quotas(pool.state, KEYS, m.SetQuotas(quotas=table, from_config=from_config)))


def test_an_over_quota_job_borrows_only_when_no_job_within_quota_is_blocked() -> None:
    pool = Pool({"a": 2}, BORROW)
    quotas(pool, Quotas(users={"bob": Limit(gpus=0)}))
    pool.submit("mine", owner="alice")  # GPU 0
    pool.submit("pair", gpus=2, owner="alice")  # within quota, blocked until "mine" ends
    # bob's job is over his quota: it blocks no one, and borrows nothing while "pair" is blocked
    assert pool.submit("bobs", priority=9, owner="bob") == []
    assert pool.status("bobs") == "queued"
    assert pool.fold(rules.cancel(pool.state, KEYS, m.CancelJob(job_id="pair"))) == []
    # No job within quota is blocked now: it borrows GPU 1, marked borrowing, held over quota
    [start] = pool.fold(pool.schedule())
    assert (start.job_id, start.gpu_ids) == ("bobs", [1])
    bobs = pool.state.jobs["bobs"]
    assert bobs.borrowing and pool.state.holding("user:bob") == 0 and pool.state.holding("user:alice") == 1
    # Without borrowing, it never starts
    pool = Pool({"a": 2}, LIMITS)
    quotas(pool, Quotas(users={"bob": Limit(gpus=0)}))
    assert pool.submit("bobs", owner="bob") == [] and pool.status("bobs") == "queued"


def test_only_a_preemptible_job_borrows() -> None:
    pool = Pool({"a": 1}, BORROW)
    quotas(pool, Quotas(users={"bob": Limit(gpus=0)}))
    assert pool.submit("fixed", owner="bob", preemptible=False) == []
    [start] = pool.submit("borrower", owner="bob")
    assert start.job_id == "borrower" and pool.state.jobs["borrower"].borrowing


def test_a_borrower_is_preempted_by_a_job_within_quota_whatever_their_priorities() -> None:
    for limits in (BORROW, replace(PREEMPT, borrowing=True)):
        pool = Pool({"a": 1}, limits)
        quotas(pool, Quotas(users={"*": Limit(gpus=1), "bob": Limit(gpus=0)}))
        pool.submit("borrower", priority=9, owner="bob")
        assert pool.state.jobs["borrower"].borrowing
        pool.run("borrower")  # (just started: no minimum runtime for a borrower)
        decision = pool.facts(urgent(pool, "mine", priority=0))
        [fact] = [f for f in decision if isinstance(f, m.JobPreempted)]
        assert (fact.job_id, fact.by_job_id, fact.reason) == ("borrower", "mine", "borrowing")
        borrower = pool.state.jobs["borrower"]
        assert (borrower.status, borrower.borrowing) == ("preempted", False)
        assert pool.status("mine") == "scheduled" and not pool.state.jobs["mine"].borrowing
        # Once stopped, it waits (over quota, and no GPU is left to borrow)
        assert pool.fold(pool.stopped("borrower")) == [] and pool.status("borrower") == "queued"


def test_jobs_started_in_one_pass_count_against_the_quota() -> None:
    pool = Pool({"a": 4}, LIMITS)
    quotas(pool, Quotas(teams={"ml": Limit(gpus=2)}))
    pool.submit("busy", gpus=4, owner="carol")
    for job_id in ("a1", "b1", "a2"):
        pool.submit(job_id, owner="alice" if job_id.startswith("a") else "bob", team="ml")
    pool.run("busy")
    pool.fold(pool.report(m.JobSucceeded(job_id="busy", attempt=1, exit_code=0, run_dir="/r")))
    # One pass: a1 and b1 take the team's two GPUs; a2 would take it over
    assert [pool.status(j) for j in ("a1", "b1", "a2")] == ["scheduled", "scheduled", "queued"]
    assert pool.state.holding("team:ml") == 2


def test_a_quota_table_from_the_configuration_does_not_override_an_admins_change() -> None:
    pool = Pool({"a": 1})
    config = Quotas(users={"*": Limit(gpus=1)})
    admin = Quotas(users={"*": Limit(gpus=2)})
    quotas(pool, config, from_config=True)
    assert (pool.state.quotas, pool.state.config_quotas) == (config, config)
    quotas(pool, admin)
    assert (pool.state.quotas, pool.state.config_quotas) == (admin, config)
    # On restart the scheduler sends the same table again: the admin's change stands
    assert rules.set_quotas(pool.state, KEYS, m.SetQuotas(quotas=config, from_config=True)) == []
    assert rules.set_quotas(pool.state, KEYS, m.SetQuotas(quotas=admin)) == []  # no change
    # A new table in the configuration applies
    edited = Quotas(users={"*": Limit(gpus=3)})
    quotas(pool, edited, from_config=True)
    assert (pool.state.quotas, pool.state.config_quotas) == (edited, edited)


def test_a_submit_over_the_queued_limit_is_rejected_for_quota() -> None:
    pool = Pool({"a": 1})
    quotas(pool, Quotas(users={"alice": Limit(queued=1)}, teams={"ml": Limit(queued=2)}))
    pool.submit("runs", owner="alice")
    pool.submit("waits", owner="alice")
    assert pool.submit("refused", owner="alice") == []
    assert (pool.state.jobs["refused"].status, pool.state.jobs["refused"].reason) == ("failed", "quota")
    pool.submit("bob1", owner="bob", team="ml")
    pool.submit("bob2", owner="bob", team="ml")
    assert pool.state.jobs["bob2"].status == "queued"
    pool.submit("carol", owner="carol", team="ml")
    assert pool.state.jobs["carol"].reason == "quota"


# --- suspend and resume


def test_suspend_frees_the_gpus_at_once_and_resume_queues_the_job_in_its_place_once_stopped() -> None:
    pool = Pool({"a": 1}, LIMITS)
    pool.submit("train", priority=3)
    pool.run("train")
    pool.submit("next", priority=3)
    # Suspend: job.suspended, its runner told to stop it (with a checkpoint); the GPU is free
    decision = rules.suspend(pool.state, KEYS, m.SuspendJob(job_id="train", actor="alice"))
    [stop] = pool.fold(decision)
    assert isinstance(stop, m.StopJob) and (stop.attempt, stop.reason) == (1, "suspend")
    train = pool.state.jobs["train"]
    assert (train.status, train.stopping, pool.state.allocations) == ("suspended", True, {})
    assert not train.may_suspend and train.may_resume
    assert rules.suspend(pool.state, KEYS, m.SuspendJob(job_id="train")) == []  # once
    [start] = pool.fold(pool.schedule())
    assert start.job_id == "next"
    # Resumed before its attempt is gone: queued, but not in the queue until it is
    pool.fold(rules.resume(pool.state, KEYS, m.ResumeJob(job_id="train")))
    assert train.status == "queued" and train.stopping and pool.state.queue_position("train") is None
    assert rules.resume(pool.state, KEYS, m.ResumeJob(job_id="train")) == []  # once
    pool.fold(pool.stopped("train", "/r/train/checkpoint-9", 9))
    assert pool.state.queue_position("train") == 1 and train.last_checkpoint == "/r/train/checkpoint-9"
    # Stopped first, then resumed: the same place
    pool = Pool({"a": 1}, LIMITS)
    pool.submit("train", priority=3)
    pool.run("train")
    pool.fold(rules.suspend(pool.state, KEYS, m.SuspendJob(job_id="train")))
    pool.submit("busy", priority=3)
    pool.submit("later", priority=3)
    pool.fold(pool.stopped("train", "/r/train/checkpoint-9", 9))
    assert pool.status("train") == "suspended" and not pool.state.jobs["train"].stopping
    [resumed] = [a.message for a in rules.resume(pool.state, KEYS, m.ResumeJob(job_id="train"))]
    assert isinstance(resumed, m.JobResumed) and (resumed.position, resumed.behind_job_id) == (1, None)
    pool.fold([Append(KEYS.events, resumed)])
    assert [j.job_id for j in pool.state.queue()] == ["train", "later"]


def test_only_a_running_training_job_may_be_suspended_and_only_a_suspended_one_resumed() -> None:
    pool = Pool({"a": 2}, LIMITS)
    pool.submit("scheduled")
    spec = DEPLOY.model_copy(update={"gpu_count": 1})
    pool.fold(rules.submit(pool.state, KEYS, m.SubmitJob(job_id="deploy", spec=spec), pool.heartbeats, LIMITS, NOW))
    pool.run("deploy")
    pool.submit("queued")
    assert pool.status("deploy") == "running"
    for job_id in ("scheduled", "queued", "deploy", "missing"):
        assert rules.suspend(pool.state, KEYS, m.SuspendJob(job_id=job_id)) == []
        assert rules.resume(pool.state, KEYS, m.ResumeJob(job_id=job_id)) == []
    pool.run("scheduled")
    pool.fold(rules.cancel(pool.state, KEYS, m.CancelJob(job_id="scheduled")))
    assert rules.suspend(pool.state, KEYS, m.SuspendJob(job_id="scheduled")) == []  # being cancelled


# --- attempts that end while being stopped


def test_a_lost_node_reports_its_stopping_jobs_stopped() -> None:
    pool = Pool({"a": 2, "b": 1})
    running(pool, ("low", 1), node="a")
    running(pool, ("resting", 1), node="a")
    pool.checkpoint("low", 12)
    pool.fold(urgent(pool, node="a"))  # preempts "low" (fewest GPU-seconds lost)
    pool.fold(rules.suspend(pool.state, KEYS, m.SuspendJob(job_id="resting")))
    assert pool.state.jobs["low"].stopping and pool.state.jobs["resting"].stopping
    # When node a is lost, no runner will report them: the scheduler does, from the last
    # checkpoint the log knows of
    decision = pool.facts(rules.lose_node(pool.state, KEYS, "a", m.ProcessQueue()))
    stopped = {f.job_id: f for f in decision if isinstance(f, m.JobStopped)}
    assert set(stopped) == {"low", "resting"}
    assert (stopped["low"].reason, stopped["low"].last_checkpoint, stopped["low"].step) == (
        "node_lost",
        "/r/low/checkpoint-12",
        12,
    )
    low, resting = pool.state.jobs["low"], pool.state.jobs["resting"]
    assert (low.status, low.stopping, low.last_checkpoint) == ("queued", False, "/r/low/checkpoint-12")
    assert (resting.status, resting.stopping) == ("suspended", False)
    assert isinstance(decision[-1], m.NodeLost)


def test_a_stopping_attempt_lost_unwatched_is_reported_stopped_and_an_earlier_one_changes_nothing() -> None:
    pool = Pool({"a": 1})
    running(pool, ("low", 1))
    pool.checkpoint("low", 3)
    pool.fold(urgent(pool))
    lost = m.JobLost(job_id="low", attempt=1, message="Killed")
    [fact] = [a.message for a in pool.report(lost) if a.stream == KEYS.events]
    assert isinstance(fact, m.JobStopped) and (fact.reason, fact.last_checkpoint) == ("lost", "/r/low/checkpoint-3")
    pool.fold([Append(KEYS.events, fact)])
    assert (pool.status("low"), pool.state.jobs["low"].stopping) == ("queued", False)
    # The same report again (the attempt is over): nothing
    assert rules.react(pool.state, KEYS, lost) == []


def test_a_preempted_or_suspended_job_is_cancelled_at_once_and_its_stopped_report_ignored() -> None:
    pool = Pool({"a": 2})
    running(pool, ("low", 1), ("resting", 2))
    pool.fold(urgent(pool))
    pool.fold(rules.suspend(pool.state, KEYS, m.SuspendJob(job_id="resting")))
    for job_id in ("low", "resting"):
        job = pool.state.jobs[job_id]
        attempt = job.attempt
        # Its runner was told to stop it already: only the fact
        [cancelled] = [a.message for a in rules.cancel(pool.state, KEYS, m.CancelJob(job_id=job_id))]
        assert isinstance(cancelled, m.JobCancelled)
        pool.fold([Append(KEYS.events, cancelled)])
        assert (job.status, job.stopping) == ("cancelled", False)
        stale = pool.state.stale_reports
        pool.fold([Append(KEYS.events, m.JobStopped(job_id=job_id, attempt=attempt, last_checkpoint="/r/late"))])
        assert job.status == "cancelled" and job.last_checkpoint != "/r/late" and pool.state.stale_reports == stale + 1


# --- usage and fair share


def test_a_new_half_life_keeps_the_decayed_usage_as_it_is_and_decays_it_at_the_new_rate() -> None:
    usage = Usage()
    usage.add(3600.0, EPOCH, 3600.0)
    later = EPOCH + timedelta(hours=2)
    assert usage.decayed(later, 3600.0) == pytest.approx(900.0)
    usage.rescaled(3600.0, 7200.0, later)
    assert usage.decayed(later, 7200.0) == pytest.approx(900.0)
    assert usage.decayed(later + timedelta(hours=2), 7200.0) == pytest.approx(450.0)
    # Folded: job usage is credited as jobs hold GPUs, and the half-life change keeps it
    pool = Pool({"a": 2}, FAIR)
    pool.submit("pair", gpus=2)
    pool.run("pair")
    pool.advance(1000)
    pool.fold(pool.report(m.JobSucceeded(job_id="pair", attempt=1, exit_code=0, run_dir="/r")))
    used = decayed_usage(pool.state, "alice", pool.now)
    assert used == pytest.approx(2000.0, rel=1e-3)
    pool.fold(rules.set_half_life(pool.state, KEYS, m.SetHalfLife(half_life_s=60.0)))
    assert pool.state.half_life_s == 60.0
    assert decayed_usage(pool.state, "alice", pool.now) == pytest.approx(used)
    assert decayed_usage(pool.state, "alice", pool.now + timedelta(seconds=60)) == pytest.approx(used / 2)
    assert rules.set_half_life(pool.state, KEYS, m.SetHalfLife(half_life_s=60.0)) == []


def replayed(log: list[tuple[str, m.Message]]) -> State:
    state = State()
    for entry_id, fact in log:
        state.apply(entry_id, fact)
    return state


def test_fair_share_orders_a_priority_by_the_owners_decayed_usage_then_submit_order() -> None:
    # Given alice has used GPUs for a while, and bob and carol not at all
    pool = Pool({"a": 1}, FAIR)
    pool.submit("warmup", owner="alice")
    pool.run("warmup")
    pool.advance(600)
    pool.checkpoint("warmup", 1)  # (usage is credited as the log goes)
    # When all three queue jobs of one priority (and alice one of a higher priority)
    for job_id, owner, priority in [
        ("a1", "alice", 5),
        ("b1", "bob", 5),
        ("a2", "alice", 5),
        ("c1", "carol", 5),
        ("b2", "bob", 5),
        ("a-urgent", "alice", 7),
    ]:
        pool.submit(job_id, priority, owner=owner)
    # Then priority first; within it bob and carol (no usage: by submit order), then alice
    expected = ["a-urgent", "b1", "c1", "b2", "a1", "a2"]
    assert [j.job_id for j in queue_order(pool.state, True)] == expected
    assert [j.job_id for j in queue_order(pool.state, False)] == ["a-urgent", "a1", "b1", "a2", "c1", "b2"]
    # The log replayed from scratch gives the same order
    assert [j.job_id for j in queue_order(replayed(pool.log), True)] == expected
    # And the pass follows it: when the GPU frees, the first in that order starts
    pool.fold(pool.report(m.JobSucceeded(job_id="warmup", attempt=1, exit_code=0, run_dir="/r")))
    assert pool.status("a-urgent") == "scheduled"
    pool.run("a-urgent")
    pool.fold(pool.report(m.JobSucceeded(job_id="a-urgent", attempt=1, exit_code=0, run_dir="/r")))
    assert pool.status("b1") == "scheduled"


def test_fair_share_places_a_new_job_by_its_owners_usage_at_submit() -> None:
    pool = Pool({"a": 1}, FAIR)
    pool.submit("warmup", owner="alice")
    pool.run("warmup")
    pool.advance(600)
    pool.checkpoint("warmup", 1)
    pool.submit("a1", owner="alice")
    pool.submit("b1", owner="bob")  # ahead of alice's: bob has used nothing
    assert [j.job_id for j in queue_order(pool.state, True)] == ["b1", "a1"]
    pool.fold(rules.cancel(pool.state, KEYS, m.CancelJob(job_id="warmup")))
    pool.fold(pool.report(m.JobCancelled(job_id="warmup", attempt=1)))
    assert (pool.status("b1"), pool.status("a1")) == ("scheduled", "queued")


# --- gang jobs in a shared pool


def addresses(pool: Pool) -> None:
    """Every node advertises an address (NODE_ADDR), as a gang's rank 0 needs."""
    for name, beat in pool.heartbeats.items():
        pool.heartbeats[name] = beat.model_copy(update={"addr": f"10.0.0.{ord(name)}"})
        pool.fold([Append(KEYS.events, fact) for fact in rules.node_changes(pool.state, pool.heartbeats[name])])


def test_a_gang_job_may_be_a_victim_every_rank_is_stopped_and_it_is_queued_again_once_stopped() -> None:
    # Given a low-priority job on both GPUs of two nodes (a gang: a rank on each), run past the
    # minimum runtime
    pool = Pool({"a": 2, "b": 2})
    addresses(pool)
    pool.submit("gang", 1, gpus=2, nodes=2)
    job = pool.state.jobs["gang"]
    for rank, placed in enumerate(job.ranks):
        pool.fold([Append(KEYS.events, started("gang", 1, placed.node, "").model_copy(update={"rank": rank}))])
    assert pool.status("gang") == JobStatus.running
    pool.advance(PREEMPT.preempt_min_runtime_s)
    # When a job of priority 9 needs two GPUs
    commands = pool.submit("urgent", 9, gpus=2)
    # Then the gang is preempted for it: each of its ranks is told to stop, with a checkpoint
    assert [(c.job_id, c.rank, c.reason) for c in commands if isinstance(c, m.StopJob)] == [
        ("gang", 0, "preempt"),
        ("gang", 1, "preempt"),
    ]
    urgent = pool.state.jobs["urgent"]
    assert urgent.status == JobStatus.scheduled and urgent.preempted_jobs == ["gang"]
    assert urgent.node in {"a", "b"} and urgent.gpu_ids == [0, 1]
    # And once stopped, the gang waits in the queue for two whole nodes again, to resume from
    # its checkpoint
    pool.fold(pool.stopped("gang", "/shared/gang/checkpoint-40", 40))
    gang = pool.state.jobs["gang"]
    assert (gang.status, gang.last_checkpoint, gang.preemptions) == (JobStatus.queued, "/shared/gang/checkpoint-40", 1)


def test_a_gang_job_preempts_no_one_it_waits_for_its_nodes() -> None:
    # Given one low-priority job on each of two nodes, run past the minimum runtime
    pool = Pool({"a": 1, "b": 1})
    addresses(pool)
    running(pool, ("low-a", 1), ("low-b", 1))
    # When an urgent job for both nodes is submitted
    commands = pool.submit("gang", 9, nodes=2)
    # Then it waits: stopping jobs on several nodes at once for one job is not done
    assert commands == [] and pool.status("gang") == JobStatus.queued
    assert {pool.status("low-a"), pool.status("low-b")} == {JobStatus.running}
