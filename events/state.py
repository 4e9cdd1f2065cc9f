"""State as a pure fold over the log: jobs, the queue, GPU allocations and nodes.

``State.apply`` is deterministic and does no I/O. The scheduler, the gateway and the replay tool
all build their view with it, so replaying the log rebuilds exactly what the services show.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, Field, PrivateAttr
from sortedcontainers import SortedList

from events import messages as m
from events.errors import EventsError
from events.params import ExtraValue, JobSpec, TrainType
from events.quotas import DEFAULT_HALF_LIFE_S, Quotas, Usage, team_key, user_key


class JobStatus(StrEnum):
    pending = "pending"  # accepted by the gateway, not yet decided by the scheduler
    held = "held"  # accepted with hold: waits to be released (POST /jobs/{id}/start)
    waiting = "waiting"  # accepted with dependencies not yet met (depends_on, a deploy's source)
    queued = "queued"  # waiting for GPUs
    scheduled = "scheduled"  # GPUs allocated, start command sent to the node's runner
    running = "running"  # the swift process runs
    serving = "serving"  # a deploy job answers requests
    preempted = "preempted"  # gave its GPUs to a more urgent job; queued again once stopped
    suspended = "suspended"  # stopped on request with a checkpoint; waits to be resumed
    completed = "completed"  # training finished with exit code 0
    failed = "failed"  # rejected, crashed, or timed out
    cancelled = "cancelled"  # stopped on request


TERMINAL = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})
HOLDS_GPUS = frozenset({JobStatus.scheduled, JobStatus.running, JobStatus.serving})
WAITING = frozenset({JobStatus.pending, JobStatus.held, JobStatus.queued})
# Gave up its GPUs before its end: while ``stopping``, its attempt's process is still on its way
# out (reports of that attempt still count).
YIELDED = frozenset({JobStatus.preempted, JobStatus.suspended})
# Counted against a user's limit of jobs waiting at once.
QUEUED_FOR_QUOTA = frozenset(
    {JobStatus.pending, JobStatus.held, JobStatus.waiting, JobStatus.queued, JobStatus.preempted}
)
ANONYMOUS = "anonymous"  # the owner of jobs submitted with access control off


class ExportStatus(StrEnum):
    none = "none"  # never asked for
    pending = "pending"  # asked for, waiting for the exporter
    running = "running"  # swift export runs
    completed = "completed"  # merged model on disk
    failed = "failed"  # swift export failed


class IllegalTransition(EventsError, ValueError):
    """An event that does not apply to the state it arrives in."""


class Progress(m.ProgressMetrics):
    at: datetime | None = None


class Export(BaseModel):
    status: ExportStatus = ExportStatus.none
    checkpoint: str | None = None
    output_dir: str | None = None
    path: str | None = None
    error: str | None = None


class PeerCommand(BaseModel):
    """How a gang job's rank other than 0 started."""

    rank: int
    node: str
    argv: list[str]
    env: dict[str, str]


class Job(BaseModel):
    job_id: str
    spec: JobSpec
    status: JobStatus = JobStatus.pending
    priority: int
    seq: int  # submit order in the log: FIFO within a priority
    submitted_at: datetime
    submitted_by: str | None = None
    first_entry_id: str
    last_entry_id: str
    attempt: int = 0
    node: str | None = None  # rank 0's, for a gang job
    gpu_ids: list[int] = Field(default_factory=list)
    peers: list[m.Rank] = Field(default_factory=list)  # a gang job's other ranks, 1, 2, ...
    ranks_started: list[int] = Field(default_factory=list)  # of a gang job's attempt
    peer_commands: list[PeerCommand] = Field(default_factory=list)  # as ranks 1, 2, ... started
    master_port: int | None = None
    queue_position_at_submit: int | None = None
    pid: int | None = None
    run_dir: str | None = None
    argv: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress | None = None
    checkpoints: list[str] = Field(default_factory=list)
    last_checkpoint: str | None = None
    endpoint: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    stderr_tail: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    retries: int = 0  # attempts ended by the infrastructure and run again
    export: Export = Field(default_factory=Export)
    team: str | None = None
    borrowing: bool = False  # holds GPUs over its owner's quota
    stopping: bool = False  # its attempt gave up its GPUs and its process is being stopped
    preemptions: int = 0
    preempted_by: str | None = None  # the job it last gave its GPUs to
    preempted_jobs: list[str] = Field(default_factory=list)  # the jobs preempted for its last start
    checkpoint_at: datetime | None = None  # when the attempt's last checkpoint was saved
    checkpoint_step: int | None = None
    checkpoint_node: str | None = None  # the node that wrote the last checkpoint (its rank 0)
    usage_mark: datetime | None = None  # GPU time is credited to its owner up to here
    final: dict[str, float] = Field(default_factory=dict)  # the last values a completed run logged
    sweep_id: str | None = None  # a point of this sweep
    point: dict[str, ExtraValue] | None = None  # its values of the sweep's grid

    @property
    def owner(self) -> str:
        return self.submitted_by or ANONYMOUS

    @property
    def may_suspend(self) -> bool:
        """A running training job, not already on its way out, may be suspended."""
        return (
            self.status == JobStatus.running
            and self.spec.task_type != "deploy"
            and not self.cancel_requested
            and not self.stopping
        )

    @property
    def may_resume(self) -> bool:
        return self.status == JobStatus.suspended

    # What may be asked of a job now: the gateway answers 409 where the scheduler would decide
    # nothing, by the same predicates.

    @property
    def may_cancel(self) -> bool:
        return self.status not in TERMINAL

    @property
    def may_release(self) -> bool:
        """A job submitted with ``hold`` may be released to the queue."""
        return self.status == JobStatus.held

    @property
    def may_reprioritize(self) -> bool:
        return self.status == JobStatus.queued

    @property
    def exporting(self) -> bool:
        return self.export.status in (ExportStatus.pending, ExportStatus.running)

    @property
    def may_export(self) -> bool:
        """A completed LoRA job with a checkpoint, not being exported already."""
        return self.status == JobStatus.completed and self.is_lora and bool(self.last_checkpoint) and not self.exporting

    @property
    def may_delete(self) -> bool:
        """An ended job whose export (if any) is not under way."""
        return self.status in TERMINAL and not self.exporting

    @property
    def ranks(self) -> list[m.Rank]:
        """Where the attempt runs, rank by rank (one rank unless a gang job)."""
        if self.node is None:
            return []
        return [m.Rank(node=self.node, gpu_ids=self.gpu_ids), *self.peers]

    def gpus_on(self, node: str) -> list[int]:
        """The GPUs the attempt holds on a node."""
        return [index for rank in self.ranks if rank.node == node for index in rank.gpu_ids]

    def runs_on(self, node: str) -> bool:
        return any(rank.node == node for rank in self.ranks)

    @property
    def gpu_total(self) -> int:
        return sum(len(rank.gpu_ids) for rank in self.ranks)

    @property
    def is_lora(self) -> bool:
        params = getattr(self.spec, "train_params", None)
        return params is not None and params.train_type == TrainType.lora


