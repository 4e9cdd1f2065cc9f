"""Who is heard: each node's kept heartbeat, and when each node and its runner were last heard.

Pure bookkeeping on this scheduler's clock (no Redis): a heartbeat is aged by when it reached
Redis, so a node whose clock runs behind or ahead looks neither stale nor fresh; a spell in which
no one at all was heard (Redis refusing writes) is nobody's silence; and a GPU a job of ours just
left reads free until the node's next heartbeat shows it so.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import structlog
from pydantic_core import from_json

from events import messages as m
from events import placement
from events.bus import entry_id_key, entry_time
from events.records import GpuKey
from events.state import State

log = structlog.get_logger("scheduler")


class Liveness:
    def __init__(self, heartbeat_interval_s: float, node_timeout_s: float, foreign_memory_threshold_mb: int) -> None:
        self.interval = timedelta(seconds=heartbeat_interval_s)
        self.node_timeout_s = node_timeout_s
        self.threshold_mb = foreign_memory_threshold_mb
        self.heartbeats: dict[str, m.NodeHeartbeat] = {}  # node -> its newest heartbeat
        self.heartbeat_ids: dict[str, tuple[int, int]] = {}  # node -> entry id of its kept heartbeat
        self.last_heard: dict[str, datetime] = {}
        self.runner_heard: dict[str, datetime] = {}  # node -> when its runner was last heard
        # node -> GPU index -> the log's position when a job of ours was seen to leave it, until
        # a heartbeat of the node newer than that
        self.left: dict[str, dict[int, tuple[int, int]]] = {}
        self.telemetry_at: datetime | None = None  # arrival of the newest telemetry entry read
        self.looked_for_lost: datetime | None = None  # when silent nodes and runners were last looked for
        self.look_for_lost_every = self.interval / 4
        self.redis_clock_behind = timedelta(0)  # this scheduler's clock minus Redis's

    def hear(self, stream_entry_id: str, message: m.Message, now: datetime) -> tuple[m.Message, bool]:
        """Take in a telemetry entry: returns the message (a node's heartbeat aged by its arrival)
        and whether it is a heartbeat older than one already kept (delivered again after a
        restart: it says nothing new)."""
        self.credit_quiet(stream_entry_id, now)
        if isinstance(message, m.NodeHeartbeat):
            if not self.newest(message.node, stream_entry_id):
                return message, True
            # Aged by when it reached Redis (its entry id, on this scheduler's clock), one clock
            # for every node (and a backlog read after an outage must not look new)
            arrived = min(now, entry_time(stream_entry_id) + self.redis_clock_behind)
            message = message.model_copy(update={"at": arrived})
            self.heartbeats[message.node] = message
            self.read_without_left(message.node)
            self.last_heard[message.node] = now  # by this scheduler's clock: no skew between nodes
        elif isinstance(message, m.ServiceHeartbeat) and message.service == "runner" and message.node:
            self.runner_heard[message.node] = now
        return message, False

    def due(self, now: datetime) -> bool:
        """Whether silent nodes and runners are to be looked for now: a few times an interval, not
        at every entry (the walk over every node at every node's heartbeat grew with the square of
        the cluster)."""
        return self.looked_for_lost is None or now - self.looked_for_lost >= self.look_for_lost_every

    def note_left(self, state: State, held: Mapping[str, str]) -> None:
        """GPUs that jobs of ours held before the facts just folded and no longer hold: the
        runner reports a job's end once its processes are gone, so a node's reading taken
        before that shows memory the GPU no longer holds. Until the node's next heartbeat, its
        kept one is read without them (the GPUs are not taken for another's)."""
        position = entry_id_key(state.position)
        for key, job_id in held.items():
            if state.allocations.get(key) != job_id:
                gpu = GpuKey(key)
                self.left.setdefault(gpu.node, {})[gpu.gpu_index] = position
        for node in {GpuKey(key).node for key in held.keys() - state.allocations.keys()}:
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
            self.heartbeats[node] = placement.left_by_our_jobs(beat, since.keys(), self.threshold_mb)
        else:
            del self.left[node]

    def newest(self, node: str, entry_id: str) -> bool:
        """Whether a node's heartbeat is newer than the one kept (one delivered again, after a
        restart, comes late)."""
        key = entry_id_key(entry_id)
        if key < self.heartbeat_ids.get(node, (0, 0)):
            return False
        self.heartbeat_ids[node] = key
        return True

    def recall_runners(self, telemetry: Iterable[tuple[str, Mapping[str, str]]], now: datetime) -> None:
        """How long each node's runner had been silent while its gpu-monitor went on reporting,
        by the heartbeats the telemetry stream still holds (``telemetry``: its entries, newest
        first): a runner that died before this term is found as surely as one that dies in it.
        Silence while the monitor was silent too (a Redis outage, a dead node) does not count:
        only the gaps between the monitor's beats after the runner's last one, each shorter than
        half the node timeout, add up."""
        runners: dict[str, datetime] = {}  # node -> its runner's last beat
        monitored: dict[str, list[datetime]] = {}  # node -> its monitor's beats after that, newest first
        for entry_id, fields in telemetry:
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
                monitored.setdefault(node, []).append(entry_time(entry_id))
            elif runner:
                runners[node] = entry_time(entry_id)
        gap = timedelta(seconds=self.node_timeout_s / 2)
        for node, heard in runners.items():
            beats = [heard, *reversed(monitored.get(node, []))]
            silent = sum(
                (later - earlier for earlier, later in itertools.pairwise(beats) if later - earlier <= gap),
                timedelta(0),
            )
            self.runner_heard[node] = now - silent

    def hear_anew(self, state: State, now: datetime) -> None:
        """At the start of a term, every node up, and every runner heard in an earlier term, gets
        a full timeout from now: this scheduler has not heard anyone in this term yet."""
        self.last_heard = {name: now for name, node in state.nodes.items() if node.up}
        self.runner_heard = dict.fromkeys(self.runner_heard, now)
        self.telemetry_at = None

    def credit_quiet(self, entry_id: str, now: datetime) -> None:
        """A spell in which no one at all was heard (Redis refused every write while full, or
        stalled) is no one's silence: every node and runner is credited with it, so that Redis
        taking writes again does not read as lost nodes. Heartbeats of every process land every
        interval; a gap of more than two means nobody could write."""
        arrived = min(now, entry_time(entry_id) + self.redis_clock_behind)
        if self.telemetry_at is not None and arrived - self.telemetry_at > 2 * self.interval:
            quiet = arrived - self.telemetry_at - self.interval
            log.warning("no one was heard for a while; their silence does not count", quiet_s=quiet.total_seconds())
            self.last_heard = {node: heard + quiet for node, heard in self.last_heard.items()}
            self.runner_heard = {node: heard + quiet for node, heard in self.runner_heard.items()}
        self.telemetry_at = max(arrived, self.telemetry_at or arrived)
