"""The scheduler decides a whole read at once, folding each decision in before the next, under
stand-in ids, inside a savepoint. Property-based: random reads of submits, cancels, priority
changes, releases, heartbeats (with foreign processes) and runner reports, through the real
service code. After every read: a rolled-back plan leaves the state exactly as it was; a kept one
folds, from the log it emitted, to the same state; no GPU is held twice; the queue is in order.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import messages as m
from events.consumer import Delivery
from events.records import HOLDS_GPUS, JobStatus, gpu_key
from events.state import State
from services.config import Settings
from services.scheduler import rules
from services.scheduler.decider import Plan
from services.scheduler.service import Scheduler
from tests.examples import GPU, LM, started
from tests.test_scheduler_properties import check_state

NODES = {"a": 2, "b": 4}

submit = st.tuples(
    st.just("submit"), st.integers(0, 10), st.integers(1, 4), st.sampled_from([None, "a", "b"]), st.booleans()
)
on_job = st.tuples(st.sampled_from(["cancel", "release", "start", "succeed", "fail"]), st.integers(0, 30))
operation = st.one_of(
    submit,
    on_job,
    st.tuples(st.just("priority"), st.integers(0, 30), st.integers(0, 10)),
    st.tuples(st.just("heartbeat"), st.sampled_from(sorted(NODES)), st.sampled_from([0, 5000])),
    st.tuples(st.just("process")),
)


class Harness:
    """A scheduler whose reads are built here; commits are simulated by ids given in order."""

    def __init__(self) -> None:
        self.settings = Settings(namespace="t", _env_file=None)  # type: ignore[call-arg]
        self.scheduler = Scheduler(self.settings, bus=None)  # type: ignore[arg-type]
        self.keys = self.settings.keys
        self.log: list[tuple[str, m.Message]] = []
        self.ids = itertools.count(1)
        self.base_ms = int(datetime.now(UTC).timestamp() * 1000)  # entry ids as Redis makes them
        self.submitted = 0
        self.renamed: dict[str, str] = {}  # the stand-ins of the plan kept last, and their ids

    @property
    def state(self) -> State:
        return self.scheduler.state

    def next_id(self) -> str:
        return f"{self.base_ms}-{next(self.ids)}"

    def foreign(self, fact: m.Message) -> Delivery:
        """A runner's report: folded by the catch-up before the read is decided."""
        entry_id = self.next_id()
        self.state.apply(entry_id, fact)
        self.log.append((entry_id, fact))
        return Delivery(self.keys.events, entry_id, fact, 1)

    def heartbeat(self, node: str, used_mb: int) -> Delivery:
        gpus = [
            m.GpuSample(
                **GPU.model_copy(update={"index": i, "uuid": f"GPU-{node}-{i}"}).model_dump(), memory_used_mb=used_mb
            )
            for i in range(NODES[node])
        ]
        beat = m.NodeHeartbeat(node=node, simulated=True, gpus=gpus, at=datetime.now(UTC))
        return Delivery(self.keys.telemetry, self.next_id(), beat, 1)

    def job(self, index: int) -> str | None:
        ids = sorted(self.state.jobs, key=lambda job_id: self.state.jobs[job_id].seq)
        return ids[index % len(ids)] if ids else None

    def delivery(self, op: tuple[object, ...]) -> Delivery | None:
        kind = op[0]
        command: m.Message
        if kind == "submit":
            _, priority, gpus, node, hold = op
            spec = LM.model_validate(
                {**LM.model_dump(), "priority": priority, "gpu_count": gpus, "node": node, "hold": hold}
            )
            self.submitted += 1
            command = m.SubmitJob(job_id=f"j{self.submitted}", spec=spec, actor="prop")
        elif kind == "heartbeat":
            return self.heartbeat(op[1], op[2])  # type: ignore[arg-type]
        elif kind == "process":
            command = m.ProcessQueue()
        else:
            job_id = self.job(op[1])  # type: ignore[arg-type]
            if job_id is None:
                return None
            job = self.state.jobs[job_id]
            if kind == "cancel":
                command = m.CancelJob(job_id=job_id)
            elif kind == "release":
                command = m.ReleaseJob(job_id=job_id)
            elif kind == "priority":
                command = m.SetPriority(job_id=job_id, priority=op[2])  # type: ignore[arg-type]
            elif kind == "start" and job.status == JobStatus.scheduled:
                return self.foreign(started(job_id, job.attempt, job.node or "", ""))
            elif kind == "succeed" and job.status == JobStatus.running:
                return self.foreign(m.JobSucceeded(job_id=job_id, attempt=job.attempt, exit_code=0, run_dir="/r"))
            elif kind == "fail" and job.status in HOLDS_GPUS:
                return self.foreign(m.JobFailed(job_id=job_id, attempt=job.attempt, reason="oom"))
            else:
                return None
        return Delivery(self.keys.commands, self.next_id(), command, 1)

    def read(self, deliveries: list[Delivery], *, conflict: bool) -> None:
        before = self.state.model_dump()
        if conflict:  # the commit found the log moved on: everything folded is taken back
            self.state.savepoint()
            self.scheduler.decider.plan(deliveries)
            self.state.rollback()
            assert self.state.model_dump() == before
            assert self.state.queue() == sorted(self.state.queue(), key=lambda j: (-j.priority, j.seq))
        self.state.savepoint()
        self.keep(self.scheduler.decider.plan(deliveries))

    def keep(self, plan: Plan) -> None:
        """The earliest open plan's commit landed: its facts get their ids in the log."""
        ids = [self.next_id() if item.stream == self.keys.events else "x" for item in plan.appends]
        self.renamed = dict(zip(plan.stand_ins, [i for i in ids if i != "x"], strict=True))
        self.state.release(self.renamed)
        self.log += [(i, item.message) for i, item in zip(ids, plan.appends, strict=True) if i != "x"]


