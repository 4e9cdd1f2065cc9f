"""Committing decisions: each read's decisions and acknowledgements land in one step, or none do.

Every commit carries the leader's fencing token and the log position its decisions were made on;
one that meets facts appended meanwhile is taken back (the state's savepoint) and decided again
on the log as it now stands. Reads of commands and telemetry are pipelined: the next is decided
while the commit before it is still running in Redis, on the state that commit will leave.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import anyio.abc
import structlog

from events import messages as m
from events.bus import Ack, Bus, CommitResult, CommitStatus, Entry, PreparedCommit, entry_id_key
from events.consumer import Delivery
from events.errors import IllegalTransition
from events.keys import SCHEDULER_GROUP
from events.log import apply_entry, catch_up
from events.state import State
from services import metrics
from services.scheduler.decider import Decider, Plan
from services.scheduler.snapshots import Snapshots

log = structlog.get_logger("scheduler")

MAX_UNACKED = 1000  # acknowledgements that may wait for a commit to ride along with
MAX_CONFLICT_RETRIES = 50  # an entry decided again on a log that moved on, before giving up
# A read whose commit meets new facts this often is decided again in halves: a large read takes
# long enough to decide that, on a busy cluster, the runners' reports land in between every time.
SPLIT_AFTER_CONFLICTS = 2

# Reports that change only their own job's record and free no GPU. Decisions about other jobs
# hold whether they landed before or after: one appended between a read's decisions and their
# commit does not make the commit conflict (see Bus.prepare_commit); it is folded in first. (At
# 1,000 GPUs, runners' starts landed between most decisions and their commits, each conflict
# deciding a read again; on a real cluster, progress reports would.)
PASSABLE_REPORTS = ("job.progress", "job.checkpoint_saved", "job.started", "job.serving")


class UndecidedBatch(Exception):
    """Deciding a read raised: the state is as it was, nothing was committed."""


@dataclass(eq=False)
class InFlight:
    """A read decided and sent to be committed, whose answer is not yet known."""

    deliveries: list[Delivery]
    plan: Plan
    owed: list[Ack]
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    result: CommitResult | None = None
    error: Exception | None = None

    async def run(self, bus: Bus, prepared: PreparedCommit, expect_last: str | None) -> None:
        with self.scope:
            try:
                self.result = await bus.run_commit(prepared, expect_last)
            except Exception as exc:  # raised where the answer is awaited
                self.error = exc
            finally:
                self.done.set()

    async def answer(self) -> CommitResult:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None  # (an abandoned commit is never awaited: end_term drops it)
        return self.result


class Committer:
    """The decisions of each read committed with the fencing token, pipelined, rolled back and
    decided again when the log moved on; the acknowledgements owed ride along."""

    def __init__(self, bus: Bus, decider: Decider, snapshots: Snapshots) -> None:
        self.bus = bus
        self.keys = decider.keys
        self.decider = decider
        self.snapshots = snapshots
        self.token: str | None = None
        self.tasks: anyio.abc.TaskGroup | None = None  # the term's: commits in flight, snapshot children
        self.own: deque[str] = deque()  # ids of facts committed here, not yet read back
        self.unacked: list[Ack] = []  # entries read and done with, whose acknowledgement waits
        self.inflight: InFlight | None = None

    @property
    def state(self) -> State:
        return self.decider.state

    def start_term(self, token: str, tasks: anyio.abc.TaskGroup | None) -> None:
        self.token = token
        self.tasks = tasks
        self.own.clear()
        self.unacked = []
        self.inflight = None

    def end_term(self) -> None:
        """A commit still in flight is abandoned: its outcome is read from the log by the next leader."""
        if self.inflight is not None:
            self.inflight.scope.cancel()
            self.inflight = None
        self.tasks = None

    async def catch_up(self) -> int:
        """Fold every event appended since the state's position; snapshot now and then. Returns
        how many entries were folded."""
        state = self.state
        stale = state.stale_reports
        held = dict(state.allocations)
        folded = await catch_up(self.bus, state)
        self.snapshots.unsaved += folded
        if folded:
            self.decider.liveness.note_left(state, held)
        if state.stale_reports > stale:
            log.warning("ignored reports of superseded attempts", count=state.stale_reports - stale)
        await self.save_snapshot_when_due()
        return folded

    async def save_snapshot_when_due(self) -> None:
        if self.tasks is not None:
            self.snapshots.save_when_due(self.state, self.tasks)
            return
        async with anyio.create_task_group() as tasks:  # outside a term: waited for here
            self.snapshots.save_when_due(self.state, tasks)

    async def handle_batch(self, deliveries: list[Delivery], acks: list[Entry]) -> int:
        """Decide a read and commit every decision and acknowledgement in one step. A read that
        cannot be decided is split, so that one bad entry is left pending alone. Entries owed
        only an acknowledgement (facts of this scheduler, read back) ride along with the next
        commit, or are acknowledged when the streams fall quiet: left pending by a crash, they
        would only be decided again, to no effect.

        A read of commands and telemetry is decided while the commit of the read before is
        still running in Redis, on the state that commit will leave, and sent once it landed
        (so Redis's work and this process's overlap). A read with facts of the log, one that
        is due a snapshot, or one whose predecessor did not land as planned is decided after
        its predecessor is settled, as if alone."""
        self.unacked += [Ack(e.stream, SCHEDULER_GROUP, e.entry_id) for e in acks]
        if not deliveries:
            if len(self.unacked) >= MAX_UNACKED:
                await self.flush_acks()
            return 0
        try:
            if self.overlaps(deliveries):
                await self._pipeline(deliveries)
            else:
                await self.settle()
                deliveries = self.drop_own(deliveries)
                await self.commit_batch(deliveries)
                await self.save_snapshot_when_due()
            return 0
        except UndecidedBatch:
            if len(deliveries) <= 1:
                return len(deliveries)
        return sum([await self.handle_batch([delivery], []) for delivery in deliveries])

    def overlaps(self, deliveries: Sequence[Delivery]) -> bool:
        """Whether a read may be decided before the commit in flight is settled."""
        return (
            self.tasks is not None
            and not self.snapshots.wanted
            and all(d.stream != self.keys.events for d in deliveries)
        )

    def drop_own(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Facts of this scheduler read back before their commit was settled: acknowledged."""
        kept = []
        for delivery in deliveries:
            if self.is_own(Entry(delivery.stream, delivery.entry_id, {})):
                self.unacked.append(Ack(delivery.stream, SCHEDULER_GROUP, delivery.entry_id))
            else:
                kept.append(delivery)
        return kept

    def _decide(self, deliveries: list[Delivery]) -> Plan:
        """A read decided inside a new savepoint; if deciding raises, the savepoint is taken back."""
        self.state.savepoint()
        try:
            return self.decider.plan(deliveries)
        except Exception as exc:
            self.state.rollback()
            log.exception("deciding failed; entries left pending", entries=[d.entry_id for d in deliveries])
            raise UndecidedBatch from exc

    async def _pipeline(self, deliveries: list[Delivery]) -> None:
        assert self.tasks is not None
        plan = self._decide(deliveries)
        owed = [Ack(d.stream, SCHEDULER_GROUP, d.entry_id) for d in deliveries] + self.unacked
        self.unacked = []
        prepared = self.bus.prepare_commit(
            plan.appends,
            acks=owed,
            fence_token=self.token,
            dedupe_ids=plan.dedupe_ids,
            reader_group=SCHEDULER_GROUP,
            tolerate=PASSABLE_REPORTS,
            touched=plan.touched(deliveries),
        )
        if not await self.settle(later=True):
            # The read before was decided again; so is this one, on the state that left.
            self.unacked = owed[len(deliveries) :] + self.unacked
            await self.commit_batch(self.drop_own(deliveries))
            return
        expect_last = self.state.committed_position if plan.appends else None
        self.inflight = InFlight(deliveries, plan, owed)
        self.tasks.start_soon(self.inflight.run, self.bus, prepared, expect_last)

    async def settle(self, *, later: bool = False) -> bool:
        """Wait for the commit in flight and keep its decisions, under the ids they got. If it
        did not land as planned, take back (with ``later``: the read decided after it first)
        and decide it again alone; returns False then."""
        inflight, self.inflight = self.inflight, None
        if inflight is None:
            return True
        try:
            result = await inflight.answer()
        except BaseException:
            for _ in range(2 if later else 1):
                self.state.rollback()
            raise
        self.observe(inflight.deliveries, result.status)
        if result.status == CommitStatus.OK:
            if result.passed and later:
                # The read decided after it did not see the reports its commit passed over
                self.state.rollback()
                self.keep(inflight.plan, result)
                return False
            self.keep(inflight.plan, result)
            return True
        if later:
            self.state.rollback()
        self.state.rollback()
        if result.status != CommitStatus.DUPLICATE:  # (duplicates: the acknowledgements landed)
            self.unacked = inflight.owed[len(inflight.deliveries) :] + self.unacked
            await self.commit_batch(inflight.deliveries, behind=True)
        return False

    async def flush_acks(self) -> None:
        await self.settle()
        if self.unacked:
            await self.bus.commit([], acks=self.unacked, fence_token=self.token)
            self.unacked = []
        await self.save_snapshot_when_due()

    async def commit_batch(self, deliveries: list[Delivery], *, behind: bool = False) -> None:
        """Decide a read on the state as committed and commit it, again on a log that moved on,
        in halves when it keeps meeting new facts."""
        position = entry_id_key(self.state.position)
        behind = behind or any(d.stream == self.keys.events and entry_id_key(d.entry_id) > position for d in deliveries)
        owed = [Ack(d.stream, SCHEDULER_GROUP, d.entry_id) for d in deliveries] + self.unacked
        duplicates: set[int] = set()
        for conflicts in range(MAX_CONFLICT_RETRIES):
            if conflicts >= SPLIT_AFTER_CONFLICTS and len(deliveries) - len(duplicates) > 1:
                # (the decisions already committed are owed only their acknowledgements)
                self.unacked += [owed[i] for i in sorted(duplicates)]
                rest = [d for i, d in enumerate(deliveries) if i not in duplicates]
                half = len(rest) // 2
                await self.commit_batch(rest[:half], behind=True)
                await self.commit_batch(rest[half:], behind=True)
                return
            if behind:
                await self.catch_up()
            expect_last = self.state.position
            plan = self._decide([d for i, d in enumerate(deliveries) if i not in duplicates])
            try:
                result = await self.bus.commit(
                    plan.appends,
                    acks=owed,
                    fence_token=self.token,
                    expect_last=expect_last if plan.appends else None,
                    dedupe_ids=plan.dedupe_ids,
                    reader_group=SCHEDULER_GROUP,
                    tolerate=PASSABLE_REPORTS,
                    touched=plan.touched(deliveries),
                )
            except BaseException:
                self.state.rollback()
                raise
            self.observe(deliveries, result.status)
            if result.status in (CommitStatus.OK, CommitStatus.DUPLICATE):
                self.unacked = []
            if result.status == CommitStatus.OK:
                self.keep(plan, result)
                return
            self.state.rollback()
            if result.status == CommitStatus.DUPLICATE:
                return  # every decision had been committed before; the acknowledgements landed
            if result.status == CommitStatus.SOME_DUPLICATE:
                redone = [i for i in range(len(deliveries)) if i not in duplicates]
                duplicates.update(redone[plan.marks[k]] for k in result.duplicates)
            behind = True
        raise RuntimeError(f"a read of {len(deliveries)} entries conflicted {MAX_CONFLICT_RETRIES} times")

    def observe(self, deliveries: Sequence[Delivery], status: CommitStatus) -> None:
        """Count a commit; once decisions landed, how long each command waited for its own."""
        metrics.COMMITS.labels(status=status.value.lower()).inc()
        if status != CommitStatus.OK:
            return
        now_ms = (datetime.now(UTC) - self.decider.liveness.redis_clock_behind).timestamp() * 1000
        for delivery in deliveries:
            if delivery.stream == self.keys.commands:
                waited_ms = now_ms - entry_id_key(delivery.entry_id)[0]
                metrics.DECISION_SECONDS.observe(max(0.0, waited_ms / 1000))

    def keep(self, plan: Plan, result: CommitResult) -> None:
        """A plan's commit landed: its folded facts are kept under the ids they got. (Its
        savepoint must be the latest open.) When it passed over reports that landed before it,
        those are folded first and its facts after them, in the log's order."""
        ids = [
            entry_id
            for item, entry_id in zip(plan.appends, result.entry_ids, strict=True)
            if item.stream == plan.events
        ]
        if result.passed:
            self.state.rollback()
            for entry in result.passed:
                apply_entry(self.state, entry.entry_id, entry.fields)
            facts = [item.message for item in plan.appends if item.stream == plan.events]
            for fact, entry_id in zip(facts, ids, strict=True):
                try:
                    self.state.apply(entry_id, fact)
                except IllegalTransition as exc:  # (as the log's fold would: passed over)
                    log.error("own fact does not apply after the reports it passed over", reason=str(exc))
                    self.state.position = entry_id
            self.snapshots.unsaved += len(result.passed)
        else:
            self.state.release(dict(zip(plan.stand_ins, ids, strict=True)))
        if not result.skipped:  # they will be read back: acknowledged unread then
            self.own.extend(ids)
        self.snapshots.unsaved += len(plan.stand_ins)

    def is_own(self, entry: Entry) -> bool:
        """A fact this scheduler committed (and reacted to) itself: acknowledged unread."""
        if entry.stream != self.keys.events:
            return False
        key = entry_id_key(entry.entry_id)
        while self.own and entry_id_key(self.own[0]) < key:
            self.own.popleft()
        if self.own and self.own[0] == entry.entry_id:
            self.own.popleft()
            return True
        return False

    async def commit_pass(self) -> None:
        """A scheduling pass outside any delivery (on taking the lead)."""
        cause = m.ProcessQueue(source=self.bus.source)
        while True:
            await self.catch_up()
            decisions = self.decider.schedule(cause)
            if not decisions:
                return
            result = await self.bus.commit(decisions, fence_token=self.token, expect_last=self.state.position)
            if result.status != CommitStatus.CONFLICT:
                return