class Sweep(BaseModel):
    sweep_id: str
    name: str | None = None
    grid: dict[str, list[ExtraValue]]
    max_concurrent: int | None = None
    job_ids: list[str]
    created_at: datetime
    created_by: str | None = None


class Node(BaseModel):
    name: str
    simulated: bool
    gpus: list[m.GpuInfo]
    addr: str | None = None  # NODE_ADDR: where other nodes reach it
    up: bool = True
    epoch: int = 1  # how many times the node has joined
    joined_at: datetime
    lost_at: datetime | None = None


class Mark(NamedTuple):
    """What the state's indexes know of a job: its place in the queue, and what it counts for
    against its owner's and team's quotas."""

    queue: tuple[int, int, str] | None
    owner: str
    team: str | None
    waiting: bool
    gpus: int  # GPUs held within quota
    awaiting: str | None = None  # the job's id, while it waits for its dependencies
    sweep: str | None = None  # the sweep of a job that holds GPUs


class State(BaseModel):
    jobs: dict[str, Job] = Field(default_factory=dict)
    nodes: dict[str, Node] = Field(default_factory=dict)
    # (node, gpu index) -> job id, for every job that holds GPUs
    allocations: dict[str, str] = Field(default_factory=dict)
    position: str = "0-0"  # entry id of the last event folded in
    accepted: int = 0
    deleted: set[str] = Field(default_factory=set)  # ids of jobs deleted from the list
    stale_reports: int = 0  # reports from an attempt that is no longer current, ignored
    quotas: Quotas = Field(default_factory=Quotas)
    config_quotas: Quotas | None = None  # the last table the QUOTAS setting gave
    half_life_s: float = DEFAULT_HALF_LIFE_S
    usage: dict[str, Usage] = Field(default_factory=dict)  # user:<name> / team:<name> -> usage
    sweeps: dict[str, Sweep] = Field(default_factory=dict)
    # The queue in start order, kept sorted as events arrive: (-priority, seq, job id).
    _queued: SortedList = PrivateAttr(default_factory=SortedList)
    # Per priority, per owner, the owner's queued jobs by submit order (fair share's order).
    _levels: dict[int, dict[str, SortedList]] = PrivateAttr(default_factory=dict)
    _waiting: dict[str, int] = PrivateAttr(default_factory=dict)  # user:/team: key -> jobs waiting
    _holding: dict[str, int] = PrivateAttr(default_factory=dict)  # user:/team: key -> GPUs within quota
    _awaiting: set[str] = PrivateAttr(default_factory=set)  # jobs waiting for their dependencies
    _sweep_running: dict[str, int] = PrivateAttr(default_factory=dict)  # sweep id -> its jobs holding GPUs
    # Per owner, the teams their queued jobs count against (None: no team) -> how many jobs.
    _owner_teams: dict[str, dict[str | None, int]] = PrivateAttr(default_factory=dict)
    # Bumped when what full_owners() reads changes (GPUs held within quota, owners' teams)
    _version: int = PrivateAttr(0)
    _full: tuple[int, Quotas, frozenset[str]] | None = PrivateAttr(None)  # full_owners(), cached
    _journals: list[Journal] = PrivateAttr(default_factory=list)  # open savepoints, oldest first
    # node -> a number drawn anew whenever a job takes or leaves a GPU of the node
    _held_versions: dict[str, int] = PrivateAttr(default_factory=dict)

    # Private attributes are read through ``__pydantic_private__`` on the hot paths: a plain
    # ``self._queued`` goes through BaseModel.__getattr__, which costs a microsecond each time.

    def model_post_init(self, context: Any, /) -> None:
        for job in self.jobs.values():
            self._index(mark(job), 1)

    def _index(self, marked: Mark | None, sign: int) -> None:
        """Add (sign 1) or remove (-1) a job's marks in the indexes."""
        if marked is None:
            return
        private = self.__pydantic_private__
        if marked.queue is not None:
            levels = private["_levels"]
            priority, seq, job_id = -marked.queue[0], marked.queue[1], marked.queue[2]
            owners = levels.setdefault(priority, {})
            teams = private["_owner_teams"].setdefault(marked.owner, {})
            count = teams.get(marked.team, 0) + sign
            if count:
                teams[marked.team] = count
            else:
                del teams[marked.team]
                if not teams:
                    del private["_owner_teams"][marked.owner]
            if count == 0 or (count == 1 and sign > 0):
                private["_version"] += 1
            if sign > 0:
                private["_queued"].add(marked.queue)
                owners.setdefault(marked.owner, SortedList()).add((seq, job_id))
            else:
                private["_queued"].remove(marked.queue)
                mine = owners[marked.owner]
                mine.remove((seq, job_id))
                if not mine:
                    del owners[marked.owner]
                    if not owners:
                        del levels[priority]
        if marked.sweep is not None:
            running = private["_sweep_running"]
            running[marked.sweep] = running.get(marked.sweep, 0) + sign
            if not running[marked.sweep]:
                del running[marked.sweep]
        if marked.awaiting is not None:
            if sign > 0:
                private["_awaiting"].add(marked.awaiting)
            else:
                private["_awaiting"].discard(marked.awaiting)
        keys = (user_key(marked.owner),) if marked.team is None else (user_key(marked.owner), team_key(marked.team))
        if marked.waiting:
            counts = private["_waiting"]
            for key in keys:
                counts[key] = counts.get(key, 0) + sign
        if marked.gpus:
            counts = private["_holding"]
            for key in keys:
                counts[key] = counts.get(key, 0) + sign * marked.gpus
            private["_version"] += 1

    def waiting(self, key: str) -> int:
        """Jobs of a user or team (``user:<name>``, ``team:<name>``) waiting to run."""
        return self.__pydantic_private__["_waiting"].get(key, 0)

    def sweep_running(self, sweep_id: str) -> int:
        """How many jobs of a sweep hold GPUs."""
        return self.__pydantic_private__["_sweep_running"].get(sweep_id, 0)

    def awaiting(self) -> list[Job]:
        """The jobs waiting for their dependencies, in submit order."""
        jobs = self.jobs
        return sorted((jobs[job_id] for job_id in self.__pydantic_private__["_awaiting"]), key=lambda job: job.seq)

    def holding(self, key: str) -> int:
        """GPUs a user's or team's jobs hold within quota (borrowing ones aside)."""
        return self.__pydantic_private__["_holding"].get(key, 0)

    def full_owners(self) -> frozenset[str]:
        """Owners every queued job of whom would take them or their team over a GPU quota: the
        owner, or each team their queued jobs count against, already holds its whole quota."""
        private = self.__pydantic_private__
        cached = private["_full"]
        if cached is not None and cached[0] == private["_version"] and cached[1] is self.quotas:
            return cached[2]
        quotas, holding = self.quotas, private["_holding"]
        full: set[str] = set()
        if quotas.users or quotas.teams:
            teams_full: dict[str, bool] = {}
            for owner, teams in private["_owner_teams"].items():
                limit = quotas.user(owner)
                if limit is not None and limit.gpus is not None and holding.get(user_key(owner), 0) >= limit.gpus:
                    full.add(owner)
                    continue
                for team in teams:
                    if team is None:
                        break
                    if team not in teams_full:
                        limit = quotas.team(team)
                        teams_full[team] = (
                            limit is not None
                            and limit.gpus is not None
                            and holding.get(team_key(team), 0) >= limit.gpus
                        )
                    if not teams_full[team]:
                        break
                else:
                    full.add(owner)
        private["_full"] = (private["_version"], quotas, frozenset(full))
        return private["_full"][2]

    def fair_queue_iter(
        self, rank: Callable[[str], float], extra: Job | None = None, skip: frozenset[str] = frozenset()
    ) -> Iterator[Job]:
        """Queued jobs in fair-share order: by priority, then by their owner's ``rank`` (decayed
        usage, lowest first), then by submit order; ``extra`` (a job not folded in yet) in its
        place among them. The jobs of the owners in ``skip`` are left out."""
        private = self.__pydantic_private__
        if skip and extra is None and private["_owner_teams"].keys() <= skip:
            return  # every queued job left out
        levels = private["_levels"]
        priorities = set(levels)
        if extra is not None:
            priorities.add(extra.priority)
        for priority in sorted(priorities, reverse=True):
            # Owners of the same rank (none has used GPUs yet, say) share it: their jobs by
            # submit order, as if they were one owner's
            ranked: dict[float, list[Iterable[tuple[int, str]]]] = {}
            level = levels.get(priority, {})
            if skip and level.keys() <= skip:
                level = {}
            for owner, mine in level.items():
                if skip and owner in skip:
                    continue
                ranked.setdefault(rank(owner), []).append(mine)
            if extra is not None and extra.priority == priority:
                ranked.setdefault(rank(extra.owner), []).append([(extra.seq, extra.job_id)])
            for value in sorted(ranked):
                lists = ranked[value]
                for _, job_id in lists[0] if len(lists) == 1 else heapq.merge(*lists):
                    yield extra if extra is not None and job_id == extra.job_id else self.jobs[job_id]

    def queue_iter(self, skip: frozenset[str] = frozenset()) -> Iterator[Job]:
        """Queued jobs in start order: higher priority first, FIFO within a priority. The jobs
        of the owners in ``skip`` are left out."""
        if not skip:
            return (self.jobs[job_id] for _, _, job_id in self.__pydantic_private__["_queued"])
        return self._queue_skipping(skip)

    def _queue_skipping(self, skip: frozenset[str]) -> Iterator[Job]:
        private = self.__pydantic_private__
        if private["_owner_teams"].keys() <= skip:
            return  # every queued job left out
        levels = private["_levels"]
        for priority in sorted(levels, reverse=True):
            level = levels[priority]
            if level.keys() <= skip:
                continue
            lists = [mine for owner, mine in level.items() if owner not in skip]
            for _, job_id in lists[0] if len(lists) == 1 else heapq.merge(*lists):
                yield self.jobs[job_id]

    def queue(self) -> list[Job]:
        return list(self.queue_iter())

    def queue_position(self, job_id: str) -> int | None:
        key = queue_key(self.jobs.get(job_id))
        return None if key is None else self.__pydantic_private__["_queued"].index(key) + 1

    def queued_at(self, position: int) -> str:
        """The id of the job at a 1-based position of the queue."""
        return self.__pydantic_private__["_queued"][position - 1][2]

    def queued_ahead_of(self, priority: int, seq: float = math.inf) -> int:
        """How many queued jobs a job of this priority would wait behind: a new one, or (by its
        submit order) one submitted earlier and queued only now."""
        return self.__pydantic_private__["_queued"].bisect_left((-priority, seq, ""))

    def held_version(self, node: str) -> int:
        """A number that changes whenever a job of ours takes or leaves a GPU of the node, and
        that no other state or set of holders of this process ever had: what the node's GPUs
        offer may be worked out once per number."""
        versions = self.__pydantic_private__["_held_versions"]
        version = versions.get(node)
        if version is None:
            version = versions[node] = next(_HELD_VERSIONS)
        return version

    def apply(self, entry_id: str, event: m.Message) -> None:
        """Fold one event in. Raises IllegalTransition, leaving the state unchanged."""
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise IllegalTransition(f"{event.type} is not an event of the log")
        journals = self.__pydantic_private__["_journals"]
        if journals:
            journals[-1].keep(self, event)
        before = mark(self.jobs.get(event.job_id or ""))
        handler(self, entry_id, event)
        after = mark(self.jobs.get(event.job_id or ""))
        if before != after:
            self._index(before, -1)
            self._index(after, 1)
        self.position = entry_id

    # --- savepoints: fold facts before they are in the log, and take them back if they never land

    def savepoint(self) -> None:
        """Remember the state as it is now. Facts folded from here on (under stand-in entry ids)
        are taken back by :meth:`rollback`, or kept, with their real ids, by :meth:`release`.
        Savepoints nest: a later one is rolled back before an earlier one, and the earliest is
        released first, while later ones may still be open."""
        self.__pydantic_private__["_journals"].append(
            Journal(
                self.position,
                self.accepted,
                self.stale_reports,
                dict(self.allocations),
                dict(self.__pydantic_private__["_held_versions"]),
                self.quotas,
                self.config_quotas,
                self.half_life_s,
            )
        )

    @property
    def committed_position(self) -> str:
        """The position before every open savepoint: the last entry known to be in the log."""
        journals = self.__pydantic_private__["_journals"]
        return journals[0].position if journals else self.position

    @property
    def savepoints(self) -> int:
        """How many savepoints are open."""
        return len(self.__pydantic_private__["_journals"])

    def rollback(self) -> None:
        """Back to the latest savepoint."""
        journals = self.__pydantic_private__["_journals"]
        if not journals:
            return
        journal = journals.pop()
        for job_id, saved in journal.jobs.items():
            self._index(mark(self.jobs.get(job_id)), -1)
            if saved is None:
                self.jobs.pop(job_id, None)
                continue
            self.jobs[job_id] = saved
            self._index(mark(saved), 1)
        for key, used in journal.usage.items():
            if used is None:
                self.usage.pop(key, None)
            else:
                self.usage[key] = used
        self.quotas, self.config_quotas, self.half_life_s = journal.quotas, journal.config_quotas, journal.half_life_s
        for name, node in journal.nodes.items():
            if node is None:
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = node
        self.deleted.difference_update(journal.deleted)
        for sweep_id in journal.sweeps:
            self.sweeps.pop(sweep_id, None)
        self.allocations = journal.allocations
        self.__pydantic_private__["_held_versions"] = journal.held_versions
        self.position, self.accepted, self.stale_reports = journal.position, journal.accepted, journal.stale_reports

    def release(self, entry_ids: Mapping[str, str]) -> None:
        """Keep what was folded since the earliest savepoint, up to the next one; ``entry_ids``
        maps each stand-in id used in that span to the id the entry got in the log. Later
        savepoints stay open, with what they would restore renamed too."""
        journals = self.__pydantic_private__["_journals"]
        if not journals:
            return
        journal = journals.pop(0)

        def rename(job: Job) -> None:
            job.first_entry_id = entry_ids.get(job.first_entry_id, job.first_entry_id)
            job.last_entry_id = entry_ids.get(job.last_entry_id, job.last_entry_id)

        for job_id in journal.jobs:
            job = self.jobs.get(job_id)
            if job is not None:
                rename(job)
            for later in journals:
                saved = later.jobs.get(job_id)
                if saved is not None:
                    rename(saved)
        for later in journals:
            later.position = entry_ids.get(later.position, later.position)
        self.position = entry_ids.get(self.position, self.position)