def check(harness: Harness) -> None:
    check_state(harness.state, harness.log)
    jobs = harness.state.jobs.values()
    assert not any(j.first_entry_id.startswith("~") or j.last_entry_id.startswith("~") for j in jobs)
    # What the GPUs offer, worked out once per reading and per set of holders, is what they
    # offer now, however many savepoints were rolled back since
    state, scheduler = harness.state, harness.scheduler
    threshold, now = scheduler.decider.limits.foreign_memory_threshold_mb, datetime.now(UTC)
    offered = rules.usable_gpus(state, scheduler.liveness.heartbeats, scheduler.decider.limits, now)
    assert offered == {
        name: [
            sample
            for sample in scheduler.liveness.heartbeats[name].gpus
            if sample.memory_used_mb <= threshold and gpu_key(name, sample.index) not in state.allocations
        ]
        for name in offered
    }


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.lists(operation, min_size=1, max_size=8), st.booleans()), max_size=12),
)
def test_reads_decided_whole_keep_the_invariants_and_roll_back_exactly(reads: list) -> None:  # type: ignore[type-arg]
    harness = Harness()
    harness.read([harness.heartbeat(node, 0) for node in sorted(NODES)], conflict=False)  # the nodes join
    check(harness)
    for operations, conflict in reads:
        deliveries = [d for d in map(harness.delivery, operations) if d is not None]
        harness.read(deliveries, conflict=conflict)
        check(harness)


def test_a_read_of_many_submits_places_in_order_and_queues_the_rest() -> None:
    harness = Harness()
    harness.read([harness.heartbeat(node, 0) for node in sorted(NODES)], conflict=False)
    priorities = [0, 5, 5, 10, 0, 3, 7, 7]
    ops = [("submit", p, 2, None, False) for p in priorities]
    harness.read([d for d in map(harness.delivery, ops) if d is not None], conflict=True)
    check(harness)
    # 6 GPUs: the first three jobs of the read start; the rest queue by priority, FIFO within one.
    running = sorted(j.job_id for j in harness.state.jobs.values() if j.status == JobStatus.scheduled)
    assert running == ["j1", "j2", "j3"]
    assert [j.job_id for j in harness.state.queue()] == ["j4", "j7", "j8", "j6", "j5"]
    assert [harness.state.queue_position(f"j{i}") for i in (4, 7, 8, 6, 5)] == [1, 2, 3, 4, 5]


