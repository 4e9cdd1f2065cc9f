"""When a job that depends on others may start: `depends_on` with SLURM's `afterok`, `afterany`
and `afternotok`, and a deploy of another job's merged model, which waits for its export.

Pure functions of the state, used by the scheduler (which decides) and the gateway (which refuses
what can never be met at submit). A job is accepted after every job it names (ids are given out at
submit), so dependencies cannot form a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.params import Dependency, DeployJob, JobSpec
from events.records import TERMINAL, ExportStatus, Job, JobStatus
from events.state import State

# What each dependency type needs of a job that has ended.
_ENDS_OK = {
    Dependency.afterok: frozenset({JobStatus.completed}),
    Dependency.afterany: TERMINAL,
    Dependency.afternotok: frozenset({JobStatus.failed, JobStatus.cancelled}),
}
_NEEDS = {
    Dependency.afterok: "it to complete",
    Dependency.afterany: "it to end",
    Dependency.afternotok: "it to fail or be cancelled",
}


@dataclass(frozen=True)
class Verdict:
    """Whether a job's dependencies are met: ``broken`` (why they never will be, naming the
    job), else ``waiting_on`` (the jobs still to end, in the order given), else met, with a
    deploy's ``model_path`` (its source job's merged model) when it had none."""

    waiting_on: list[str] = field(default_factory=list)
    broken: str | None = None
    model_path: str | None = None

    @property
    def met(self) -> bool:
        return self.broken is None and not self.waiting_on


def verdict(state: State, spec: JobSpec) -> Verdict:
    waiting: list[str] = []
    for job_id in spec.depends_on:
        job = state.jobs.get(job_id)
        if job is None:
            return Verdict(broken=f"job {job_id} no longer exists (deleted)")
        if job.status not in TERMINAL:
            waiting.append(job_id)
        elif job.status not in _ENDS_OK[spec.dependency]:
            return Verdict(broken=f"job {job_id} {job.status}, and {spec.dependency} needed {_NEEDS[spec.dependency]}")
    model_path = None
    if isinstance(spec, DeployJob) and spec.source_job_id and not spec.model_path:
        source = state.jobs.get(spec.source_job_id)
        if source is None:
            return Verdict(broken=f"job {spec.source_job_id} no longer exists (deleted)")
        if source.export.status == ExportStatus.completed:
            model_path = source.export.path
        elif will_export(source):
            if source.job_id not in waiting:
                waiting.append(source.job_id)
        else:
            return Verdict(broken=no_export(source))
    return Verdict(waiting_on=waiting, model_path=model_path)


def will_export(job: Job) -> bool:
    """Whether a job's merged model is still to come: its export runs, or it is a LoRA job still
    to end (or just ended) that exports by itself when it completes."""
    if job.export.status in (ExportStatus.pending, ExportStatus.running):
        return True
    automatic = job.is_lora and getattr(job.spec, "auto_export", False) and job.export.status == ExportStatus.none
    return automatic and job.status not in (JobStatus.failed, JobStatus.cancelled)


def no_export(job: Job) -> str:
    """Why a deploy of this job's merged model can never start."""
    if job.export.status == ExportStatus.failed:
        return f"job {job.job_id}'s export failed"
    if job.status in (JobStatus.failed, JobStatus.cancelled):
        return f"job {job.job_id} {job.status} before it had an exported model"
    if not job.is_lora:
        return f"job {job.job_id} trains no LoRA adapters: it has no exported model (deploy its checkpoint by path)"
    return f"job {job.job_id} has no exported model (export {job.export.status}, auto_export off: export it first)"


def names(spec: JobSpec, job_id: str) -> bool:
    """Whether a job's dependencies name this job."""
    return job_id in spec.depends_on or (isinstance(spec, DeployJob) and spec.source_job_id == job_id)