@dataclass
class Journal:
    """What a savepoint needs to restore: scalars and allocations as they were, and each job or
    node as it was before the first fact about it since then."""

    position: str
    accepted: int
    stale_reports: int
    allocations: dict[str, str]
    held_versions: dict[str, int]
    quotas: Quotas
    config_quotas: Quotas | None
    half_life_s: float
    jobs: dict[str, Job | None] = field(default_factory=dict)
    usage: dict[str, Usage | None] = field(default_factory=dict)
    nodes: dict[str, Node | None] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    sweeps: set[str] = field(default_factory=set)  # created since the savepoint

    def keep(self, state: State, event: m.Message) -> None:
        job_id = event.job_id
        if job_id and job_id not in self.jobs:
            job = state.jobs.get(job_id)
            # Folding replaces a job's fields, except its checkpoints list and export record.
            self.jobs[job_id] = (
                None
                if job is None
                else job.model_copy(update={"checkpoints": list(job.checkpoints), "export": job.export.model_copy()})
            )
        if isinstance(event, (m.NodeJoined, m.NodeLost)) and event.node not in self.nodes:
            node = state.nodes.get(event.node)
            self.nodes[event.node] = None if node is None else node.model_copy()
        if isinstance(event, m.JobDeleted) and job_id:
            self.deleted.add(job_id)
        if isinstance(event, m.SweepCreated) and event.sweep_id not in state.sweeps:
            self.sweeps.add(event.sweep_id)
        # Usage changes with facts about a job that holds GPUs (credited to its owner and team),
        # and all of it with a new half-life.
        job = state.jobs.get(job_id or "")
        keys = (
            list(state.usage)
            if isinstance(event, m.HalfLifeChanged)
            else [user_key(job.owner)] + ([team_key(job.team)] if job.team else [])
            if job is not None and job.status in HOLDS_GPUS
            else []
        )
        for key in keys:
            if key not in self.usage:
                used = state.usage.get(key)
                self.usage[key] = None if used is None else used.copy()


