"""The scheduler process: wins the leader lease, folds the log, and decides.

One consumer loop reads commands, the log and telemetry through the `scheduler` group. Every
decision is made on a state folded up to the log's last entry and committed with the fencing token
and that entry id, so a stale leader, or a decision on an out-of-date state, cannot land.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import anyio
import redis.asyncio as aioredis
import structlog
from pydantic_core import from_json

from events import audit, placement, snapshot
from events import messages as m
from events.bus import (
    Ack,
    Append,
    Bus,
    CommitResult,
    CommitStatus,
    Entry,
    Fenced,
    clock_behind,
    connect,
    entry_id_key,
    entry_time,
)
from events.consumer import Delivery, GroupConsumer
from events.keys import SCHEDULER_GROUP, Keys
from events.log import apply_entry, catch_up
from events.state import IllegalTransition, State
from services import metrics
from services.config import Settings
from services.runtime import REDIS_LOST, settle_heap
from services.scheduler import rules

log = structlog.get_logger("scheduler")

CONSUMER = "leader"  # every leader reads as the same consumer, so a new one inherits the pending

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# Take the lease (or find it ours still, from before Redis dropped the connection) and the next
# fencing token in one step: a winner paused between the two could otherwise come back with a
# token above a newer leader's. Returns {token, 0}, or {0, ms the holder's lease has left}.
_ACQUIRE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif holder then
  return {0, redis.call('PTTL', KEYS[1])}
elseif not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0, 0}
end
return {redis.call('INCR', KEYS[2]), 0}
"""


READ_COUNT = 500  # entries per stream and read: decided together, committed in one step
# Telemetry is read in smaller helpings: a heartbeat takes ~0.4 ms to decide at 1,000 GPUs, and
# the heartbeats that pile up while a large read is decided (100+ at 125 nodes) would otherwise be
# decided in one read, ahead of a submission that arrives meanwhile.
TELEMETRY_READ_COUNT = 20
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


def touched(plan: Plan, deliveries: Sequence[Delivery]) -> set[str]:
    """The jobs a read's decisions are about: those of its entries and of what it decided."""
    messages = [item.message for item in plan.appends] + [d.message for d in deliveries]
    return {message.job_id for message in messages if message.job_id}


class LostLeadership(Exception):
    """The lease expired or another scheduler took it."""


class UndecidedBatch(Exception):
    """Deciding a read raised: the state is as it was, nothing was committed."""


class Plan:
    """The decisions on one read, each event folded into the state as it is decided, under a
    stand-in id until the commit gives it its place in the log."""

    def __init__(self, state: State, events: str, serial: int = 0) -> None:
        self.state = state
        self.events = events
        self.serial = serial  # tells the stand-ins of plans in flight together apart
        self.appends: list[Append] = []
        self.stand_ins: list[str] = []
        self.dedupe_ids: list[str] = []
        self.marks: list[int] = []  # for each dedupe id, the index of its delivery

    def fold(self, decided: Sequence[Append]) -> list[m.Message]:
        """Add decisions; returns the facts among them (folded in)."""
        facts = []
        for item in decided:
            self.appends.append(item)
            if item.stream == self.events:
                stand_in = f"~{self.serial}.{len(self.stand_ins)}"
                self.state.apply(stand_in, item.message)  # an illegal decision raises: nothing lands
                self.stand_ins.append(stand_in)
                facts.append(item.message)
        return facts

    def dedupe(self, dedupe_id: str, index: int) -> None:
        self.dedupe_ids.append(dedupe_id)
        self.marks.append(index)


@dataclass
class InFlight:
    """A read decided and sent to be committed, whose answer is not yet known."""

    deliveries: list[Delivery]
    plan: Plan
    owed: list[Ack]
    result: asyncio.Future[CommitResult]


