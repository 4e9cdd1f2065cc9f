"""The log's invariants, checked entry by entry: what ``swift-trainer audit check`` proves.

:class:`LogCheck` reads the history in order and keeps its own account of attempts and GPUs,
apart from the fold's, so that a fold that let something through would not hide it:

- every entry decodes, and its message id appears once in the whole history;
- every fact applies to the state it arrives in (the fold raises on none of them);
- attempt numbers of a job only increase, and a job has at most one live attempt: an attempt is
  live from its ``job.scheduled`` until a fact ends it (succeeded, failed, cancelled, requeued,
  or its GPUs given up: preempted, suspended);
  no process of another attempt reports having started meanwhile;
- no GPU is held by two live attempts at any position of the log;
- no more jobs of a sweep hold GPUs at once than its ``max_concurrent``;
- at the end, each job is in exactly one state: queued jobs are the queue, jobs holding GPUs are
  the allocations and the live attempts, finished jobs hold nothing;
- every submission the gateway acknowledged (a ``job.submit`` in the commands stream that the
  scheduler has taken) became a job in the log.

The first violation is kept, as a sentence; checking goes on, so the counts cover the whole log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from events import messages as m
from events.codec import DecodeError, decode
from events.errors import IllegalTransition
from events.records import HOLDS_GPUS, TERMINAL, JobStatus, gpu_key
from events.state import State

# Facts that end the attempt they name (or, naming none, the job's live attempt). A preempted or
# suspended attempt gives up its GPUs at once; its process may still be stopping (its runner
# starts the GPUs' next holder only once it is gone).
_ENDINGS = (m.JobSucceeded, m.JobFailed, m.JobCancelled, m.JobRequeued, m.JobPreempted, m.JobSuspended)


@dataclass(frozen=True)
class Violation:
    entry_id: str  # where it shows, or "" for the state at the end
    sentence: str


@dataclass(frozen=True)
class Attempt:
    job_id: str
    number: int
    gpus: tuple[str, ...]  # node/index of every GPU it holds (on every node of a gang job)
    scheduled_at: str  # its job.scheduled entry


@dataclass
class LogCheck:
    state: State = field(default_factory=State)
    entries: int = 0
    violations: list[Violation] = field(default_factory=list)
    message_ids: set[str] = field(default_factory=set)
    last_attempt: dict[str, int] = field(default_factory=dict)
    live: dict[str, Attempt] = field(default_factory=dict)  # job id -> its live attempt
    holders: dict[str, Attempt] = field(default_factory=dict)  # GPU key -> the live attempt holding it
    accepted: set[str] = field(default_factory=set)
    attempts: int = 0

    @property
    def first(self) -> Violation | None:
        return self.violations[0] if self.violations else None

    def _violated(self, entry_id: str, sentence: str) -> None:
        self.violations.append(Violation(entry_id, sentence))

    def feed(self, entry_id: str, fields: Mapping[str, str]) -> None:
        """Check one entry of the log, in order."""
        self.entries += 1
        try:
            message = decode(fields)
        except DecodeError as exc:
            self._violated(entry_id, f"entry {entry_id} cannot be read: {exc}")
            self.state.position = entry_id
            return
        if message.id in self.message_ids:
            self._violated(entry_id, f"message id {message.id} appears a second time, at entry {entry_id}")
        self.message_ids.add(message.id)
        self._attempts(entry_id, message)
        try:
            self.state.apply(entry_id, message)
        except IllegalTransition as exc:
            what = f"{message.type} of job {message.job_id}" if message.job_id else message.type
            self._violated(entry_id, f"entry {entry_id} ({what}) does not apply to the state before it: {exc}")
            self.state.position = entry_id

    def _attempts(self, entry_id: str, message: m.Message) -> None:
        job_id = message.job_id or ""
        if isinstance(message, m.JobAccepted):
            self.accepted.add(job_id)
        elif isinstance(message, m.JobScheduled):
            self._scheduled(entry_id, job_id, message)
        elif isinstance(message, m.JobStarted):
            live = self.live.get(job_id)
            if live is not None and live.number != message.attempt:
                self._violated(
                    entry_id,
                    f"job {job_id} has two live attempts: attempt {message.attempt} started (entry {entry_id}) "
                    f"while attempt {live.number} holds {_where(live)}",
                )
        elif isinstance(message, _ENDINGS):
            live = self.live.get(job_id)
            attempt = getattr(message, "attempt", None)
            if live is not None and attempt in (None, live.number):
                self._end(live)

    def _scheduled(self, entry_id: str, job_id: str, event: m.JobScheduled) -> None:
        ranks = [m.Rank(node=event.node, gpu_ids=event.gpu_ids), *event.peers]
        gpus = tuple(gpu_key(rank.node, index) for rank in ranks for index in rank.gpu_ids)
        attempt = Attempt(job_id, event.attempt, gpus, entry_id)
        self.attempts += 1
        before = self.last_attempt.get(job_id)
        if before is not None and event.attempt <= before:
            self._violated(
                entry_id,
                f"attempt numbers of job {job_id} went back: attempt {event.attempt} scheduled "
                f"(entry {entry_id}) after attempt {before}",
            )
        live = self.live.get(job_id)
        if live is not None:
            self._violated(
                entry_id,
                f"job {job_id} has two live attempts: attempt {event.attempt} scheduled (entry {entry_id}) "
                f"while attempt {live.number} still holds {_where(live)}",
            )
            self._end(live)
        for key in gpus:
            holder = self.holders.get(key)
            if holder is not None:
                self._violated(
                    entry_id,
                    f"GPU {key} is held by two attempts at entry {entry_id}: job {job_id} "
                    f"attempt {event.attempt}, and job {holder.job_id} attempt {holder.number} "
                    f"(scheduled at {holder.scheduled_at})",
                )
        self._sweep_cap(entry_id, job_id)
        self.last_attempt[job_id] = max(event.attempt, before or 0)
        self.live[job_id] = attempt
        for key in gpus:
            self.holders[key] = attempt

    def _sweep_cap(self, entry_id: str, job_id: str) -> None:
        """A sweep's job scheduled: with it, at most max_concurrent of the sweep's jobs are live."""
        jobs = self.state.jobs
        job = jobs.get(job_id)
        sweep = self.state.sweeps.get(job.sweep_id) if job is not None and job.sweep_id else None
        if sweep is None or sweep.max_concurrent is None:
            return
        live = sum(
            1 for other in self.live if other != job_id and (o := jobs.get(other)) and o.sweep_id == sweep.sweep_id
        )
        if live + 1 > sweep.max_concurrent:
            self._violated(
                entry_id,
                f"sweep {sweep.sweep_id} runs {live + 1} jobs at once at entry {entry_id} (job {job_id} scheduled),"
                f" over its max_concurrent of {sweep.max_concurrent}",
            )

    def _end(self, attempt: Attempt) -> None:
        del self.live[attempt.job_id]
        for key in attempt.gpus:
            if self.holders.get(key) is attempt:
                del self.holders[key]

    def finish(self, submissions: Iterable[tuple[str, str]] = ()) -> None:
        """The checks on the state the whole log leaves. ``submissions``: (commands entry id,
        job id) of each acknowledged submission the scheduler has taken."""
        state = self.state
        queued = {job.job_id for job in state.jobs.values() if job.status == JobStatus.queued and not job.stopping}
        in_queue = [job.job_id for job in state.queue()]
        if set(in_queue) != queued or len(in_queue) != len(queued):
            extra = sorted(set(in_queue) ^ queued)
            self._violated("", f"the queue and the queued jobs differ: {', '.join(extra) or 'a job twice'}")
        for key, job_id in sorted(state.allocations.items()):
            job = state.jobs.get(job_id)
            node, _, index = key.partition("/")
            if job is None or job.status not in HOLDS_GPUS or int(index) not in job.gpus_on(node):
                status = job.status if job else "gone"
                self._violated("", f"GPU {key} is allocated to job {job_id}, which is {status} and does not hold it")
        for job in sorted(state.jobs.values(), key=lambda j: j.seq):
            holds = job.status in HOLDS_GPUS
            live = self.live.get(job.job_id)
            held = [gpu_key(rank.node, i) for rank in job.ranks for i in rank.gpu_ids]
            if holds and any(state.allocations.get(key) != job.job_id for key in held):
                self._violated("", f"job {job.job_id} is {job.status} but its GPUs are not allocated to it")
            if holds != (live is not None) or (live is not None and live.number != job.attempt):
                seen = f"attempt {live.number} live" if live else "no attempt live"
                self._violated("", f"job {job.job_id} is {job.status} (attempt {job.attempt}) but the log has {seen}")
            if job.status in TERMINAL and live is not None:
                self._violated("", f"job {job.job_id} is {job.status} yet attempt {live.number} is live")
        for entry_id, job_id in submissions:
            if job_id not in self.accepted:
                self._violated(
                    "",
                    f"the submission of job {job_id} (commands entry {entry_id}) was acknowledged "
                    "and taken by the scheduler, but the job is not in the log",
                )


def _where(attempt: Attempt) -> str:
    return f"GPUs {', '.join(attempt.gpus)} (scheduled at {attempt.scheduled_at})"