def queue_key(job: Job | None) -> tuple[int, int, str] | None:
    """A queued job's place in the queue; None for a job that is not queued, or whose previous
    attempt is still being stopped (it starts again only from the checkpoint that saves)."""
    if job is None or job.status != JobStatus.queued or job.stopping:
        return None
    return (-job.priority, job.seq, job.job_id)


def mark(job: Job | None) -> Mark | None:
    if job is None:
        return None
    holds = job.status in HOLDS_GPUS and not job.borrowing
    return Mark(
        queue_key(job),
        job.owner,
        job.team,
        job.status in QUEUED_FOR_QUOTA,
        job.spec.total_gpus if holds else 0,
        job.job_id if job.status == JobStatus.waiting else None,
        job.sweep_id if job.sweep_id is not None and job.status in HOLDS_GPUS else None,
    )


_HELD_VERSIONS = itertools.count(1)


class GpuKey(str):
    """A GPU's key in the allocation table, ``"node/index"`` (a str, as the table is stored)."""

    __slots__ = ()

    @classmethod
    def of(cls, node: str, index: int) -> GpuKey:
        return cls(f"{node}/{index}")

    @classmethod
    def parse(cls, key: str) -> GpuKey:
        return key if isinstance(key, GpuKey) else cls(key)

    @property
    def node(self) -> str:
        return self.rsplit("/", 1)[0]

    @property
    def index(self) -> int:
        return int(self.rsplit("/", 1)[1])


