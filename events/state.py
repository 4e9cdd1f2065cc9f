"""State as a pure fold over the log: jobs, the queue, GPU allocations and nodes.

``State.apply`` is deterministic and does no I/O. The scheduler, the gateway and the replay tool
all build their view with it, so replaying the log rebuilds exactly what the services show.
The records it holds are in :mod:`events.records`, what each event does to them in
:mod:`events.transitions`.

(A little over 400 lines: the indexes the queue and quotas are read from, and the savepoints that
take folded facts back, must change together with every fold, so they stay in one class.)
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

from pydantic import BaseModel, Field, PrivateAttr
from sortedcontainers import SortedList

from events import messages as m
from events.errors import IllegalTransition
from events.quotas import DEFAULT_HALF_LIFE_S, Quotas, Usage, team_key, user_key
from events.records import HOLDS_GPUS, QUEUED_FOR_QUOTA, Job, JobStatus, Node, Sweep
from events.transitions import HANDLERS


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


class _Private(TypedDict):
    """State's private attributes by name, as the hot paths read them."""

    _queued: SortedList
    _levels: dict[int, dict[str, SortedList]]
    _waiting: dict[str, int]
    _holding: dict[str, int]
    _awaiting: set[str]
    _sweep_running: dict[str, int]
    _owner_teams: dict[str, dict[str | None, int]]
    _version: int
    _full: tuple[int, Quotas, frozenset[str]] | None
    _journals: list[Journal]
    _held_versions: dict[str, int]


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
    if TYPE_CHECKING:
        __pydantic_private__: _Private  # type: ignore[assignment]  # (its keys are the attributes above)

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
        owners = frozenset(full)
        private["_full"] = (private["_version"], quotas, owners)
        return owners

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
        job_id: str = self.__pydantic_private__["_queued"][position - 1][2]
        return job_id

    def queued_ahead_of(self, priority: int, seq: float = math.inf) -> int:
        """How many queued jobs a job of this priority would wait behind: a new one, or (by its
        submit order) one submitted earlier and queued only now."""
        ahead: int = self.__pydantic_private__["_queued"].bisect_left((-priority, seq, ""))
        return ahead

    def held_version(self, node: str) -> int:
        """A number that changes whenever a job of ours takes or leaves a GPU of the node, and
        that no other state or set of holders of this process ever had: what the node's GPUs
        offer may be worked out once per number."""
        versions = self.__pydantic_private__["_held_versions"]
        version = versions.get(node)
        if version is None:
            version = versions[node] = next(_HELD_VERSIONS)
        return version

    def held_changed(self, node: str) -> None:
        """A job of ours took or left a GPU of the node: a new held version."""
        self.__pydantic_private__["_held_versions"][node] = next(_HELD_VERSIONS)

    def apply(self, entry_id: str, event: m.Message) -> None:
        """Fold one event in. Raises IllegalTransition, leaving the state unchanged."""
        handler = HANDLERS.get(type(event))
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