class Scheduler:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.keys = settings.keys
        self.state = State()
        self.unsaved = 0  # events folded since the last snapshot
        self.heartbeats: dict[str, m.NodeHeartbeat] = {}
        self.token: str | None = None
        self.limits = rules.Limits(
            **asdict(settings.policy),
            heartbeat_timeout_s=settings.heartbeat_interval_s * 5,
            foreign_memory_threshold_mb=settings.foreign_memory_threshold_mb,
            node_timeout_s=settings.node_timeout_s,
            backfill=settings.backfill,
            backfill_margin_s=settings.stop_grace_s,
            rendezvous_ports=settings.rendezvous_ports,
            restart_lost_checkpoints=settings.lost_checkpoint == "restart",
            idle_timeout_s=settings.idle_timeout_s,
            idle_gpu_util_pct=settings.idle_gpu_util_pct,
        )
        self.idle_since: dict[str, datetime] = {}  # job id -> since when its GPUs all read idle
        self.last_heard: dict[str, datetime] = {}
        self.runner_heard: dict[str, datetime] = {}  # node -> when its runner was last heard
        self.heartbeat_ids: dict[str, tuple[int, int]] = {}  # node -> entry id of its kept heartbeat
        # node -> GPU index -> the log's position when a job of ours was seen to leave it, until
        # a heartbeat of the node newer than that
        self.left: dict[str, dict[int, tuple[int, int]]] = {}
        self.telemetry_at: datetime | None = None  # arrival of the newest telemetry entry read
        self.looked_for_lost: datetime | None = None  # when silent nodes and runners were last looked for
        self.look_for_lost_every = timedelta(seconds=settings.heartbeat_interval_s / 4)
        self.redis_clock_behind = timedelta(0)  # this scheduler's clock minus Redis's
        self.own: deque[str] = deque()  # ids of facts committed here, not yet read back
        self.unacked: list[Ack] = []  # entries read and done with, whose acknowledgement waits
        self.inflight: InFlight | None = None
        self.plans = 0  # reads decided so far
        self.snapshot_due = False  # the retention task asks for a snapshot
        self.snapshot_saved = anyio.Event()
        self.snapshotting: asyncio.Future[None] | None = None  # a child writing a snapshot
        self.warm = False  # the state is the fold of committed facts only (kept by a standby)

    async def catch_up(self) -> int:
        """Fold every event appended since the state's position; snapshot now and then. Returns
        how many entries were folded."""
        stale = self.state.stale_reports
        held = dict(self.state.allocations)
        folded = await catch_up(self.bus, self.state)
        self.unsaved += folded
        if folded:
            self.note_left(held)
        if self.state.stale_reports > stale:
            log.warning("ignored reports of superseded attempts", count=self.state.stale_reports - stale)
        await self.save_snapshot_when_due()
        return folded

    def note_left(self, held: dict[str, str]) -> None:
        """GPUs that jobs of ours held before the facts just folded and no longer hold: the
        runner reports a job's end once its processes are gone, so a node's reading taken
        before that shows memory the GPU no longer holds. Until the node's next heartbeat, its
        kept one is read without them (the GPUs are not taken for another's)."""
        position = entry_id_key(self.state.position)
        for key, job_id in held.items():
            if self.state.allocations.get(key) != job_id:
                node, index = key.rsplit("/", 1)
                self.left.setdefault(node, {})[int(index)] = position
        for node in {key.rsplit("/", 1)[0] for key in held.keys() - self.state.allocations.keys()}:
            self.read_without_left(node)

    def read_without_left(self, node: str) -> None:
        """The node's kept heartbeat, less the jobs of ours that left its GPUs after it was taken."""
        left, beat = self.left.get(node), self.heartbeats.get(node)
        if not left or beat is None:
            return
        taken = self.heartbeat_ids.get(node, (0, 0))
        since = {index: position for index, position in left.items() if position > taken}
        if since:
            self.left[node] = since
            threshold = self.settings.foreign_memory_threshold_mb
            self.heartbeats[node] = placement.left_by_our_jobs(beat, since.keys(), threshold)
        else:
            del self.left[node]

    def _newest(self, node: str, entry_id: str) -> bool:
        """Whether a node's heartbeat is newer than the one kept (one delivered again, after a
        restart, comes late)."""
        key = entry_id_key(entry_id)
        if key < self.heartbeat_ids.get(node, (0, 0)):
            return False
        self.heartbeat_ids[node] = key
        return True

    async def read_clocks(self) -> None:
        """How far this scheduler's clock is ahead of Redis's, by which entry ids are stamped."""
        self.redis_clock_behind = await clock_behind(self.bus.redis)

    async def recall_runners(self, now: datetime) -> None:
        """How long each node's runner had been silent while its gpu-monitor went on reporting,
        by the heartbeats the telemetry stream still holds: a runner that died before this term
        is found as surely as one that dies in it. Silence while the monitor was silent too (a
        Redis outage, a dead node) does not count: only the gaps between the monitor's beats
        after the runner's last one, each shorter than half the node timeout, add up."""
        runners: dict[str, datetime] = {}  # node -> its runner's last beat
        monitored: dict[str, list[datetime]] = {}  # node -> its monitor's beats after that, newest first
        for entry_id, fields in await self.bus.redis.xrevrange(
            self.keys.telemetry, count=self.settings.telemetry_maxlen
        ):
            kind = fields.get("type")
            if kind not in ("service.heartbeat", "node.heartbeat"):
                continue
            try:  # the node named, without validating every GPU sample of every heartbeat
                payload = from_json(fields["data"])["payload"]
                node, runner = payload["node"], payload.get("service") == "runner"
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(node, str) or node in runners:
                continue
            if kind == "node.heartbeat":
                monitored.setdefault(node, []).append(entry_time(str(entry_id)))
            elif runner:
                runners[node] = entry_time(str(entry_id))
        gap = timedelta(seconds=self.settings.node_timeout_s / 2)
        for node, heard in runners.items():
            beats = [heard, *reversed(monitored.get(node, []))]
            silent = sum(
                (later - earlier for earlier, later in itertools.pairwise(beats) if later - earlier <= gap),
                timedelta(0),
            )
            self.runner_heard[node] = now - silent

    def hear_anew(self, now: datetime) -> None:
        """At the start of a term, every node up, and every runner heard in an earlier term, gets
        a full timeout from now: this scheduler has not heard anyone in this term yet."""
        self.last_heard = {name: now for name, node in self.state.nodes.items() if node.up}
        self.runner_heard = dict.fromkeys(self.runner_heard, now)
        self.telemetry_at = None

    def credit_quiet(self, entry_id: str, now: datetime) -> None:
        """A spell in which no one at all was heard (Redis refused every write while full, or
        stalled) is no one's silence: every node and runner is credited with it, so that Redis
        taking writes again does not read as lost nodes. Heartbeats of every process land every
        interval; a gap of more than two means nobody could write."""
        arrived = min(now, entry_time(entry_id) + self.redis_clock_behind)
        interval = timedelta(seconds=self.settings.heartbeat_interval_s)
        if self.telemetry_at is not None and arrived - self.telemetry_at > 2 * interval:
            quiet = arrived - self.telemetry_at - interval
            log.warning("no one was heard for a while; their silence does not count", quiet_s=quiet.total_seconds())
            self.last_heard = {node: heard + quiet for node, heard in self.last_heard.items()}
            self.runner_heard = {node: heard + quiet for node, heard in self.runner_heard.items()}
        self.telemetry_at = max(arrived, self.telemetry_at or arrived)

    def _pass(self, cause: m.Message) -> list[Append]:
        return rules.schedule(self.state, self.keys, self.heartbeats, self.limits, datetime.now(UTC), cause)

    def decide(self, delivery: Delivery, now: datetime) -> tuple[list[Append], m.Message | None]:
        """What a delivery decides directly, and the cause of the scheduling pass it calls for
        (None: no pass, or one is part of the decision already)."""
        message = delivery.message
        if delivery.stream == self.keys.telemetry:
            self.credit_quiet(delivery.entry_id, now)
        stale_beat = isinstance(message, m.NodeHeartbeat) and not self._newest(message.node, delivery.entry_id)
        if isinstance(message, m.NodeHeartbeat) and not stale_beat:
            # Aged by when it reached Redis (its entry id, on this scheduler's clock), one clock
            # for every node: a node's clock running behind or ahead must not make its GPUs look
            # stale, or fresh (and a backlog read after an outage must not look new)
            arrived = min(now, entry_time(delivery.entry_id) + self.redis_clock_behind)
            message = message.model_copy(update={"at": arrived})
            self.heartbeats[message.node] = message
            self.read_without_left(message.node)
            self.last_heard[message.node] = now  # by this scheduler's clock: no skew between nodes
        elif isinstance(message, m.ServiceHeartbeat) and message.service == "runner" and message.node:
            self.runner_heard[message.node] = now
        if delivery.stream == self.keys.telemetry:
            # Heartbeats arrive every few seconds (this scheduler's own among them): the clock by
            # which silent nodes are found. Looked for a few times an interval, not at every
            # entry: the walk over every node, at every node's heartbeats, grew with the square
            # of the cluster.
            due = self.looked_for_lost is None or now - self.looked_for_lost >= self.look_for_lost_every
            lost = rules.lost_nodes(self.state, self.last_heard, self.limits, now) if due else []
            if lost:
                log.warning("node lost", node=lost[0])
                return rules.lose_node(self.state, self.keys, lost[0], message), None
            orphaned = (
                rules.lost_runners(self.state, self.runner_heard, self.last_heard, self.limits, now) if due else []
            )
            if orphaned:
                log.warning("runner lost; its node takes no jobs until it is back", node=orphaned[0])
                return rules.lose_node(self.state, self.keys, orphaned[0], message, m.NodeLossReason.RUNNER_LOST), None
            if due:
                self.looked_for_lost = now  # (one found is looked for again at the next entry)
            if not isinstance(message, m.NodeHeartbeat) or stale_beat:
                return [], None  # (a heartbeat older than one taken in says nothing new)
            if rules.runner_silent(message.node, self.runner_heard, self.limits, now):
                return [], None  # the node rejoins once its runner is heard again
            joined = rules.node_changes(self.state, message)
            if joined:
                return [Append(self.keys.events, fact) for fact in joined], None
            idle = rules.reclaim_idle(
                self.state, self.keys, message, self.heartbeats, self.idle_since, self.limits, now
            )
            return idle, None if idle else message
        if isinstance(message, m.SubmitJob):  # placed at once when it fits: the pass is included
            return rules.submit(self.state, self.keys, message, self.heartbeats, self.limits, now), None
        if isinstance(message, m.CancelJob):
            return rules.cancel(self.state, self.keys, message), None
        if isinstance(message, m.SetPriority):
            return rules.set_priority(self.state, self.keys, message), None
        if isinstance(message, m.DeleteJob):
            return rules.delete(self.state, self.keys, message), None
        if isinstance(message, m.ReleaseJob):
            return rules.release(self.state, self.keys, message), None
        if isinstance(message, m.SuspendJob):
            return rules.suspend(self.state, self.keys, message), None
        if isinstance(message, m.ResumeJob):
            return rules.resume(self.state, self.keys, message), None
        if isinstance(message, m.CreateSweep):
            return rules.create_sweep(self.state, self.keys, message), None
        if isinstance(message, m.CancelSweep):
            return rules.cancel_sweep(self.state, self.keys, message), None
        if isinstance(message, m.SetQuotas):
            return rules.set_quotas(self.state, self.keys, message), None
        if isinstance(message, m.SetHalfLife):
            return rules.set_half_life(self.state, self.keys, message), None
        if isinstance(message, m.RequestExport):
            job = self.state.jobs.get(message.job_id or "")
            return (rules.export(self.state, self.keys, job, message) if job else []), None
        if isinstance(message, m.ProcessQueue):
            return [], message
        if delivery.stream == self.keys.events:
            return rules.react(self.state, self.keys, message), message if rules.reschedules(message) else None
        return [], None

    def plan(self, deliveries: Sequence[Delivery]) -> Plan:
        """Decide a whole read, folding each decision's facts in (under stand-in ids) before the
        next delivery is decided, exactly as if each had been committed and read back alone. A
        fact of this scheduler's calls for the same reactions as when it is read from the log
        (then skipped). A scheduling pass places every queued job that fits, so the passes that
        reports, heartbeats and forced passes call for are made once, before the next command
        and at the end of the read, rather than once each."""
        self.plans += 1
        plan = Plan(self.state, self.keys.events, self.plans)
        owed: tuple[int, m.Message] | None = None  # the delivery that last called for a pass

        def settle() -> None:
            nonlocal owed
            if owed is not None:
                index, cause = owed
                owed = None
                before = len(plan.appends)
                plan.fold(rules.schedule(self.state, self.keys, self.heartbeats, self.limits, now, cause))
                if len(plan.appends) > before and index not in plan.marks:
                    plan.dedupe(f"{SCHEDULER_GROUP}:{deliveries[index].message.id}", index)

        for index, delivery in enumerate(deliveries):
            now = datetime.now(UTC)
            command = delivery.stream == self.keys.commands
            if command:
                settle()
            before = len(plan.appends)
            decided, cause = self.decide(delivery, now)
            # A submit's decision places the job already: its job.queued calls for no other pass.
            passed = isinstance(delivery.message, m.SubmitJob)
            while decided:
                facts = plan.fold(decided)
                if not passed:
                    cause = next((f for f in reversed(facts) if rules.reschedules(f)), cause)
                decided = [r for fact in facts for r in rules.react(self.state, self.keys, fact)]
            if cause is not None:
                owed = (index, cause)
                if command:
                    settle()
            if len(plan.appends) > before:
                plan.dedupe(f"{SCHEDULER_GROUP}:{delivery.message.id}", index)
        settle()
        return plan

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
                await self._commit_batch(deliveries)
                await self.save_snapshot_when_due()
            return 0
        except UndecidedBatch:
            if len(deliveries) <= 1:
                return len(deliveries)
        return sum([await self.handle_batch([delivery], []) for delivery in deliveries])

    def overlaps(self, deliveries: Sequence[Delivery]) -> bool:
        """Whether a read may be decided before the commit in flight is settled."""
        return (
            not self.snapshot_due
            and self.unsaved < snapshot.SNAPSHOT_EVERY
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
            return self.plan(deliveries)
        except Exception as exc:
            self.state.rollback()
            log.exception("deciding failed; entries left pending", entries=[d.entry_id for d in deliveries])
            raise UndecidedBatch from exc

    async def _pipeline(self, deliveries: list[Delivery]) -> None:
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
            touched=touched(plan, deliveries),
        )
        if not await self.settle(later=True):
            # The read before was decided again; so is this one, on the state that left.
            self.unacked = owed[len(deliveries) :] + self.unacked
            await self._commit_batch(self.drop_own(deliveries))
            return
        expect_last = self.state.committed_position if plan.appends else None
        result = asyncio.ensure_future(self.bus.run_commit(prepared, expect_last))
        self.inflight = InFlight(deliveries, plan, owed, result)

    async def settle(self, *, later: bool = False) -> bool:
        """Wait for the commit in flight and keep its decisions, under the ids they got. If it
        did not land as planned, take back (with ``later``: the read decided after it first)
        and decide it again alone; returns False then."""
        inflight, self.inflight = self.inflight, None
        if inflight is None:
            return True
        try:
            result = await inflight.result
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
            await self._commit_batch(inflight.deliveries, behind=True)
        return False

    async def flush_acks(self) -> None:
        await self.settle()
        if self.unacked:
            await self.bus.commit([], acks=self.unacked, fence_token=self.token)
            self.unacked = []
        await self.save_snapshot_when_due()

    async def save_snapshot_when_due(self) -> None:
        """Snapshots hold committed facts only: taken when no decision is in flight. A child
        process writes it (a state of 60,000 jobs takes over a second to serialize), while this
        one goes on deciding."""
        due = self.snapshot_due or self.unsaved >= snapshot.SNAPSHOT_EVERY
        if self.state.savepoints or self.snapshotting is not None or not due:
            return
        pid = snapshot.save_in_child(self.settings.resolved_redis_url, self.keys.snapshot, self.keys.events, self.state)
        self.unsaved = 0
        asked, self.snapshot_due = self.snapshot_due, False
        self.snapshotting = asyncio.ensure_future(self._snapshot_written(pid, asked))

    async def _snapshot_written(self, pid: int, asked: bool) -> None:
        try:
            if not await snapshot.child_saved(pid):
                log.warning("snapshot not saved; the log is kept from the previous one", pid=pid)
        finally:
            self.snapshotting = None
            if asked:  # the retention task trims only up to the stored snapshot, saved or not
                self.snapshot_saved.set()
                self.snapshot_saved = anyio.Event()

    async def _commit_batch(self, deliveries: list[Delivery], *, behind: bool = False) -> None:
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
                await self._commit_batch(rest[:half], behind=True)
                await self._commit_batch(rest[half:], behind=True)
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
                    touched=touched(plan, deliveries),
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
        now_ms = (datetime.now(UTC) - self.redis_clock_behind).timestamp() * 1000
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
            self.unsaved += len(result.passed)
        else:
            self.state.release(dict(zip(plan.stand_ins, ids, strict=True)))
        if not result.skipped:  # they will be read back: acknowledged unread then
            self.own.extend(ids)
        self.unsaved += len(plan.stand_ins)

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
            decisions = self._pass(cause)
            if not decisions:
                return
            result = await self.bus.commit(decisions, fence_token=self.token, expect_last=self.state.position)
            if result.status != CommitStatus.CONFLICT:
                return

    async def stand_by(self) -> int:
        """Keep the state folded up to the end of the log while another scheduler leads, so that
        taking over folds only what was appended since the last look; returns how many entries
        were folded now."""
        cold = not self.warm
        if cold:
            self.state = await snapshot.load(self.bus)
            self.warm = True
        folded = await catch_up(self.bus, self.state)
        if cold:
            settle_heap()  # what was folded lives on: collected once, then left alone
        return folded

    async def lead(self, reader: aioredis.Redis) -> None:
        """Run as the leader until the lease is lost."""
        if not self.warm:
            self.state = await snapshot.load(self.bus)
        self.warm = False  # a leader's state holds decisions in flight: rebuilt once it stands by
        self.own.clear()
        self.unacked = []
        self.inflight = None
        folded = await self.catch_up()
        settle_heap()
        self.hear_anew(datetime.now(UTC))
        await self.read_clocks()
        await self.recall_runners(datetime.now(UTC))
        log.info("leading", token=self.token, position=self.state.position, jobs=len(self.state.jobs), folded=folded)
        consumer = GroupConsumer(
            self.bus,
            reader,
            [self.keys.commands, self.keys.events, self.keys.telemetry],
            SCHEDULER_GROUP,
            CONSUMER,
            None,
            block_ms=1000,
            count=READ_COUNT,
            counts={self.keys.telemetry: TELEMETRY_READ_COUNT},
            claim_idle_ms=self.settings.claim_idle_ms,
            max_deliveries=self.settings.max_deliveries,
            batch=self.handle_batch,
            skip=self.is_own,
            on_idle=self.flush_acks,
        )
        await consumer.setup()
        await self.apply_settings()
        await self.commit_pass()
        try:
            await consumer.run()
        finally:
            if self.inflight is not None:  # its outcome is read from the log by the next leader
                self.inflight.result.cancel()
                self.inflight = None

    async def apply_settings(self) -> None:
        """Put the pool's settings that the log folds (the QUOTAS table, the usage half-life) in
        the log when they differ from what it holds: decided like any other command."""
        commands: list[m.Message] = []
        if self.settings.fair_share_half_life_s != self.state.half_life_s:
            commands.append(m.SetHalfLife(half_life_s=self.settings.fair_share_half_life_s, actor="config"))
        configured = self.settings.configured_quotas
        if configured is not None and configured != self.state.config_quotas:
            commands.append(m.SetQuotas(quotas=configured, from_config=True, actor="config"))
        for command in commands:
            await self.bus.send(self.keys.commands, command)

    async def retain(self) -> None:
        """Apply the log's retention policy now and then: archive, then trim. The snapshot is
        saved first, so that nothing a restarting reader needs is trimmed."""
        while True:
            await anyio.sleep(self.settings.retention_interval_s)
            # Saved by the consumer loop, between decisions (none in flight), at the latest
            # when the streams next fall quiet (a blocking read's timeout).
            saved = self.snapshot_saved
            self.snapshot_due = True
            await saved.wait()
            done = await audit.archive_and_trim(
                self.bus,
                max_age_s=self.settings.audit_max_age_s,
                max_entries=self.settings.audit_max_entries,
                now_ms=int(time.time() * 1000),
            )
            if done.entries or done.held_back:
                log.info(
                    "log archived",
                    entries=done.entries,
                    files=[str(f) for f in done.files],
                    kept_from=done.kept_from,
                    held_back=done.held_back,
                )