def gpu_key(node: str, index: int) -> GpuKey:
    return GpuKey.of(node, index)


def _job(state: State, event: m.Message, *allowed: JobStatus) -> Job:
    job = state.jobs.get(event.job_id or "")
    if job is None:
        raise IllegalTransition(f"{event.type} for unknown job {event.job_id!r}")
    if allowed and job.status not in allowed:
        raise IllegalTransition(f"{event.type} is illegal for job {job.job_id} in status {job.status}")
    return job


def _is_stale(state: State, job: Job, attempt: int | None) -> bool:
    """A report of an attempt that is not the current one, or of one already ended by a requeue
    (the job waits for its next attempt: nothing of ours runs it) or by the scheduler (its node
    was lost with no retries left: the paused node's runner reports on when it comes back)."""
    if attempt is None:
        return False
    if attempt == job.attempt and job.stopping:
        return False  # on its way out after giving up its GPUs: its reports still count
    ended = job.status in WAITING or job.status in TERMINAL or job.status in YIELDED
    if attempt != job.attempt or (ended and job.attempt > 0):
        state.stale_reports += 1
        return True
    return False


def _reported(state: State, event: m.Message, *allowed: JobStatus) -> Job | None:
    """The job a runner reports on, or None for a report of a superseded attempt (ignored). An
    attempt being stopped after giving up its GPUs still reports, whatever the job's status."""
    job = _job(state, event)
    if _is_stale(state, job, getattr(event, "attempt", None)):
        return None
    if job.stopping and getattr(event, "attempt", None) == job.attempt:
        return job
    if job.status == JobStatus.scheduled and JobStatus.running in allowed and job.ranks_started:
        return job  # a gang job's rank 0 may report before every other rank's start is in
    return _job(state, event, *allowed)


def _credit(state: State, job: Job, at: datetime) -> None:
    """Credit the GPU time a job has held since it was last credited to its owner and team."""
    if job.status not in HOLDS_GPUS or job.usage_mark is None:
        return
    seconds = (at - job.usage_mark).total_seconds()
    if seconds <= 0:
        return
    job.usage_mark = at
    used = seconds * job.gpu_total
    keys = (user_key(job.owner),) if job.team is None else (user_key(job.owner), team_key(job.team))
    for key in keys:
        usage = state.usage.get(key)
        if usage is None:
            usage = state.usage[key] = Usage()
        usage.add(used, at, state.half_life_s)


