"""Jobs that depend on others, as the scheduler's rules decide them: `depends_on` with SLURM's
afterok / afterany / afternotok, a deploy that waits for another job's export, and waiting jobs
holding back no one."""

from __future__ import annotations

import pytest

from events import messages as m
from events.bus import Append
from events.params import DeployJob, LanguageModelJob
from events.records import JobStatus
from services.scheduler import rules
from tests.examples import LM, started
from tests.test_scheduler_rules import KEYS, LIMITS, NOW, Cluster


class Pool(Cluster):
    """A cluster whose facts are followed by the scheduler's reactions and passes, to the end."""

    sent: list[m.Message]

    def settle(self, appends: list[Append]) -> list[m.Message]:
        """The facts, in order; the commands sent are added to ``sent``."""
        if not hasattr(self, "sent"):
            self.sent = []
        facts: list[m.Message] = []
        while appends:
            events = [a.message for a in appends if a.stream == KEYS.events]
            self.sent += self.fold(appends)
            facts += events
            appends = [
                d for fact in events for d in rules.on_event(self.state, KEYS, self.heartbeats, LIMITS, NOW, fact)
            ]
        return facts

    def ask(self, job_id: str, **request: object) -> list[m.Message]:
        spec = self.spec(**request)
        command = m.SubmitJob(job_id=job_id, spec=spec, actor="alice")
        return self.settle(rules.submit(self.state, KEYS, command, self.heartbeats, LIMITS, NOW))

    def spec(self, **request: object) -> LanguageModelJob:
        return LM.model_validate({**LM.model_dump(), **request})

    def end(self, job_id: str, how: str) -> list[m.Message]:
        """The runner's report that a running job ended: completed, failed or cancelled."""
        job = self.state.jobs[job_id]
        if job.status == JobStatus.scheduled:
            self.fold([Append(KEYS.events, started(job_id, job.attempt, job.node or "", ""))])
        common = {"job_id": job_id, "attempt": job.attempt}
        report: m.Message = {
            "completed": m.JobSucceeded(exit_code=0, run_dir="/r", last_checkpoint="/r/checkpoint-5", **common),
            "failed": m.JobFailed(reason="oom", exit_code=1, **common),
            "cancelled": m.JobCancelled(exit_code=0, **common),
        }[how]
        return self.settle([Append(KEYS.events, report)])

    def status(self, *job_ids: str) -> list[str]:
        return [self.state.jobs[job_id].status.value for job_id in job_ids]


def types(facts: list[m.Message], job_id: str) -> list[str]:
    return [f.type for f in facts if f.job_id == job_id]


@pytest.mark.parametrize(
    ("dependency", "ending", "then"),
    [
        ("afterok", "completed", "queued"),
        ("afterok", "failed", "failed"),
        ("afterok", "cancelled", "failed"),
        ("afterany", "completed", "queued"),
        ("afterany", "failed", "queued"),
        ("afterany", "cancelled", "queued"),
        ("afternotok", "completed", "failed"),
        ("afternotok", "failed", "queued"),
        ("afternotok", "cancelled", "queued"),
    ],
)
def test_a_dependent_job_waits_then_queues_or_fails_as_slurm_would(dependency: str, ending: str, then: str) -> None:
    # Given a pool of one GPU, busy with job a, and job c queued behind it
    pool = Pool({"node-a": 1})
    pool.ask("a")
    pool.ask("b", depends_on=["a"], dependency=dependency, auto_export=False)
    pool.ask("c", auto_export=False)
    # Then b waits, out of the queue: c is ahead of it although submitted later
    assert pool.status("a", "b", "c") == ["scheduled", "waiting", "queued"]
    assert [job.job_id for job in pool.state.queue_iter()] == ["c"]
    # When a ends
    facts = pool.end("a", ending)
    # Then b queues behind c (c started on the freed GPU), or fails naming a
    if then == "queued":
        assert types(facts, "b") == ["job.dependencies_met", "job.queued"]
        assert pool.status("b", "c") == ["queued", "scheduled"]
    else:
        assert types(facts, "b") == ["job.failed"]
        job = pool.state.jobs["b"]
        assert (job.status, job.reason) == (JobStatus.failed, "dependency_failed")
        assert (
            job.message
            == f"job a {ending}, and {dependency} needed "
            + {
                "afterok": "it to complete",
                "afternotok": "it to fail or be cancelled",
            }[dependency]
        )


def test_a_job_waits_for_all_it_depends_on_and_a_chain_fails_down_its_length() -> None:
    pool = Pool({"node-a": 2})
    pool.ask("a", auto_export=False)
    pool.ask("b", auto_export=False)
    pool.ask("c", depends_on=["a", "b"], auto_export=False)
    pool.ask("d", depends_on=["c"])
    assert pool.status("c", "d") == ["waiting", "waiting"]
    pool.end("a", "completed")
    assert pool.status("c") == ["waiting"]  # b still runs
    facts = pool.end("b", "failed")
    # Then c fails for b, and d (afterok on c) fails for c, in one go
    assert types(facts, "c") == ["job.failed"] and types(facts, "d") == ["job.failed"]
    assert pool.state.jobs["c"].message == "job b failed, and afterok needed it to complete"
    assert pool.state.jobs["d"].message == "job c failed, and afterok needed it to complete"