def test_heartbeats_are_aged_by_their_arrival_in_redis_not_by_the_nodes_clock() -> None:
    # Given nodes whose clocks run an hour behind and an hour ahead
    harness = Harness()
    beats = []
    for node, skew in (("a", -3600), ("b", 3600)):
        beat = harness.heartbeat(node, 0)
        at = beat.message.at + timedelta(seconds=skew)  # type: ignore[attr-defined]
        beats.append(Delivery(beat.stream, beat.entry_id, beat.message.model_copy(update={"at": at}), 1))
    harness.read(beats, conflict=False)
    # Then their GPUs are offered as those of nodes just heard from
    ops = [("submit", 5, 2, "a", False), ("submit", 5, 4, "b", False)]
    harness.read([d for d in map(harness.delivery, ops) if d is not None], conflict=False)
    assert {j.job_id: (j.status, j.node) for j in harness.state.jobs.values()} == {
        "j1": ("scheduled", "a"),
        "j2": ("scheduled", "b"),
    }
    # And heartbeats that reached Redis minutes ago (a backlog read late) offer nothing
    late = Harness()
    old = [late.heartbeat(node, 0) for node in sorted(NODES)]
    late.read(
        [Delivery(d.stream, f"{late.base_ms - 480_000}-{i}", d.message, 1) for i, d in enumerate(old)], conflict=False
    )
    late.read([d for d in map(late.delivery, [("submit", 5, 1, None, False)]) if d], conflict=False)
    assert sorted(late.state.nodes) == ["a", "b"] and late.state.jobs["j1"].status == "queued"
    # And a heartbeat delivered again after a newer one (a restart's re-read) does not replace it
    idle = harness.heartbeat("a", 0)
    busy = harness.heartbeat("a", 5000)  # appended after it
    harness.read([idle, busy], conflict=False)
    harness.read([Delivery(idle.stream, idle.entry_id, idle.message, 2)], conflict=False)
    assert harness.scheduler.liveness.heartbeats["a"].gpus[0].memory_used_mb == 5000
    # nor changes the node: a GPU dropped from node b since then stays dropped
    fresh = Harness()
    old_b = fresh.heartbeat("b", 0)
    one_gpu = old_b.message.model_copy(update={"gpus": old_b.message.gpus[:1]})  # type: ignore[attr-defined]
    fresh.read([Delivery(old_b.stream, fresh.next_id(), one_gpu, 1)], conflict=False)
    assert len(fresh.state.nodes["b"].gpus) == 1
    fresh.read([Delivery(old_b.stream, old_b.entry_id, old_b.message, 2)], conflict=False)
    assert len(fresh.state.nodes["b"].gpus) == 1


def test_a_gpu_our_job_left_is_offered_at_once_not_after_the_nodes_next_heartbeat() -> None:
    # Given job j1 training on both GPUs of node a, read by a heartbeat while it ran
    harness = Harness()
    scheduler = harness.scheduler
    harness.read([harness.heartbeat(node, 0) for node in sorted(NODES)], conflict=False)
    harness.read([harness.delivery(("submit", 5, 2, "a", False))], conflict=False)  # type: ignore[list-item]
    harness.read([harness.foreign(started("j1", 1, "a", ""))], conflict=False)
    harness.read([harness.heartbeat("a", 20_000)], conflict=False)
    taken_before_the_end = harness.heartbeat("a", 20_000)  # reaches the scheduler late
    # When its runner reports its end (its processes gone), folded by the catch-up
    held = dict(harness.state.allocations)
    ended = harness.foreign(m.JobSucceeded(job_id="j1", attempt=1, exit_code=0, run_dir="/r"))
    scheduler.liveness.note_left(scheduler.state, held)
    # Then the GPUs read free of it: a job for both GPUs of node a starts there at once
    assert [gpu.memory_used_mb for gpu in scheduler.liveness.heartbeats["a"].gpus] == [0, 0]
    harness.read([ended, harness.delivery(("submit", 5, 2, "a", False))], conflict=False)  # type: ignore[list-item]
    assert (harness.state.jobs["j2"].status, harness.state.jobs["j2"].node) == ("scheduled", "a")
    # And a reading taken before the end and delivered after it still reads without j1
    harness.read([taken_before_the_end], conflict=False)
    assert [gpu.memory_used_mb for gpu in scheduler.liveness.heartbeats["a"].gpus] == [0, 0]
    # But a reading taken after the end is taken as it is: the memory used there is another's
    harness.read([harness.heartbeat("a", 20_000)], conflict=False)
    assert [gpu.memory_used_mb for gpu in scheduler.liveness.heartbeats["a"].gpus] == [20_000, 20_000]
    assert "a" not in scheduler.liveness.left
    check(harness)


def test_a_runner_heard_in_an_earlier_term_gets_a_full_timeout_when_the_scheduler_leads_again() -> None:
    # Given a scheduler that heard node a's runner long ago, in an earlier term as leader
    harness = Harness()
    harness.read([harness.heartbeat(node, 0) for node in sorted(NODES)], conflict=False)
    scheduler = harness.scheduler
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    scheduler.liveness.runner_heard = {"a": long_ago}
    # When it leads again, and hears node a's monitor
    scheduler.liveness.hear_anew(scheduler.state, datetime.now(UTC))
    harness.read([harness.heartbeat("a", 0)], conflict=False)
    # Then node a is not lost for its runner's silence before this term
    assert harness.state.nodes["a"].up and scheduler.liveness.runner_heard["a"] > long_ago