def _release(state: State, job: Job, at: datetime) -> None:
    _credit(state, job, at)
    for rank in job.ranks:
        for index in rank.gpu_ids:
            if state.allocations.get(gpu_key(rank.node, index)) == job.job_id:
                del state.allocations[gpu_key(rank.node, index)]
                state.__pydantic_private__["_held_versions"][rank.node] = next(_HELD_VERSIONS)


def _finish(state: State, job: Job, entry_id: str, event: m.Message, status: JobStatus) -> None:
    _release(state, job, event.at)
    job.stopping = False
    job.status = status
    job.finished_at = event.at
    job.last_entry_id = entry_id


def _accepted(state: State, entry_id: str, event: m.JobAccepted) -> None:
    if not event.job_id or event.job_id in state.jobs:
        raise IllegalTransition(f"job {event.job_id!r} was already accepted")
    state.accepted += 1
    state.jobs[event.job_id] = new_job(event, state.accepted, entry_id)


def new_job(event: m.JobAccepted, seq: int, entry_id: str) -> Job:
    """The record a job.accepted event creates."""
    return Job(
        job_id=event.job_id or "",
        spec=event.spec,
        priority=event.spec.priority,
        seq=seq,
        submitted_at=event.at,
        submitted_by=event.actor,
        team=event.team,
        first_entry_id=entry_id,
        last_entry_id=entry_id,
        sweep_id=event.sweep_id,
        point=event.point,
    )


def _sweep_created(state: State, entry_id: str, event: m.SweepCreated) -> None:
    if event.sweep_id in state.sweeps:
        raise IllegalTransition(f"sweep {event.sweep_id!r} was already created")
    state.sweeps[event.sweep_id] = Sweep(
        sweep_id=event.sweep_id,
        name=event.name,
        grid=event.grid,
        max_concurrent=event.max_concurrent,
        job_ids=event.job_ids,
        created_at=event.at,
        created_by=event.actor,
    )


def _rejected(state: State, entry_id: str, event: m.JobRejected) -> None:
    job = _job(state, event, JobStatus.pending)
    job.reason, job.message = event.reason, event.message
    _finish(state, job, entry_id, event, JobStatus.failed)


def _held(state: State, entry_id: str, event: m.JobHeld) -> None:
    job = _job(state, event, JobStatus.pending)
    job.status = JobStatus.held
    job.last_entry_id = entry_id


def _noted(state: State, entry_id: str, event: m.Message) -> None:
    """A notification about a job: part of its history (where its entries end), nothing more."""
    job = state.jobs.get(event.job_id or "")
    if job is not None:
        job.last_entry_id = entry_id


def _waiting(state: State, entry_id: str, event: m.JobWaiting) -> None:
    job = _job(state, event, JobStatus.pending)
    job.status = JobStatus.waiting
    job.last_entry_id = entry_id


def _dependencies_met(state: State, entry_id: str, event: m.DependenciesMet) -> None:
    job = _job(state, event, JobStatus.waiting, JobStatus.pending)
    job.status = JobStatus.pending  # queued or held by the next fact
    if event.model_path:
        job.spec = job.spec.model_copy(update={"model_path": event.model_path})
    job.last_entry_id = entry_id


def _queued(state: State, entry_id: str, event: m.JobQueued) -> None:
    job = _job(state, event, JobStatus.pending, JobStatus.held)
    job.status = JobStatus.queued
    job.queue_position_at_submit = event.position
    job.last_entry_id = entry_id


def _scheduled(state: State, entry_id: str, event: m.JobScheduled) -> None:
    job = _job(state, event, JobStatus.queued)
    ranks = [m.Rank(node=event.node, gpu_ids=event.gpu_ids), *event.peers]
    if len(ranks) != job.spec.nodes or len({rank.node for rank in ranks}) != len(ranks):
        raise IllegalTransition(f"job {job.job_id} needs {job.spec.nodes} distinct nodes, scheduled on {len(ranks)}")
    for rank in ranks:
        node = state.nodes.get(rank.node)
        if node is None or not node.up:
            raise IllegalTransition(f"job {job.job_id} scheduled on unknown or lost node {rank.node}")
        known = {gpu.index for gpu in node.gpus}
        for index in rank.gpu_ids:
            holder = state.allocations.get(gpu_key(rank.node, index))
            if index not in known or holder is not None:
                raise IllegalTransition(f"GPU {rank.node}/{index} is not free (held by {holder})")
    for rank in ranks:
        for index in rank.gpu_ids:
            state.allocations[gpu_key(rank.node, index)] = job.job_id
        state.__pydantic_private__["_held_versions"][rank.node] = next(_HELD_VERSIONS)
    job.status = JobStatus.scheduled
    job.node, job.gpu_ids, job.attempt = event.node, list(event.gpu_ids), event.attempt
    job.peers, job.ranks_started, job.master_port = list(event.peers), [], event.master_port
    if event.fresh_start:
        job.last_checkpoint = job.checkpoint_node = None
    job.peer_commands = []
    job.scheduled_at = job.usage_mark = event.at
    job.borrowing, job.preempted_jobs = event.borrowing, list(event.preempted)
    job.checkpoint_at = job.checkpoint_step = None
    job.last_entry_id = entry_id


