"""Property-based: random sequences of submits (gang jobs on two nodes among them), cancels, priority changes, completions, failures,
attempts lost while no runner watched, late reports of ended attempts, heartbeats (with foreign processes) and node losses, applied
through the scheduler's real rules and the fold. After every step: no GPU is held twice; the queue
holds exactly the queued jobs, in (priority desc, submit order); no job started ahead of a waiting
one that could start once our jobs end, and none is left waiting on GPUs it fits ahead of such a
one; every job is in a state consistent with its GPUs; a late report changes nothing; and folding
the emitted log from scratch gives the same state."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import event as seen
from hypothesis import strategies as st

from events import messages as m
from events.bus import Append
from events.placement import matching
from events.records import HOLDS_GPUS, WAITING, Job, JobStatus, gpu_key
from events.state import State
from services.scheduler import rules
from tests.examples import started
from tests.test_scheduler_rules import KEYS, LIMITS, NOW, Cluster

NODES = {"a": 2, "b": 4}

submit = st.tuples(
    st.just("submit"),
    st.integers(0, 10),
    st.integers(1, 4),
    st.sampled_from([None, "a", "b"]),
    st.integers(0, 1),
    st.sampled_from([1, 1, 2]),  # nodes: a gang job on both nodes now and then
)
job = st.integers(0, 30)  # the index of a job, in submit order
# Weighted so that queues form: submits and job ends often, node losses rarely
operation = st.one_of(
    *[submit] * 4,
    st.tuples(st.just("cancel"), job),
    st.tuples(st.just("priority"), job, st.integers(0, 10)),
    *[st.tuples(st.just("start"), job)] * 2,
    *[st.tuples(st.just("succeed"), job)] * 2,
    st.tuples(st.just("fail"), job),
    st.tuples(st.just("late"), job),
    st.tuples(st.just("runner_lost"), job),
    *[st.tuples(st.just("heartbeat"), st.sampled_from(sorted(NODES)), st.sampled_from([0, 0, 5000]))] * 2,
    st.tuples(st.just("lose"), st.sampled_from(sorted(NODES))),
)


class Scheduler(Cluster):
    """The cluster, with every emitted event kept, to be folded again from scratch."""

    def __init__(self) -> None:
        self.log: list[tuple[str, m.Message]] = []
        super().__init__(NODES)

    def heartbeat(self, name: str, count: int, used_mb: int = 0, at: object = NOW) -> None:
        super().heartbeat(name, count, used_mb)
        self.heartbeats[name] = self.heartbeats[name].model_copy(update={"addr": f"{name}.cluster"})

    def fold(self, appends: list[Append]) -> list[m.Message]:
        commands = []
        for item in appends:
            if item.stream == KEYS.events:
                self.n += 1
                self.state.apply(f"{self.n}-0", item.message)  # raises on an illegal decision
                self.log.append((f"{self.n}-0", item.message))
            else:
                commands.append(item.message)
        return commands

    def react(self, event: m.Message) -> None:
        self.fold([Append(KEYS.events, event)])
        self.fold(rules.on_event(self.state, KEYS, self.heartbeats, LIMITS, NOW, event))

    def job(self, index: int) -> str | None:
        ids = sorted(self.state.jobs, key=lambda job_id: self.state.jobs[job_id].seq)
        return ids[index % len(ids)] if ids else None

    def apply(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind == "submit":
            _, priority, gpus, node, retries, nodes = op
            job_id = f"j{self.n}"
            command = m.SubmitJob(
                job_id=job_id,
                spec=_spec(priority, gpus, None if nodes == 2 else node, retries, nodes),
                actor="prop",  # type: ignore[arg-type]
            )
            self.fold(rules.submit(self.state, KEYS, command, self.heartbeats, LIMITS, NOW))
            return
        if kind == "heartbeat":
            _, node, used = op
            self.heartbeat(node, NODES[node], used_mb=used)  # type: ignore[arg-type]
            joined = rules.node_changes(self.state, self.heartbeats[node])  # type: ignore[index]
            if joined:
                for fact in joined:
                    self.react(fact)
            else:
                self.fold(rules.schedule(self.state, KEYS, self.heartbeats, LIMITS, NOW, m.ProcessQueue()))
            return
        if kind == "lose":
            node = op[1]
            if self.state.nodes[node].up:  # type: ignore[index]
                cause = m.ProcessQueue()
                self.fold(rules.lose_node(self.state, KEYS, node, cause))  # type: ignore[arg-type]
                self.heartbeats[node] = self.heartbeats[node].model_copy(update={"at": NOW - timedelta(hours=1)})  # type: ignore[index]
                self.fold(rules.schedule(self.state, KEYS, self.heartbeats, LIMITS, NOW, cause))
            return
        job_id = self.job(op[1])  # type: ignore[arg-type]
        if job_id is None:
            return
        job = self.state.jobs[job_id]
        if kind == "cancel":
            stops = self.fold(rules.cancel(self.state, KEYS, m.CancelJob(job_id=job_id)))
            if stops and job.status == JobStatus.scheduled:  # the runner ends it
                self.react(m.JobCancelled(job_id=job_id, attempt=job.attempt))
            elif job.status == JobStatus.cancelled:
                self.fold(rules.schedule(self.state, KEYS, self.heartbeats, LIMITS, NOW, m.ProcessQueue()))
        elif kind == "priority":
            self.fold(rules.set_priority(self.state, KEYS, m.SetPriority(job_id=job_id, priority=op[2])))  # type: ignore[arg-type]
            self.fold(rules.schedule(self.state, KEYS, self.heartbeats, LIMITS, NOW, m.ProcessQueue()))
        elif kind == "start" and job.status == JobStatus.scheduled:  # (a gang job's next rank)
            rank = min(set(range(job.spec.nodes)) - set(job.ranks_started))
            start_report = started(job_id, job.attempt, job.ranks[rank].node, "").model_copy(update={"rank": rank})
            self.fold([Append(KEYS.events, start_report)])
        elif kind == "succeed" and job.status == JobStatus.running:
            self.react(m.JobSucceeded(job_id=job_id, attempt=job.attempt, exit_code=0, run_dir="/r"))
        elif kind == "fail" and job.status in HOLDS_GPUS and job.peers:  # a rank fails: all go
            retried = job.retries < job.spec.max_retries
            node = job.peers[0].node
            self.react(m.RankEnded(job_id=job_id, attempt=job.attempt, rank=1, node=node, failed=True, reason="oom"))
            assert job.status == (JobStatus.queued if retried else JobStatus.failed)
            self.fold(rules.schedule(self.state, KEYS, self.heartbeats, LIMITS, NOW, m.ProcessQueue()))
        elif kind == "fail" and job.status in HOLDS_GPUS:
            self.react(m.JobFailed(job_id=job_id, attempt=job.attempt, reason="oom"))
        elif kind == "runner_lost" and job.status in HOLDS_GPUS:  # it ended while no runner watched
            retried = job.retries < job.spec.max_retries
            self.react(m.JobLost(job_id=job_id, attempt=job.attempt))
            assert job.status == (JobStatus.queued if retried else JobStatus.failed)
            self.fold(rules.schedule(self.state, KEYS, self.heartbeats, LIMITS, NOW, m.ProcessQueue()))
        elif kind == "late":  # a stopped process of an ended attempt reports
            attempt = job.attempt if job.status in WAITING else job.attempt - 1
            if attempt >= 1:
                before, stale = job.model_dump(), self.state.stale_reports
                self.react(m.JobFailed(job_id=job_id, attempt=attempt, reason="killed"))
                assert job.model_dump() == before and self.state.stale_reports == stale + 1


def _spec(priority: int, gpus: int, node: str | None, retries: int, nodes: int = 1) -> object:
    from tests.examples import LM

    fields = {"priority": priority, "gpu_count": gpus, "node": node, "max_retries": retries, "nodes": nodes}
    return LM.model_validate({**LM.model_dump(), **fields})


def could_start_once_ours_end(job: Job, cluster: Scheduler) -> bool:
    """Whether the job fits the GPUs of the nodes offering GPUs now (up, heard from lately), were
    they all free: it waits on GPUs that are busy, not on a node to come back."""
    state = cluster.state
    live = rules.usable_gpus(state, cluster.heartbeats, LIMITS, NOW)
    fitting = [name for name in live if len(matching(job.spec, name, state.nodes[name].gpus)) >= job.spec.gpu_count]
    return len(fitting) >= job.spec.nodes


def check_invariants(cluster: Scheduler, decided: Sequence[m.Message] = ()) -> None:
    state = cluster.state
    check_state(state, cluster.log)
    # Strict order: nothing waits on GPUs it fits now ahead of a job that blocks it...
    usable = rules.usable_gpus(state, cluster.heartbeats, LIMITS, NOW)
    for job in state.queue():
        assert rules.place_job(state, job, usable) is None, f"{job.job_id} could start now"
        if could_start_once_ours_end(job, cluster):
            break
    # ...and no job started ahead of a waiting one that could start once our jobs end
    for event in decided:
        if isinstance(event, m.JobScheduled):
            started_job = state.jobs[event.job_id or ""]
            for waiting in state.queue():
                if (-waiting.priority, waiting.seq) < (-started_job.priority, started_job.seq):
                    assert not could_start_once_ours_end(waiting, cluster), f"{event.job_id} jumped {waiting.job_id}"


def check_state(state: State, log: list[tuple[str, m.Message]]) -> None:
    """No GPU held twice, allocations as the jobs say, the queue in order, and the log folds to
    the same state from scratch."""
    holders: dict[str, str] = {}
    for job in state.jobs.values():
        if job.status in HOLDS_GPUS:
            assert len(job.ranks) == job.spec.nodes and len({rank.node for rank in job.ranks}) == job.spec.nodes
            for rank in job.ranks:
                for index in rank.gpu_ids:
                    key = gpu_key(rank.node, index)
                    assert key not in holders, f"GPU {key} held by {holders.get(key)} and {job.job_id}"
                    holders[key] = job.job_id
                assert state.nodes[rank.node].up
    assert holders == state.allocations
    queued = sorted(
        (j for j in state.jobs.values() if j.status == JobStatus.queued), key=lambda j: (-j.priority, j.seq)
    )
    assert [j.job_id for j in state.queue()] == [j.job_id for j in queued]
    rebuilt = State()
    for entry_id, event in log:
        rebuilt.apply(entry_id, event)
    assert rebuilt.model_dump() == state.model_dump()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=10, max_size=60))
def test_any_sequence_keeps_the_scheduler_invariants(operations: list[tuple[object, ...]]) -> None:
    cluster = Scheduler()
    check_invariants(cluster)
    for op in operations:
        logged = len(cluster.log)
        cluster.apply(op)
        decided = [event for _, event in cluster.log[logged:]]
        if any(isinstance(e, m.JobScheduled) and e.peers for e in decided):
            seen("a gang job placed")
        if any(isinstance(e, m.RankEnded) for e in decided):
            seen("a gang job's rank failed")
        check_invariants(cluster, decided)
