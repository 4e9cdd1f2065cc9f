"""How the pool is shared: who may preempt whom, and in which order the queue starts. One value,
built from the settings, for the scheduler (which decides) and the gateway (which estimates and
explains)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from events.records import Job, JobStatus


@dataclass(frozen=True)
class Policy:
    preemption: bool = False  # a blocked job may preempt running jobs of a lower priority
    preempt_gap: int = 1  # by at least this much
    preempt_min_runtime_s: float = 300.0  # only victims running at least this long
    max_preemptions: int = 3  # a job preempted this often is not preempted again
    borrowing: bool = False  # over-quota jobs may use GPUs no job within quota waits for
    fair_share: bool = False  # within a priority, the owner with the least decayed usage first

    def preemptible(self, victim: Job) -> bool:
        """Whether a job holding GPUs could be preempted at all (by someone, some time)."""
        return (
            victim.status in (JobStatus.running, JobStatus.serving)
            and victim.started_at is not None
            and victim.spec.preemptible
            and not victim.cancel_requested
            and not victim.stopping
            and victim.preemptions < self.max_preemptions
            and ((self.borrowing and victim.borrowing) or self.preemption)
        )

    def preemptible_in(self, job: Job, victim: Job, now: datetime) -> float | None:
        """Seconds until ``job`` may preempt ``victim`` (0: now); None: it may not."""
        if victim.job_id == job.job_id or not self.preemptible(victim):
            return None
        if self.borrowing and victim.borrowing:
            return 0.0  # whatever its priority (the job, within its quota, reclaims its share)
        if not self.preemption or victim.priority > job.priority - self.preempt_gap or victim.started_at is None:
            return None
        return max(0.0, self.preempt_min_runtime_s - (now - victim.started_at).total_seconds())