async def _renew(redis: aioredis.Redis, settings: Settings, scheduler: Scheduler) -> None:
    renew = redis.register_script(_RENEW_LUA)
    while True:
        await anyio.sleep(settings.leader_lease_ms / 3000)
        if not await renew(keys=[settings.keys.leader], args=[settings.instance, settings.leader_lease_ms]):
            raise LostLeadership
        await scheduler.read_clocks()


@dataclass(frozen=True)
class Lease:
    token: int | None  # the next fencing token, if this instance holds the lease now
    left_ms: int  # otherwise: how long the holder's lease has left


async def take_lease(
    redis: aioredis.Redis, keys: Keys, instance: str, lease_ms: int, *, replicas: int = 0, timeout_ms: int = 0
) -> Lease:
    """The lease (taken, or still this instance's own) with the next fencing token, or how long
    the instance holding it has left. With ``replicas``, a token counts only once that many
    replicas hold it: a failover to one of them cannot hand the same token to a second leader
    (nor can a master cut off from its replicas hand out one of its own)."""
    if not replicas:
        token, left_ms = await redis.eval(_ACQUIRE_LUA, 2, keys.leader, keys.fence, instance, lease_ms)
        return Lease(int(token) or None, int(left_ms))
    async with redis.pipeline(transaction=False) as pipe:  # WAIT: on the script's connection
        pipe.eval(_ACQUIRE_LUA, 2, keys.leader, keys.fence, instance, lease_ms)
        pipe.wait(replicas, timeout_ms)
        (token, left_ms), confirmed = await pipe.execute()
    if int(token) and confirmed < replicas:
        log.warning("the lease is not on enough replicas; not leading yet", replicas=replicas, confirmed=confirmed)
        return Lease(None, lease_ms)  # looked at again a third of a lease from now
    return Lease(int(token) or None, int(left_ms))


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    scheduler = Scheduler(settings, bus)
    reader = connect(settings.resolved_redis_url, block_ms=1000)
    try:
        while True:
            lease = await take_lease(
                redis,
                settings.keys,
                settings.instance,
                settings.leader_lease_ms,
                replicas=settings.wait_replicas,
                timeout_ms=settings.redis_wait_timeout_ms,
            )
            if lease.token is None:
                # Standby: keep the state folded, and look again when the holder's lease runs out
                # (unless renewed), at the latest a third of a lease from now.
                await scheduler.stand_by()
                await anyio.sleep(min(max(lease.left_ms, 0) + 5, settings.leader_lease_ms / 3) / 1000)
                continue
            scheduler.token = str(lease.token)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_renew, redis, settings, scheduler)
                    if settings.retention:
                        tg.start_soon(scheduler.retain)
                    await scheduler.lead(reader)
            except* (LostLeadership, Fenced):
                log.warning("lost the leadership; standing by")
    finally:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
            with contextlib.suppress(*REDIS_LOST):  # then the lease simply expires
                await redis.eval(_RELEASE_LUA, 1, settings.keys.leader, settings.instance)
