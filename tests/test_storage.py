"""Checkpoints another node can reach: nodes tell which storage roots they share by marker files,
and a job that resumes from a checkpoint goes only to a node that can read it, waits for the
node that wrote it, or (LOST_CHECKPOINT=restart) starts from zero with the reason in the log."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from events import messages as m
from events.bus import Append
from events.records import JobStatus
from services.scheduler import rules
from services.storage import storage_roots
from tests.test_gang_rules import Nodes
from tests.test_scheduler_rules import KEYS, LIMITS, NOW

SHARED = "/mnt/shared"


def test_a_node_sees_the_markers_of_the_nodes_that_share_a_root_and_only_its_own_elsewhere(tmp_path: Path) -> None:
    shared, private_a, private_b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    for folder in (shared, private_a, private_b):
        folder.mkdir()
    storage_roots([shared, private_a], "node-a")
    seen_by_b = storage_roots([shared, private_b, tmp_path / "missing" / "x"], "node-b")
    assert [(Path(r.path).name, r.nodes) for r in seen_by_b] == [("b", ["node-b"]), ("shared", ["node-a", "node-b"])]
    assert [r.nodes for r in storage_roots([private_a], "node-a")] == [["node-a"]]


def sharing(cluster: Nodes, roots: dict[str, list[str]]) -> None:
    """The nodes' heartbeats say which nodes' markers they see in SHARED."""
    for name, seen in roots.items():
        beat = cluster.heartbeats[name]
        cluster.heartbeats[name] = beat.model_copy(update={"roots": [m.StorageRoot(path=SHARED, nodes=seen)]})


def lost_with_checkpoint(cluster: Nodes, checkpoint: str) -> str:
    """A job that ran on a node and saved a checkpoint there, then lost with its node (retried)."""
    cluster.submit("job", max_retries=2)
    node = cluster.state.jobs["job"].node or ""
    cluster.start_ranks("job", 0)
    cluster.fold([Append(KEYS.events, m.CheckpointSaved(job_id="job", attempt=1, step=10, path=checkpoint))])
    del cluster.heartbeats[node]  # (silent: offered to no one)
    cluster.fold(rules.lose_node(cluster.state, KEYS, node, m.ProcessQueue()))
    return node


def decide(cluster: Nodes, limits: rules.Limits = LIMITS) -> list[Append]:
    return rules.schedule(cluster.state, KEYS, cluster.heartbeats, limits, NOW, m.ProcessQueue())


def reschedule(cluster: Nodes, limits: rules.Limits = LIMITS) -> list[m.Message]:
    return cluster.fold(decide(cluster, limits))


def test_a_retried_job_resumes_on_a_node_that_shares_the_storage_of_its_checkpoint() -> None:
    # Given nodes a, b, c: a and c share SHARED, b does not
    cluster = Nodes({"a": 1, "b": 1, "c": 1})
    sharing(cluster, {"a": ["a", "c"], "b": ["b"], "c": ["a", "c"]})
    # When a job with a checkpoint in SHARED, saved on a, is retried after a is lost
    lost = lost_with_checkpoint(cluster, f"{SHARED}/job/checkpoint-10")
    assert lost == "a"
    [start] = [c for c in reschedule(cluster) if isinstance(c, m.StartJob)]
    # Then it starts on c, from that checkpoint, not on b
    assert (start.node, start.resume_from) == ("c", f"{SHARED}/job/checkpoint-10")


def test_a_checkpoint_no_node_in_service_can_read_waits_for_its_node_or_starts_from_zero_with_the_reason() -> None:
    cluster = Nodes({"a": 1, "b": 1})
    sharing(cluster, {"a": ["a"], "b": ["b"]})
    lost_with_checkpoint(cluster, "/local/a/job/checkpoint-10")
    # Then by default it waits for node a, and holds up no one
    assert reschedule(cluster) == [] and cluster.state.jobs["job"].status == JobStatus.queued
    cluster.submit("other")
    assert cluster.state.jobs["other"].status == JobStatus.scheduled
    cluster.finish("other")
    # And with LOST_CHECKPOINT=restart it starts on b from zero, the log saying why
    decided = decide(cluster, dataclasses.replace(LIMITS, restart_lost_checkpoints=True))
    [scheduled] = [a.message for a in decided if isinstance(a.message, m.JobScheduled)]
    assert "checkpoint /local/a/job/checkpoint-10 is on node a, which is lost" in (scheduled.fresh_start or "")
    [start] = [c for c in cluster.fold(decided) if isinstance(c, m.StartJob)]
    assert (start.node, start.resume_from) == ("b", None)
    job = cluster.state.jobs["job"]
    assert job.last_checkpoint is None and job.status == JobStatus.scheduled


def test_a_node_reporting_no_roots_reads_only_what_it_wrote() -> None:
    cluster = Nodes({"a": 1, "b": 1})  # no roots in the heartbeats (an older node)
    cluster.submit("job", max_retries=1)
    cluster.start_ranks("job", 0)
    cluster.fold([Append(KEYS.events, m.CheckpointSaved(job_id="job", attempt=1, step=3, path="/x/checkpoint-3"))])
    node = cluster.state.jobs["job"].node
    failed = m.JobLost(job_id="job", attempt=1)
    cluster.event(failed)
    [start] = [c for c in reschedule(cluster) if isinstance(c, m.StartJob)]
    assert start.node == node and start.resume_from == "/x/checkpoint-3"