def test_a_spell_in_which_no_one_could_write_is_no_ones_silence_but_a_node_silent_alone_is_lost() -> None:
    # Given both nodes heard from
    harness = Harness()
    harness.read([harness.heartbeat(node, 0) for node in sorted(NODES)], conflict=False)
    scheduler = harness.scheduler
    timeout_s = harness.settings.node_timeout_s
    start = datetime.now(UTC)

    def gateway_beat(after_s: float) -> list[object]:
        at = start + timedelta(seconds=after_s)
        beat = m.ServiceHeartbeat(service="gateway", instance="g", started_at=start, interval_s=2)
        entry_id = f"{int(at.timestamp() * 1000)}-0"
        decided, _ = scheduler.decider.decide(Delivery(harness.keys.telemetry, entry_id, beat, 1), at)
        return [append.message for append in decided]

    # When nothing at all lands in the telemetry stream for twice the node timeout (Redis full)
    # and then the first heartbeat does
    assert gateway_beat(2 * timeout_s) == []
    # Then no node is lost for that spell
    assert all(node.up for node in harness.state.nodes.values())
    # But heard from no more while others are, for the node timeout, they are
    after_s = 2 * timeout_s
    while not (lost := gateway_beat(after_s)):
        after_s += harness.settings.heartbeat_interval_s
        assert after_s < 4 * timeout_s, "the silent nodes were never lost"
    assert any(isinstance(fact, m.NodeLost) for fact in lost)


command = st.one_of(
    submit,
    st.tuples(st.sampled_from(["cancel", "release"]), st.integers(0, 30)),
    st.tuples(st.just("priority"), st.integers(0, 30), st.integers(0, 10)),
    st.tuples(st.just("heartbeat"), st.sampled_from(sorted(NODES)), st.sampled_from([0, 5000])),
    st.tuples(st.just("process")),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(command, min_size=1, max_size=8), st.sampled_from(["ok", "later", "both"]))))
def test_a_read_decided_while_the_one_before_is_in_flight_keeps_or_takes_back_exactly(reads: list) -> None:  # type: ignore[type-arg]
    """As the scheduler overlaps commits: read N+1 is decided on top of read N's savepoint; then
    N lands (released while N+1 stays open) or does not (both taken back, N decided again)."""
    harness = Harness()
    harness.read([harness.heartbeat(node, 0) for node in sorted(NODES)], conflict=False)
    state = harness.state
    pending = None  # the read in flight: its plan, deliveries, and the state before it
    for operations, outcome in reads:
        deliveries = [d for d in map(harness.delivery, operations) if d is not None]
        before = state.model_dump()
        state.savepoint()
        plan = harness.scheduler.decider.plan(deliveries)
        if pending is not None:
            previous, earlier, before_previous = pending
            if outcome == "both":  # the read in flight did not land: take both back, decide it again
                state.rollback()
                state.rollback()
                assert state.model_dump() == before_previous
                harness.read(earlier, conflict=False)
                check(harness)
                before = state.model_dump()
                state.savepoint()
                plan = harness.scheduler.decider.plan(deliveries)
            else:
                harness.keep(previous)  # it landed: this read stays open on top
                assert state.savepoints == 1 and not state.committed_position.startswith("~")
                before = before_after_keep(harness, before)
                if outcome == "later":  # this one's commit conflicts: taken back to the kept state
                    state.rollback()
                    assert state.model_dump() == before
                    check(harness)
                    before = state.model_dump()
                    state.savepoint()
                    plan = harness.scheduler.decider.plan(deliveries)
        pending = (plan, deliveries, before)
    if pending is not None:
        harness.keep(pending[0])
    assert state.savepoints == 0
    check(harness)


def before_after_keep(harness: Harness, before: dict) -> dict:  # type: ignore[type-arg]
    """The state before a read, with the stand-ins of the read kept under it renamed."""
    renamed = harness.renamed
    for job in before["jobs"].values():
        job["first_entry_id"] = renamed.get(job["first_entry_id"], job["first_entry_id"])
        job["last_entry_id"] = renamed.get(job["last_entry_id"], job["last_entry_id"])
    before["position"] = renamed.get(before["position"], before["position"])
    return before
