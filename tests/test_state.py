"""The fold: legal lives of a job, illegal transitions refused, GPUs never held twice."""

from __future__ import annotations

import pytest

from events import messages as m
from events.errors import IllegalTransition
from events.records import ExportStatus, JobStatus
from events.state import State
from tests.examples import GPU, LM, started


class Log:
    """Appends events to a state with increasing entry ids, as the stream would."""

    def __init__(self) -> None:
        self.state = State()
        self.n = 0

    def add(self, *events: m.Message) -> State:
        for event in events:
            self.n += 1
            self.state.apply(f"{self.n}-0", event)
        return self.state


def node(name: str = "n1", gpus: int = 2) -> m.NodeJoined:
    return m.NodeJoined(node=name, simulated=True, gpus=[GPU.model_copy(update={"index": i}) for i in range(gpus)])


def submit(log: Log, job_id: str, priority: int = 5) -> None:
    spec = LM.model_copy(update={"priority": priority})
    log.add(m.JobAccepted(job_id=job_id, spec=spec, actor="alice"), m.JobQueued(job_id=job_id, position=1))


def test_a_training_job_lives_from_accepted_to_exported() -> None:
    log = Log()
    log.add(node())
    submit(log, "j")
    log.add(
        m.JobScheduled(job_id="j", node="n1", gpu_ids=[1], attempt=1),
        m.JobStarted(
            job_id="j", attempt=1, node="n1", pid=5, pgid=5, run_dir="/r", argv=["swift"], cuda_visible_devices="1"
        ),
        m.JobProgress(job_id="j", attempt=1, step=5, max_steps=10, percent=50.0, loss=2.0),
        m.CheckpointSaved(job_id="j", attempt=1, step=10, path="/r/checkpoint-10"),
    )
    assert log.state.allocations == {"n1/1": "j"}
    state = log.add(
        m.JobSucceeded(job_id="j", attempt=1, exit_code=0, run_dir="/r/v0", last_checkpoint="/r/checkpoint-10"),
        m.ExportRequested(job_id="j", checkpoint="/r/checkpoint-10", output_dir="/r/checkpoint-10-merged"),
        m.ExportStarted(job_id="j", argv=["swift", "export"]),
        m.ExportCompleted(job_id="j", path="/r/checkpoint-10-merged"),
    )
    job = state.jobs["j"]
    assert job.status == JobStatus.completed
    assert job.submitted_by == "alice"
    assert job.progress is not None and job.progress.step == 5 and job.progress.loss == 2.0
    assert job.last_checkpoint == "/r/checkpoint-10"
    assert job.export.status == ExportStatus.completed and job.export.path == "/r/checkpoint-10-merged"
    assert state.allocations == {}
    assert state.position == f"{log.n}-0"


def test_queue_is_by_priority_then_submit_order() -> None:
    log = Log()
    for job_id, priority in [("a", 1), ("b", 5), ("c", 5), ("d", 10), ("e", 1)]:
        submit(log, job_id, priority)
    assert [j.job_id for j in log.state.queue()] == ["d", "b", "c", "a", "e"]
    assert log.state.queue_position("a") == 4


@pytest.mark.parametrize(
    "event",
    [
        started("j", 0, "n1", ""),
        m.JobSucceeded(job_id="j", attempt=0, exit_code=0, run_dir="/r"),
        m.JobQueued(job_id="j", position=1),
        m.ExportStarted(job_id="j", argv=[]),
        m.JobCancelRequested(job_id="j"),
        m.JobAccepted(job_id="j", spec=LM),
        m.JobProgress(job_id="j", attempt=0, step=1, max_steps=2, percent=50.0),
    ],
    ids=lambda e: e.type,
)
def test_illegal_transitions_of_a_queued_job_raise_and_change_nothing(event: m.Message) -> None:
    log = Log()
    submit(log, "j")
    before = log.state.model_dump()
    with pytest.raises(IllegalTransition):
        log.state.apply("99-0", event)
    assert log.state.model_dump() == before


def test_an_event_for_an_unknown_job_raises() -> None:
    with pytest.raises(IllegalTransition, match="unknown job"):
        State().apply("1-0", m.JobQueued(job_id="ghost", position=1))


def test_a_gpu_is_never_held_by_two_jobs() -> None:
    log = Log()
    log.add(node(gpus=1))
    submit(log, "a")
    submit(log, "b")
    log.add(m.JobScheduled(job_id="a", node="n1", gpu_ids=[0], attempt=1))
    with pytest.raises(IllegalTransition, match="not free"):
        log.add(m.JobScheduled(job_id="b", node="n1", gpu_ids=[0], attempt=1))
    # Once a's run ends, the GPU is free for b.
    log.add(m.JobCancelled(job_id="a"))
    log.add(m.JobScheduled(job_id="b", node="n1", gpu_ids=[0], attempt=1))
    assert log.state.allocations == {"n1/0": "b"}