def test_dependencies_already_met_or_broken_at_submit_are_decided_at_once() -> None:
    pool = Pool({"node-a": 1})
    pool.ask("a", auto_export=False)
    pool.end("a", "completed")
    pool.ask("ok", depends_on=["a"], auto_export=False)
    assert pool.status("ok") == ["scheduled"]  # no waiting at all
    pool.ask("never", depends_on=["a"], dependency="afternotok")
    job = pool.state.jobs["never"]
    assert (job.status, job.reason) == (JobStatus.failed, "dependency_failed")


def test_released_jobs_queue_in_submit_order_and_hold_if_asked() -> None:
    pool = Pool({"node-a": 1})
    pool.ask("a", auto_export=False)
    pool.ask("blocker", auto_export=False)  # queued: keeps the GPU busy after a
    pool.ask("first", depends_on=["a"], auto_export=False)
    pool.ask("held", depends_on=["a"], hold=True, auto_export=False)
    pool.ask("second", depends_on=["a"], auto_export=False)
    facts = pool.end("a", "completed")
    released = [f.job_id for f in facts if f.type in ("job.queued", "job.held") and f.job_id != "blocker"]
    assert released == ["first", "held", "second"]
    assert [job.job_id for job in pool.state.queue_iter()] == ["first", "second"]
    assert pool.status("held") == ["held"]


def test_a_waiting_job_can_be_cancelled_and_counts_against_the_jobs_its_owner_may_have_waiting() -> None:
    pool = Pool({"node-a": 1})
    pool.ask("a")
    pool.ask("b", depends_on=["a"])
    assert pool.state.waiting("user:alice") == 1
    facts = pool.settle(rules.cancel(pool.state, KEYS, m.CancelJob(job_id="b", actor="alice")))
    assert types(facts, "b") == ["job.cancelled"] and pool.status("b") == ["cancelled"]
    assert pool.state.awaiting() == []
    pool.end("a", "completed")  # nothing left waiting on a
    assert pool.status("b") == ["cancelled"]


def test_a_deploy_of_a_job_still_training_waits_for_its_export_and_serves_the_merged_model() -> None:
    pool = Pool({"node-a": 2})
    pool.ask("train")  # LoRA, auto_export
    deploy = DeployJob(task_type="deploy", source_job_id="train")
    command = m.SubmitJob(job_id="serve", spec=deploy, actor="alice")
    pool.settle(rules.submit(pool.state, KEYS, command, pool.heartbeats, LIMITS, NOW))
    assert pool.status("serve") == ["waiting"]
    # When the training completes, its export is requested: the deploy still waits
    facts = pool.end("train", "completed")
    assert "export.requested" in types(facts, "train") and pool.status("serve") == ["waiting"]
    started_export = m.ExportStarted(job_id="train", argv=["swift", "export"])
    merged = m.ExportCompleted(job_id="train", path="/r/checkpoint-5-merged")
    facts = pool.settle([Append(KEYS.events, started_export), Append(KEYS.events, merged)])
    # Then it is given the merged model and starts
    met = next(f for f in facts if isinstance(f, m.DependenciesMet))
    assert met.job_id == "serve" and met.model_path == "/r/checkpoint-5-merged"
    assert pool.state.jobs["serve"].spec.model_path == "/r/checkpoint-5-merged"
    assert pool.status("serve") == ["scheduled"]
    start = next(c for c in pool.sent if isinstance(c, m.StartJob) and c.job_id == "serve")
    assert start.spec.model_path == "/r/checkpoint-5-merged"


def test_a_deploy_waiting_for_an_export_that_fails_fails_naming_the_job() -> None:
    pool = Pool({"node-a": 2})
    pool.ask("train")
    deploy = DeployJob(task_type="deploy", source_job_id="train")
    pool.settle(rules.submit(pool.state, KEYS, m.SubmitJob(job_id="serve", spec=deploy), pool.heartbeats, LIMITS, NOW))
    pool.end("train", "completed")
    pool.settle([Append(KEYS.events, m.ExportStarted(job_id="train", argv=["swift", "export"]))])
    pool.settle([Append(KEYS.events, m.ExportFailed(job_id="train", message="disk full"))])
    job = pool.state.jobs["serve"]
    assert (job.status, job.reason, job.message) == (JobStatus.failed, "dependency_failed", "job train's export failed")


def test_the_state_of_waiting_jobs_survives_a_snapshot_and_a_rollback() -> None:
    from events.state import State

    pool = Pool({"node-a": 1})
    pool.ask("a")
    pool.ask("b", depends_on=["a"])
    restored = State.model_validate_json(pool.state.model_dump_json())
    assert [job.job_id for job in restored.awaiting()] == ["b"]
    pool.state.savepoint()
    pool.end("a", "completed")
    assert pool.state.awaiting() == []
    pool.state.rollback()
    assert [job.job_id for job in pool.state.awaiting()] == ["b"]