def _started(state: State, entry_id: str, event: m.JobStarted) -> None:
    job = _reported(state, event, JobStatus.scheduled)
    if job is None:
        return
    if event.rank >= job.spec.nodes or event.rank in job.ranks_started:
        raise IllegalTransition(f"rank {event.rank} of job {job.job_id} started twice or is not one of its ranks")
    job.ranks_started.append(event.rank)
    if event.rank == 0:
        job.pid, job.run_dir, job.argv, job.env = event.pid, event.run_dir, list(event.argv), dict(event.env)
    else:
        started = PeerCommand(rank=event.rank, node=event.node, argv=list(event.argv), env=dict(event.env))
        job.peer_commands = sorted([*job.peer_commands, started], key=lambda peer: peer.rank)
    if len(job.ranks_started) == job.spec.nodes:  # a gang job runs once every rank has started
        _credit(state, job, event.at)
        job.status = JobStatus.running
        job.started_at = event.at
    job.last_entry_id = entry_id


def _rank_ended(state: State, entry_id: str, event: m.RankEnded) -> None:
    """Noted: for a failed rank, the scheduler's job.requeued or job.failed that follows ends
    the attempt (and stops its other ranks)."""
    job = _reported(state, event, *HOLDS_GPUS)
    if job is not None:
        job.last_entry_id = entry_id


def _progress(state: State, entry_id: str, event: m.JobProgress) -> None:
    job = _reported(state, event, JobStatus.running, JobStatus.serving)
    if job is None:
        return
    # (no usage credit here: a run of progress reports folds as its last one alone, see events.log)
    job.progress = Progress(**event.payload(), at=event.at)
    job.last_entry_id = entry_id


def _checkpoint(state: State, entry_id: str, event: m.CheckpointSaved) -> None:
    job = _reported(state, event, JobStatus.running)
    if job is None:
        return
    _credit(state, job, event.at)
    if event.path not in job.checkpoints:
        job.checkpoints.append(event.path)
    job.last_checkpoint, job.checkpoint_node = event.path, job.node
    job.checkpoint_at, job.checkpoint_step = event.at, event.step
    job.last_entry_id = entry_id


def _serving(state: State, entry_id: str, event: m.JobServing) -> None:
    job = _reported(state, event, JobStatus.running)
    if job is None:
        return
    _credit(state, job, event.at)
    job.status = JobStatus.serving
    job.endpoint = event.endpoint
    job.last_entry_id = entry_id


def _succeeded(state: State, entry_id: str, event: m.JobSucceeded) -> None:
    job = _reported(state, event, JobStatus.running)
    if job is None:
        return
    job.exit_code, job.run_dir, job.final = event.exit_code, event.run_dir, dict(event.final)
    if event.last_checkpoint:
        job.last_checkpoint = event.last_checkpoint
    _finish(state, job, entry_id, event, JobStatus.completed)


def _failed(state: State, entry_id: str, event: m.JobFailed) -> None:
    job = _reported(state, event, *(set(JobStatus) - TERMINAL))
    if job is None:
        return
    job.exit_code, job.reason, job.message = event.exit_code, event.reason, event.message
    job.stderr_tail = list(event.stderr_tail)
    _finish(state, job, entry_id, event, JobStatus.failed)


def _lost(state: State, entry_id: str, event: m.JobLost) -> None:
    """Noted: the scheduler's job.requeued, job.failed or (an attempt being stopped)
    job.stopped that follows ends the attempt."""
    job = _reported(state, event, *HOLDS_GPUS)
    if job is not None:
        job.last_entry_id = entry_id


def _requeued(state: State, entry_id: str, event: m.JobRequeued) -> None:
    job = _job(state, event, *HOLDS_GPUS)
    if event.attempt != job.attempt:
        raise IllegalTransition(f"job {job.job_id} requeued for attempt {event.attempt}, not {job.attempt}")
    _release(state, job, event.at)
    job.status = JobStatus.queued
    job.retries += 1 if event.retry else 0
    job.last_entry_id = entry_id


def _current_attempt(job: Job, event: m.JobPreempted | m.JobSuspended) -> None:
    if event.attempt != job.attempt or job.stopping:
        raise IllegalTransition(f"{event.type} for attempt {event.attempt} of job {job.job_id} (at {job.attempt})")


def _preempted(state: State, entry_id: str, event: m.JobPreempted) -> None:
    job = _job(state, event, JobStatus.running, JobStatus.serving)
    _current_attempt(job, event)
    _release(state, job, event.at)
    job.status = JobStatus.preempted
    job.stopping, job.borrowing = True, False
    job.preemptions += 1
    job.preempted_by = event.by_job_id
    job.last_entry_id = entry_id


def _suspended(state: State, entry_id: str, event: m.JobSuspended) -> None:
    job = _job(state, event, JobStatus.running)
    _current_attempt(job, event)
    _release(state, job, event.at)
    job.status = JobStatus.suspended
    job.stopping, job.borrowing = True, False
    job.last_entry_id = entry_id


def _stopped(state: State, entry_id: str, event: m.JobStopped) -> None:
    """The attempt that gave up its GPUs is gone: a preempted job is queued again (in its
    original place: its priority and submit order are unchanged)."""
    job = _job(state, event)
    if event.attempt != job.attempt or not job.stopping:
        state.stale_reports += 1
        return
    job.stopping = False
    job.exit_code = event.exit_code
    if event.last_checkpoint:
        if event.last_checkpoint not in job.checkpoints:
            job.checkpoints.append(event.last_checkpoint)
        job.last_checkpoint, job.checkpoint_node = event.last_checkpoint, job.node
        job.checkpoint_at, job.checkpoint_step = event.at, event.step
    if job.status == JobStatus.preempted:
        job.status = JobStatus.queued
    job.last_entry_id = entry_id


def _resumed(state: State, entry_id: str, event: m.JobResumed) -> None:
    job = _job(state, event, JobStatus.suspended)
    job.status = JobStatus.queued  # in the queue once its attempt is gone (see queue_key)
    job.last_entry_id = entry_id


