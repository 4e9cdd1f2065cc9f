"""Gang jobs in the scheduler's rules and the fold: a job on several nodes is placed all at once
or not at all, started rank by rank, runs once every rank has started, and is stopped and
retried (or failed) as one unit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events import messages as m
from events.bus import Append
from events.errors import IllegalTransition
from events.records import Job, JobStatus, Node
from events.state import State
from services.scheduler import rules
from tests.examples import LM, started
from tests.test_scheduler_rules import KEYS, LIMITS, NOW, Cluster


class Nodes(Cluster):
    """Nodes that advertise an address (NODE_ADDR), except those named in ``hidden``."""

    def __init__(self, nodes: dict[str, int], hidden: frozenset[str] = frozenset()) -> None:
        self.hidden = hidden
        super().__init__(nodes)

    def heartbeat(self, name: str, count: int, used_mb: int = 0, at: object = NOW) -> None:
        super().heartbeat(name, count, used_mb)
        if name not in self.hidden:
            self.heartbeats[name] = self.heartbeats[name].model_copy(update={"addr": f"10.0.0.{ord(name[-1])}"})

    def event(self, fact: m.Message) -> list[m.Message]:
        """A fact reported to the log, then what the scheduler decides in response."""
        self.fold([Append(KEYS.events, fact)])
        return self.fold(rules.on_event(self.state, KEYS, self.heartbeats, LIMITS, NOW, fact))

    def start_ranks(self, job_id: str, *ranks: int) -> None:
        job = self.state.jobs[job_id]
        for rank in ranks:
            node = job.ranks[rank].node
            self.fold([Append(KEYS.events, started(job_id, job.attempt, node).model_copy(update={"rank": rank}))])


def starts(commands: list[m.Message]) -> list[tuple[str, int, list[int]]]:
    return [(c.node, c.rank, c.gpu_ids) for c in commands if isinstance(c, m.StartJob)]


def stops(commands: list[m.Message]) -> list[tuple[str, int, str]]:
    return [(c.job_id or "", c.rank, c.reason) for c in commands if isinstance(c, m.StopJob)]


def test_a_gang_job_is_placed_on_as_many_nodes_at_once_with_rank_0_where_the_others_reach_it() -> None:
    # Given three nodes of two GPUs, of which node a advertises no address
    cluster = Nodes({"a": 2, "b": 2, "c": 2}, hidden=frozenset({"a"}))
    # When a job asks for two nodes with two GPUs each
    commands = cluster.submit("gang", gpus=2, nodes=2)
    # Then one decision places both ranks, rank 0 on a node with an address, each start on its node
    [scheduled] = [e for e in cluster.state.jobs.values()]
    assert scheduled.status == JobStatus.scheduled
    assert starts(commands) == [("b", 0, [0, 1]), ("a", 1, [0, 1])]
    first, second = [c for c in commands if isinstance(c, m.StartJob)]
    assert first.master_addr == second.master_addr == "10.0.0.98"  # b's
    assert first.master_port == second.master_port and first.master_port in LIMITS.rendezvous_ports
    # And the fold holds the GPUs of both nodes for it
    assert {key for key, holder in cluster.state.allocations.items() if holder == "gang"} == {
        "a/0",
        "a/1",
        "b/0",
        "b/1",
    }


def test_a_gang_job_runs_once_every_rank_has_started_and_rank_0_may_report_before() -> None:
    cluster = Nodes({"a": 1, "b": 1})
    cluster.submit("gang", nodes=2)
    # When rank 0 starts, and reports progress before rank 1's start is in the log
    cluster.start_ranks("gang", 0)
    assert cluster.state.jobs["gang"].status == JobStatus.scheduled
    cluster.fold([Append(KEYS.events, m.JobProgress(job_id="gang", attempt=1, step=1, max_steps=10))])
    # Then it is running only once rank 1 has started too
    cluster.start_ranks("gang", 1)
    job = cluster.state.jobs["gang"]
    assert job.status == JobStatus.running and job.progress is not None and job.progress.step == 1
    # And a rank cannot start twice
    with pytest.raises(IllegalTransition):
        cluster.start_ranks("gang", 1)


def test_a_gang_job_never_holds_part_of_its_nodes_and_holds_up_the_jobs_behind_it() -> None:
    # Given two nodes of one GPU, one of them busy
    cluster = Nodes({"a": 1, "b": 1})
    cluster.submit("busy", priority=9)
    busy_node = cluster.state.jobs["busy"].node
    # When a two-node job is submitted, then a one-GPU job of lower priority
    assert starts(cluster.submit("gang", priority=5, nodes=2)) == []
    assert starts(cluster.submit("small", priority=1)) == []
    # Then neither starts: the gang holds nothing, and the job behind it waits its turn
    assert cluster.state.jobs["gang"].status == JobStatus.queued
    assert cluster.state.jobs["small"].status == JobStatus.queued
    assert set(cluster.state.allocations.values()) == {"busy"} and busy_node
    # And when the busy job ends, the gang starts on both nodes
    commands = cluster.finish("busy")
    assert sorted(node for node, _, _ in starts(commands)) == ["a", "b"]


def test_a_gang_job_no_nodes_of_the_cluster_could_ever_hold_is_refused_with_the_reason() -> None:
    cluster = Nodes({"a": 2, "b": 2})
    cluster.submit("wide", nodes=3)
    job = cluster.state.jobs["wide"]
    assert job.status == JobStatus.failed and job.reason == "unsatisfiable"
    assert "3-node job needs 3 nodes" in (job.message or "") and "2 of the cluster's 2 nodes" in (job.message or "")
    # And nodes none of which could be rank 0 cannot run one either
    cluster = Nodes({"a": 2, "b": 2}, hidden=frozenset({"a", "b"}))
    cluster.submit("nameless", nodes=2)
    assert "NODE_ADDR" in (cluster.state.jobs["nameless"].message or "")


def running_gang(retries: int) -> Nodes:
    cluster = Nodes({"a": 1, "b": 1, "c": 1})
    cluster.submit("gang", nodes=2, max_retries=retries)
    cluster.start_ranks("gang", 0, 1)
    return cluster


@pytest.mark.parametrize("retries", [0, 1])
def test_a_failed_rank_stops_every_other_rank_and_the_job_runs_again_or_fails_with_its_reason(retries: int) -> None:
    cluster = running_gang(retries)
    job = cluster.state.jobs["gang"]
    # When rank 1 exits with an error by itself
    failed = m.RankEnded(
        job_id="gang", attempt=1, rank=1, node=job.ranks[1].node, exit_code=1, failed=True, reason="oom", message="OOM"
    )
    commands = cluster.event(failed)
    # Then rank 0 is told to stop, and the job is queued again, or failed with the rank's reason
    assert stops(commands)[:1] == [("gang", 0, "preempt")]
    job = cluster.state.jobs["gang"]
    if retries:
        assert job.status == JobStatus.queued and job.retries == 1
    else:
        assert job.status == JobStatus.failed and job.reason == "oom"
        assert job.message == f"rank 1 on node {failed.node} failed: OOM"
    assert "gang" not in cluster.state.allocations.values()


def test_a_rank_that_ended_as_told_changes_nothing() -> None:
    cluster = running_gang(1)
    ended = m.RankEnded(job_id="gang", attempt=1, rank=1, node="b", exit_code=0)
    assert cluster.event(ended) == [] and cluster.state.jobs["gang"].status == JobStatus.running


def test_losing_the_node_of_any_rank_stops_every_rank_and_retries_the_job() -> None:
    cluster = running_gang(1)
    peer = cluster.state.jobs["gang"].ranks[1].node
    commands = cluster.fold(rules.lose_node(cluster.state, KEYS, peer, m.ProcessQueue()))
    assert sorted(stops(commands)) == [("gang", 0, "preempt"), ("gang", 1, "preempt")]
    assert cluster.state.jobs["gang"].status == JobStatus.queued and cluster.state.jobs["gang"].retries == 1


def test_cancelling_a_gang_job_stops_every_rank() -> None:
    cluster = running_gang(0)
    commands = cluster.fold(rules.cancel(cluster.state, KEYS, m.CancelJob(job_id="gang")))
    assert sorted(stops(commands)) == [("gang", 0, "cancel"), ("gang", 1, "cancel")]


def test_a_job_on_several_gpus_of_one_node_gets_a_rendezvous_port_of_its_own() -> None:
    cluster = Nodes({"a": 4})
    one = [c for c in cluster.submit("one", gpus=1) if isinstance(c, m.StartJob)]
    two = [c for c in cluster.submit("two", gpus=2) if isinstance(c, m.StartJob)]
    three = [c for c in cluster.submit("three-ish", gpus=1) if isinstance(c, m.StartJob)]
    assert one[0].master_port is None and three[0].master_port is None
    assert two[0].master_port in LIMITS.rendezvous_ports
    assert cluster.state.jobs["two"].master_port == two[0].master_port


def test_an_attempt_lost_with_its_node_before_every_rank_started_costs_no_retry() -> None:
    # Given a gang job without retries, placed; rank 0 has started, rank 1 not yet
    cluster = Nodes({"a": 1, "b": 1})
    cluster.submit("gang", nodes=2)
    cluster.start_ranks("gang", 0)
    peer = cluster.state.jobs["gang"].ranks[1].node
    # When rank 1's node is lost (the attempt may have been placed there as it went silent)
    commands = cluster.fold(rules.lose_node(cluster.state, KEYS, peer, m.ProcessQueue()))
    # Then every rank is told to stop, and the job waits to run again, its retries untouched
    assert sorted(stops(commands)) == [("gang", 0, "preempt"), ("gang", 1, "preempt")]
    job = cluster.state.jobs["gang"]
    assert job.status == JobStatus.queued and job.retries == 0
    # While one that had run fails for want of retries
    cluster = running_gang(0)
    peer = cluster.state.jobs["gang"].ranks[1].node
    cluster.fold(rules.lose_node(cluster.state, KEYS, peer, m.ProcessQueue()))
    assert cluster.state.jobs["gang"].status == JobStatus.failed


@given(
    nodes=st.lists(
        st.tuples(
            st.lists(st.tuples(st.sampled_from(["A100", "H100"]), st.integers(0, 80_000)), max_size=8),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    ),
    count=st.integers(1, 8),
    ranks=st.integers(1, 3),
    model=st.sampled_from([None, "h100"]),
    memory=st.sampled_from([None, 40_000]),
    node=st.sampled_from([None, "n0"]),
)
@settings(max_examples=300, deadline=None)
def test_whether_a_job_could_be_placed_is_whether_it_would_be(
    nodes: list[tuple[list[tuple[str, int]], bool]],
    count: int,
    ranks: int,
    model: str | None,
    memory: int | None,
    node: str | None,
) -> None:
    # Given nodes of GPUs of two models with some free memory, some advertising an address
    state = State()
    gpus: dict[str, list[m.GpuInfo]] = {}
    for i, (found, addressed) in enumerate(nodes):
        name = f"n{i}"
        gpus[name] = [
            m.GpuSample(index=k, uuid=f"{name}-{k}", name=f"NVIDIA {kind}", memory_total_mb=80_000, memory_used_mb=used)
            for k, (kind, used) in enumerate(found)
        ]
        state.nodes[name] = Node(
            name=name, simulated=True, gpus=gpus[name], addr="10.0.0.1" if addressed else None, joined_at=NOW
        )
    spec = LM.model_copy(
        update={"gpu_count": count, "nodes": ranks, "gpu_model": model, "min_gpu_memory_mb": memory}
        | ({"node": node} if ranks == 1 else {})
    )
    job = Job(job_id="j", spec=spec, priority=5, seq=1, submitted_at=NOW, first_entry_id="1-0", last_entry_id="1-0")
    # Then the quick answer to "could it be placed" is what working out the placement says
    assert rules.could_place(state, job, gpus) == (rules.place_job(state, job, gpus) is not None)