def test_scheduling_on_a_lost_or_unknown_node_or_gpu_raises() -> None:
    log = Log()
    log.add(node(gpus=1))
    submit(log, "a")
    with pytest.raises(IllegalTransition):
        log.add(m.JobScheduled(job_id="a", node="n1", gpu_ids=[3], attempt=1))
    with pytest.raises(IllegalTransition):
        log.add(m.JobScheduled(job_id="a", node="n9", gpu_ids=[0], attempt=1))
    log.add(m.NodeLost(node="n1"))
    with pytest.raises(IllegalTransition):
        log.add(m.JobScheduled(job_id="a", node="n1", gpu_ids=[0], attempt=1))


def test_reports_from_a_superseded_attempt_are_ignored() -> None:
    log = Log()
    log.add(node())
    submit(log, "j")
    log.add(m.JobScheduled(job_id="j", node="n1", gpu_ids=[0], attempt=2))
    log.add(m.JobFailed(job_id="j", attempt=1, reason="killed"))
    assert log.state.jobs["j"].status == JobStatus.scheduled
    assert log.state.stale_reports == 1


def test_late_reports_of_an_attempt_failed_with_its_lost_node_are_ignored() -> None:
    # Given a running job failed by the scheduler when its node was lost (no retries left)
    log = Log()
    log.add(node())
    submit(log, "j")
    log.add(m.JobScheduled(job_id="j", node="n1", gpu_ids=[0], attempt=1), started("j"))
    log.add(m.JobFailed(job_id="j", attempt=1, reason="node_lost"), m.NodeLost(node="n1"))
    # When the node's runner comes back and reports what its attempt did meanwhile
    log.add(
        m.JobProgress(job_id="j", attempt=1, step=3, max_steps=9),
        m.CheckpointSaved(job_id="j", attempt=1, step=3, path="/c/checkpoint-3"),
        m.JobFailed(job_id="j", attempt=1, reason="killed"),
    )
    # Then the reports are ignored as stale, not refused as illegal: the job stays as it ended
    job = log.state.jobs["j"]
    assert (job.status, job.reason, job.checkpoints) == (JobStatus.failed, "node_lost", [])
    assert log.state.stale_reports == 3


def test_cancel_of_a_queued_job_and_rejection_are_terminal() -> None:
    log = Log()
    submit(log, "a")
    log.add(m.JobCancelled(job_id="a"))
    assert log.state.jobs["a"].status == JobStatus.cancelled
    with pytest.raises(IllegalTransition):
        log.add(m.JobCancelled(job_id="a"))
    log.add(m.JobAccepted(job_id="r", spec=LM), m.JobRejected(job_id="r", reason="unsatisfiable", message="no"))
    assert log.state.jobs["r"].status == JobStatus.failed
    assert log.state.queue() == []


def test_export_only_of_a_completed_job_and_not_twice_at_once() -> None:
    log = Log()
    log.add(node())
    submit(log, "j")
    request = m.ExportRequested(job_id="j", checkpoint="/c", output_dir="/c-merged")
    with pytest.raises(IllegalTransition):
        log.add(request)
    log.add(
        m.JobScheduled(job_id="j", node="n1", gpu_ids=[0], attempt=1),
        started("j", 1, "n1", "0"),
        m.JobSucceeded(job_id="j", attempt=1, exit_code=0, run_dir="/r"),
        request,
    )
    with pytest.raises(IllegalTransition, match="already pending"):
        log.add(request)
    log.add(m.ExportStarted(job_id="j", argv=[]), m.ExportFailed(job_id="j", message="disk full"))
    assert log.state.jobs["j"].export.status == ExportStatus.failed
    log.add(request)  # a failed export may be asked for again
    assert log.state.jobs["j"].export.status == ExportStatus.pending


def test_a_queued_jobs_priority_changes_its_place_and_a_finished_job_can_be_deleted() -> None:
    log = Log()
    for job_id in ("a", "b", "c"):
        submit(log, job_id, priority=5)
    log.add(m.JobPriorityChanged(job_id="c", priority=9, previous=5))
    assert [j.job_id for j in log.state.queue()] == ["c", "a", "b"]
    with pytest.raises(IllegalTransition):
        log.add(m.JobDeleted(job_id="a"))  # still queued
    log.add(m.JobCancelled(job_id="a"), m.JobDeleted(job_id="a"))
    assert "a" not in log.state.jobs and "a" in log.state.deleted
    with pytest.raises(IllegalTransition):
        log.add(m.JobPriorityChanged(job_id="a", priority=1, previous=5))
