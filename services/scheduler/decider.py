"""Deciding a read: each delivery's decisions, folded into the state before the next is decided.

The rules (:mod:`services.scheduler.rules`) say what one message decides; this module walks a
whole read through them, in the log's order, under stand-in ids for the facts until the commit
gives them their place (:mod:`services.scheduler.committer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from events import messages as m
from events.bus import Append
from events.consumer import Delivery
from events.keys import SCHEDULER_GROUP, Keys
from events.state import State
from services.scheduler import rules
from services.scheduler.liveness import Liveness

log = structlog.get_logger("scheduler")


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

    def touched(self, deliveries: Sequence[Delivery]) -> set[str]:
        """The jobs a read's decisions are about: those of its entries and of what it decided."""
        messages = [item.message for item in self.appends] + [d.message for d in deliveries]
        return {message.job_id for message in messages if message.job_id}


class Decider:
    """The state folded from the log, who is heard, and what each delivery decides."""

    def __init__(self, keys: Keys, limits: rules.Limits, liveness: Liveness) -> None:
        self.keys = keys
        self.limits = limits
        self.liveness = liveness
        self.state = State()
        self.idle_since: dict[str, datetime] = {}  # job id -> since when its GPUs all read idle
        self.plans = 0  # reads decided so far

    def schedule(self, cause: m.Message, now: datetime | None = None) -> list[Append]:
        """A scheduling pass: every queued job that fits is placed."""
        now = now or datetime.now(UTC)
        return rules.schedule(self.state, self.keys, self.liveness.heartbeats, self.limits, now, cause)

    def decide(self, delivery: Delivery, now: datetime) -> tuple[list[Append], m.Message | None]:
        """What a delivery decides directly, and the cause of the scheduling pass it calls for
        (None: no pass, or one is part of the decision already)."""
        if delivery.stream == self.keys.telemetry:
            return self.decide_telemetry(delivery, now)
        message = delivery.message
        if isinstance(message, m.SubmitJob):  # placed at once when it fits: the pass is included
            return rules.submit(self.state, self.keys, message, self.liveness.heartbeats, self.limits, now), None
        if isinstance(message, m.RequestExport):
            job = self.state.jobs.get(message.job_id or "")
            return (rules.export(self.state, self.keys, job, message) if job else []), None
        command = _COMMANDS.get(type(message))
        if command is not None:
            return command(self.state, self.keys, message), None
        if isinstance(message, m.ProcessQueue):
            return [], message
        if delivery.stream == self.keys.events:
            return rules.react(self.state, self.keys, message), message if rules.reschedules(message) else None
        return [], None

    def decide_telemetry(self, delivery: Delivery, now: datetime) -> tuple[list[Append], m.Message | None]:
        """Heartbeats arrive every few seconds (this scheduler's own among them): the clock by
        which silent nodes and runners are found, and the readings placement goes by."""
        liveness, state, limits = self.liveness, self.state, self.limits
        message, stale = liveness.hear(delivery.entry_id, delivery.message, now)
        due = liveness.due(now)
        lost = rules.lost_nodes(state, liveness.last_heard, limits, now) if due else []
        if lost:
            log.warning("node lost", node=lost[0])
            return rules.lose_node(state, self.keys, lost[0], message), None
        orphaned = rules.lost_runners(state, liveness.runner_heard, liveness.last_heard, limits, now) if due else []
        if orphaned:
            log.warning("runner lost; its node takes no jobs until it is back", node=orphaned[0])
            return rules.lose_node(state, self.keys, orphaned[0], message, m.NodeLossReason.RUNNER_LOST), None
        if due:
            liveness.looked_for_lost = now  # (one found is looked for again at the next entry)
        if not isinstance(message, m.NodeHeartbeat) or stale:
            return [], None  # (a heartbeat older than one taken in says nothing new)
        if rules.runner_silent(message.node, liveness.runner_heard, limits, now):
            return [], None  # the node rejoins once its runner is heard again
        joined = rules.node_changes(state, message)
        if joined:
            return [Append(self.keys.events, fact) for fact in joined], None
        idle = rules.reclaim_idle(state, self.keys, message, liveness.heartbeats, self.idle_since, limits, now)
        return idle, None if idle else message

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
                plan.fold(self.schedule(cause, now))
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


# Commands decided by a rule of the state, the keys and the command alone.
_COMMANDS: dict[type[m.Message], rules.CommandRule] = {
    m.CancelJob: rules.cancel,
    m.SetPriority: rules.set_priority,
    m.DeleteJob: rules.delete,
    m.ReleaseJob: rules.release,
    m.SuspendJob: rules.suspend,
    m.ResumeJob: rules.resume,
    m.CreateSweep: rules.create_sweep,
    m.CancelSweep: rules.cancel_sweep,
    m.SetQuotas: rules.set_quotas,
    m.SetHalfLife: rules.set_half_life,
}