def _quotas_changed(state: State, entry_id: str, event: m.QuotasChanged) -> None:
    state.quotas = event.quotas
    if event.from_config:
        state.config_quotas = event.quotas


def _half_life_changed(state: State, entry_id: str, event: m.HalfLifeChanged) -> None:
    for usage in state.usage.values():
        usage.rescaled(state.half_life_s, event.half_life_s, event.at)
    state.half_life_s = event.half_life_s


def _priority_changed(state: State, entry_id: str, event: m.JobPriorityChanged) -> None:
    job = _job(state, event, JobStatus.queued)
    job.priority = event.priority
    job.last_entry_id = entry_id


def _deleted(state: State, entry_id: str, event: m.JobDeleted) -> None:
    job = _job(state, event, *TERMINAL)
    if job.export.status in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"job {job.job_id} is being exported")
    del state.jobs[job.job_id]
    state.deleted.add(job.job_id)


def _cancel_requested(state: State, entry_id: str, event: m.JobCancelRequested) -> None:
    job = _job(state, event, *HOLDS_GPUS)
    job.cancel_requested = True
    job.last_entry_id = entry_id


def _cancelled(state: State, entry_id: str, event: m.JobCancelled) -> None:
    job = _reported(state, event, *(set(JobStatus) - TERMINAL))
    if job is None:
        return
    job.exit_code = event.exit_code
    if event.last_checkpoint:
        job.last_checkpoint = event.last_checkpoint
    _finish(state, job, entry_id, event, JobStatus.cancelled)


def _export_requested(state: State, entry_id: str, event: m.ExportRequested) -> None:
    job = _job(state, event, JobStatus.completed)
    if job.export.status in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"export of job {job.job_id} is already {job.export.status}")
    job.export = Export(status=ExportStatus.pending, checkpoint=event.checkpoint, output_dir=event.output_dir)
    job.last_entry_id = entry_id


def _export_started(state: State, entry_id: str, event: m.ExportStarted) -> None:
    job = _job(state, event)
    if job.export.status not in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"export.started for job {job.job_id} with export {job.export.status}")
    job.export.status = ExportStatus.running
    job.last_entry_id = entry_id


def _export_completed(state: State, entry_id: str, event: m.ExportCompleted) -> None:
    job = _job(state, event)
    if job.export.status != ExportStatus.running:
        raise IllegalTransition(f"export.completed for job {job.job_id} with export {job.export.status}")
    job.export.status, job.export.path = ExportStatus.completed, event.path
    job.last_entry_id = entry_id


def _export_failed(state: State, entry_id: str, event: m.ExportFailed) -> None:
    job = _job(state, event)
    if job.export.status not in (ExportStatus.pending, ExportStatus.running):
        raise IllegalTransition(f"export.failed for job {job.job_id} with export {job.export.status}")
    job.export.status, job.export.error = ExportStatus.failed, event.message
    job.last_entry_id = entry_id


def _node_joined(state: State, entry_id: str, event: m.NodeJoined) -> None:
    previous = state.nodes.get(event.node)
    if previous is not None and previous.up:
        held = {int(k.split("/")[1]) for k in state.allocations if k.split("/")[0] == event.node}
        if not held <= {gpu.index for gpu in event.gpus}:
            raise IllegalTransition(f"node {event.node} rejoined without GPUs its jobs hold")
    state.nodes[event.node] = Node(
        name=event.node,
        simulated=event.simulated,
        gpus=list(event.gpus),
        addr=event.addr,
        joined_at=event.at,
        epoch=previous.epoch + (0 if previous.up else 1) if previous else 1,
    )


def _node_lost(state: State, entry_id: str, event: m.NodeLost) -> None:
    node = state.nodes.get(event.node)
    if node is None or not node.up:
        raise IllegalTransition(f"node.lost for node {event.node} that is not up")
    if any(key.split("/")[0] == event.node for key in state.allocations):
        raise IllegalTransition(f"node {event.node} lost while jobs still hold its GPUs")
    node.up, node.lost_at = False, event.at


_HANDLERS = {
    m.JobAccepted: _accepted,
    m.JobRejected: _rejected,
    m.JobQueued: _queued,
    m.JobHeld: _held,
    m.JobWaiting: _waiting,
    m.NotificationDelivered: _noted,
    m.NotificationFailed: _noted,
    m.SweepCreated: _sweep_created,
    m.DependenciesMet: _dependencies_met,
    m.JobScheduled: _scheduled,
    m.JobStarted: _started,
    m.JobProgress: _progress,
    m.CheckpointSaved: _checkpoint,
    m.JobServing: _serving,
    m.JobSucceeded: _succeeded,
    m.JobFailed: _failed,
    m.JobCancelRequested: _cancel_requested,
    m.JobPriorityChanged: _priority_changed,
    m.JobLost: _lost,
    m.RankEnded: _rank_ended,
    m.JobRequeued: _requeued,
    m.JobDeleted: _deleted,
    m.JobCancelled: _cancelled,
    m.ExportRequested: _export_requested,
    m.ExportStarted: _export_started,
    m.ExportCompleted: _export_completed,
    m.ExportFailed: _export_failed,
    m.NodeJoined: _node_joined,
    m.NodeLost: _node_lost,
    m.JobPreempted: _preempted,
    m.JobSuspended: _suspended,
    m.JobStopped: _stopped,
    m.JobResumed: _resumed,
    m.QuotasChanged: _quotas_changed,
    m.HalfLifeChanged: _half_life_changed,
}
