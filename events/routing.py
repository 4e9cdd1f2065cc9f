"""Where each message travels: its stream, the processes that append it, the processes that read it.

Declared once, in :data:`ROUTES`; ``tests/test_routing.py`` reads the services' source and fails
when the code and this table disagree (a type appended to another stream, a producer or consumer
missing or extra, a message class without its row).

A stream is named as :class:`events.keys.Keys` names it: ``commands``, ``events`` (the log),
``telemetry``, ``exports``, and ``node`` (one stream per node, ``keys.node(<name>)``, read by that
node's runner). A process is a service as ``swift-trainer`` names it.

Every reader of the log folds each event into :class:`events.state.State`: the scheduler (its
decisions; it also reacts to some events, see the notes), the gateway (its projection and live
streams), the notifier (job records for the webhooks' bodies; it delivers the events webhooks ask
for, and leaves job.progress and job.checkpoint_saved unread), and ``swift-trainer replay``.

The table, as :func:`render` prints it (``python -m events.routing``):

=======================  =========  ===========  ==================  ============================
type                     kind       stream       produced by         consumed by
=======================  =========  ===========  ==================  ============================
job.submit               command    commands     gateway             scheduler, gateway
    the gateway shows the job as pending until its job.accepted
job.cancel               command    commands     gateway             scheduler
job.export               command    commands     gateway             scheduler
job.set_priority         command    commands     gateway             scheduler
job.delete               command    commands     gateway             scheduler
job.release              command    commands     gateway             scheduler
job.suspend              command    commands     gateway             scheduler
job.resume               command    commands     gateway             scheduler
quotas.set               command    commands     scheduler, gateway  scheduler
    the scheduler's own at start, from its QUOTAS setting
usage.set_half_life      command    commands     scheduler           scheduler
    at start, from FAIR_SHARE_HALF_LIFE_S
queue.process            command    commands     gateway             scheduler
sweep.create             command    commands     gateway             scheduler
    appended with a job.submit per point of the grid
sweep.cancel             command    commands     gateway             scheduler
job.start                command    node:<name>  scheduler           runner
    one per rank, to the runner of the rank's node
job.stop                 command    node:<name>  scheduler           runner
export.start             command    exports      scheduler           exporter
job.accepted             event      events       scheduler           scheduler, gateway, notifier
job.rejected             event      events       scheduler           scheduler, gateway, notifier
job.queued               event      events       scheduler           scheduler, gateway, notifier
job.scheduled            event      events       scheduler           scheduler, gateway, notifier
job.cancel_requested     event      events       scheduler           scheduler, gateway, notifier
job.priority_changed     event      events       scheduler           scheduler, gateway, notifier
job.requeued             event      events       scheduler           scheduler, gateway, notifier
    an attempt lost with its node or runner; run again
job.deleted              event      events       scheduler           scheduler, gateway, notifier
job.held                 event      events       scheduler           scheduler, gateway, notifier
job.waiting              event      events       scheduler           scheduler, gateway, notifier
    submitted with depends_on, or a deploy of a job not yet exported
sweep.created            event      events       scheduler           scheduler, gateway, notifier
job.dependencies_met     event      events       scheduler           scheduler, gateway, notifier
job.preempted            event      events       scheduler           scheduler, gateway, notifier
job.suspended            event      events       scheduler           scheduler, gateway, notifier
job.resumed              event      events       scheduler           scheduler, gateway, notifier
quotas.changed           event      events       scheduler           scheduler, gateway, notifier
    from QUOTAS at start, or an admin's quotas.set
usage.half_life_changed  event      events       scheduler           scheduler, gateway, notifier
    FAIR_SHARE_HALF_LIFE_S differs from the log's
job.cancelled            event      events       scheduler, runner   scheduler, gateway, notifier
    the scheduler's: of a job not running
export.requested         event      events       scheduler           scheduler, gateway, notifier
    with an export.start to the exporter
node.joined              event      events       scheduler           scheduler, gateway, notifier
    from a heartbeat of a new or changed node
node.lost                event      events       scheduler           scheduler, gateway, notifier
job.started              event      events       runner              scheduler, gateway, notifier
job.progress             event      events       runner              scheduler, gateway
job.checkpoint_saved     event      events       runner              scheduler, gateway
job.serving              event      events       runner              scheduler, gateway, notifier
job.stopped              event      events       scheduler, runner   scheduler, gateway, notifier
    the scheduler's: an attempt being stopped whose end no runner will report
job.succeeded            event      events       runner              scheduler, gateway, notifier
    the scheduler exports a LoRA job with auto_export
job.failed               event      events       scheduler, runner   scheduler, gateway, notifier
    the scheduler's: retries used up after a lost node or runner, or dependencies failed; it
    stops a gang job's other ranks when rank 0 fails by itself
job.lost                 event      events       runner              scheduler, gateway, notifier
    ended while no runner watched it: the scheduler retries or fails the job
job.rank_ended           event      events       runner              scheduler, gateway, notifier
    a failed rank makes the scheduler stop every rank, then retry or fail the job
notification.delivered   event      events       notifier            scheduler, gateway, notifier
notification.failed      event      events       notifier            scheduler, gateway, notifier
export.started           event      events       exporter            scheduler, gateway, notifier
export.completed         event      events       exporter            scheduler, gateway, notifier
export.failed            event      events       exporter            scheduler, gateway, notifier
node.heartbeat           telemetry  telemetry    gpu-monitor         scheduler, gateway
service.heartbeat        telemetry  telemetry    every service       scheduler, gateway
    the scheduler: a runner's is its node's liveness; the gateway: /services and /metrics
=======================  =========  ===========  ==================  ============================
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from events.keys import Keys
from events.messages import Command, Event, Message, Telemetry, message_types

GATEWAY = "gateway"
SCHEDULER = "scheduler"
GPU_MONITOR = "gpu-monitor"
RUNNER = "runner"
EXPORTER = "exporter"
NOTIFIER = "notifier"
SERVICES = frozenset({GATEWAY, SCHEDULER, GPU_MONITOR, RUNNER, EXPORTER, NOTIFIER})


class Stream(StrEnum):
    """A stream by its :class:`events.keys.Keys` name."""

    COMMANDS = "commands"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    EXPORTS = "exports"
    NODE = "node"  # one per node

    def key(self, keys: Keys, node: str = "<name>") -> str:
        """The stream's Redis key (a node's, for ``node``)."""
        return keys.node(node) if self is Stream.NODE else str(getattr(keys, self.value))

    @property
    def kind(self) -> type[Message]:
        """What it carries: commands, facts or telemetry."""
        return Event if self is Stream.EVENTS else Telemetry if self is Stream.TELEMETRY else Command


@dataclass(frozen=True)
class Route:
    stream: Stream
    producers: frozenset[str]  # the services that append it
    consumers: frozenset[str]  # the services that read it from the stream and act on it
    note: str = ""

    def __post_init__(self) -> None:
        unknown = (self.producers | self.consumers) - SERVICES
        if unknown:
            raise ValueError(f"not a service: {sorted(unknown)}")


def _route(stream: Stream, by: str, to: str, note: str = "") -> Route:
    """A row; ``by`` and ``to`` name services, separated by spaces."""
    return Route(stream, frozenset(by.split()), frozenset(to.split()), note)


_CMD, _EVT, _TEL = Stream.COMMANDS, Stream.EVENTS, Stream.TELEMETRY
_LOG = f"{SCHEDULER} {GATEWAY} {NOTIFIER}"  # the log's readers
_EVERY = " ".join(sorted(SERVICES))

ROUTES: Mapping[str, Route] = MappingProxyType(
    {
        # Commands for the scheduler
        "job.submit": _route(
            _CMD, GATEWAY, f"{SCHEDULER} {GATEWAY}", "the gateway shows the job as pending until its job.accepted"
        ),
        "job.cancel": _route(_CMD, GATEWAY, SCHEDULER),
        "job.export": _route(_CMD, GATEWAY, SCHEDULER),
        "job.set_priority": _route(_CMD, GATEWAY, SCHEDULER),
        "job.delete": _route(_CMD, GATEWAY, SCHEDULER),
        "job.release": _route(_CMD, GATEWAY, SCHEDULER),
        "job.suspend": _route(_CMD, GATEWAY, SCHEDULER),
        "job.resume": _route(_CMD, GATEWAY, SCHEDULER),
        "quotas.set": _route(
            _CMD, f"{GATEWAY} {SCHEDULER}", SCHEDULER, "the scheduler's own at start, from its QUOTAS setting"
        ),
        "usage.set_half_life": _route(_CMD, SCHEDULER, SCHEDULER, "at start, from FAIR_SHARE_HALF_LIFE_S"),
        "queue.process": _route(_CMD, GATEWAY, SCHEDULER),
        "sweep.create": _route(_CMD, GATEWAY, SCHEDULER, "appended with a job.submit per point of the grid"),
        "sweep.cancel": _route(_CMD, GATEWAY, SCHEDULER),
        # Commands from the scheduler to the runners and the exporter
        "job.start": _route(Stream.NODE, SCHEDULER, RUNNER, "one per rank, to the runner of the rank's node"),
        "job.stop": _route(Stream.NODE, SCHEDULER, RUNNER),
        "export.start": _route(Stream.EXPORTS, SCHEDULER, EXPORTER),
        # Facts of the scheduler
        "job.accepted": _route(_EVT, SCHEDULER, _LOG),
        "job.rejected": _route(_EVT, SCHEDULER, _LOG),
        "job.queued": _route(_EVT, SCHEDULER, _LOG),
        "job.scheduled": _route(_EVT, SCHEDULER, _LOG),
        "job.cancel_requested": _route(_EVT, SCHEDULER, _LOG),
        "job.priority_changed": _route(_EVT, SCHEDULER, _LOG),
        "job.requeued": _route(_EVT, SCHEDULER, _LOG, "an attempt lost with its node or runner; run again"),
        "job.deleted": _route(_EVT, SCHEDULER, _LOG),
        "job.held": _route(_EVT, SCHEDULER, _LOG),
        "job.waiting": _route(
            _EVT, SCHEDULER, _LOG, "submitted with depends_on, or a deploy of a job not yet exported"
        ),
        "sweep.created": _route(_EVT, SCHEDULER, _LOG),
        "job.dependencies_met": _route(_EVT, SCHEDULER, _LOG),
        "job.preempted": _route(_EVT, SCHEDULER, _LOG),
        "job.suspended": _route(_EVT, SCHEDULER, _LOG),
        "job.resumed": _route(_EVT, SCHEDULER, _LOG),
        "quotas.changed": _route(_EVT, SCHEDULER, _LOG, "from QUOTAS at start, or an admin's quotas.set"),
        "usage.half_life_changed": _route(_EVT, SCHEDULER, _LOG, "FAIR_SHARE_HALF_LIFE_S differs from the log's"),
        "job.cancelled": _route(_EVT, f"{SCHEDULER} {RUNNER}", _LOG, "the scheduler's: of a job not running"),
        "export.requested": _route(_EVT, SCHEDULER, _LOG, "with an export.start to the exporter"),
        "node.joined": _route(_EVT, SCHEDULER, _LOG, "from a heartbeat of a new or changed node"),
        "node.lost": _route(_EVT, SCHEDULER, _LOG),
        # Facts of the runners
        "job.started": _route(_EVT, RUNNER, _LOG),
        "job.progress": _route(_EVT, RUNNER, f"{SCHEDULER} {GATEWAY}"),
        "job.checkpoint_saved": _route(_EVT, RUNNER, f"{SCHEDULER} {GATEWAY}"),
        "job.serving": _route(_EVT, RUNNER, _LOG),
        "job.stopped": _route(
            _EVT,
            f"{SCHEDULER} {RUNNER}",
            _LOG,
            "the scheduler's: an attempt being stopped whose end no runner will report",
        ),
        "job.succeeded": _route(_EVT, RUNNER, _LOG, "the scheduler exports a LoRA job with auto_export"),
        "job.failed": _route(
            _EVT,
            f"{SCHEDULER} {RUNNER}",
            _LOG,
            "the scheduler's: retries used up after a lost node or runner, or dependencies failed; it stops a "
            "gang job's other ranks when rank 0 fails by itself",
        ),
        "job.lost": _route(
            _EVT, RUNNER, _LOG, "ended while no runner watched it: the scheduler retries or fails the job"
        ),
        "job.rank_ended": _route(
            _EVT, RUNNER, _LOG, "a failed rank makes the scheduler stop every rank, then retry or fail the job"
        ),
        # Facts of the notifier and the exporter
        "notification.delivered": _route(_EVT, NOTIFIER, _LOG),
        "notification.failed": _route(_EVT, NOTIFIER, _LOG),
        "export.started": _route(_EVT, EXPORTER, _LOG),
        "export.completed": _route(_EVT, EXPORTER, _LOG),
        "export.failed": _route(_EVT, EXPORTER, _LOG),
        # Telemetry
        "node.heartbeat": _route(_TEL, GPU_MONITOR, f"{SCHEDULER} {GATEWAY}"),
        "service.heartbeat": _route(
            _TEL,
            _EVERY,
            f"{SCHEDULER} {GATEWAY}",
            "the scheduler: a runner's is its node's liveness; the gateway: /services and /metrics",
        ),
    }
)

# The order names are listed in when rendered
_ORDER = (SCHEDULER, GATEWAY, RUNNER, NOTIFIER, EXPORTER, GPU_MONITOR)
_WIDTHS = (23, 9, 11, 18, 28)


def _names(services: frozenset[str]) -> str:
    if services == SERVICES:
        return "every service"
    return ", ".join(name for name in _ORDER if name in services)


def render(routes: Mapping[str, Route] = ROUTES) -> str:
    """The table as text, one row per type, a note (if any) under its row."""
    kinds = {name: cls.kind for name, cls in message_types().items()}
    rule = "  ".join("=" * width for width in _WIDTHS)
    header = ("type", "kind", "stream", "produced by", "consumed by")
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, _WIDTHS, strict=True)).rstrip(), rule]
    for name, route in routes.items():
        stream = "node:<name>" if route.stream is Stream.NODE else route.stream.value
        cells = (name, kinds.get(name, "?"), stream, _names(route.producers), _names(route.consumers))
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, _WIDTHS, strict=True)).rstrip())
        if route.note:
            lines += textwrap.wrap(route.note, 96, initial_indent="    ", subsequent_indent="    ")
    lines.append(rule)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
