"""`GET /metrics`: the cluster in Prometheus's text format, worked out at each scrape from the
gateway's projection of the log and the latest heartbeats, plus every live process's own metrics
(carried in its `service.heartbeat`, labelled with its `service` and `instance`).

With access control on, an admin's key or a key of the ``metrics`` role (which reads nothing else)
is needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events.messages import MetricFamily
from events.params import TaskType
from events.records import TERMINAL, JobStatus, gpu_key
from events.state import State
from services.config import Settings
from services.gateway.auth import Principal
from services.gateway.catalog import consumer_groups
from services.gateway.errors import ApiError
from services.gateway.gpus import node_state
from services.gateway.projection import Projection

PREFIX = "swift_trainer"
# Seconds: from a second to a day (waits and runs of fine-tuning jobs)
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0, 259200.0)


def _histogram(
    name: str, doc: str, labels: list[str], groups: dict[tuple[str, ...], list[float]], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, values in sorted(groups.items()):
        buckets = [(repr(bound), sum(1 for v in values if v <= bound)) for bound in bounds]
        buckets.append(("+Inf", len(values)))
        family.add_metric(list(key), buckets, sum_value=sum(values))
    return family


class Cluster(Collector):
    """The cluster as the log and the heartbeats say, at the moment of the scrape."""

    def __init__(self, projection: Projection, settings: Settings, redis_facts: dict[str, Any]) -> None:
        self.projection, self.settings, self.redis_facts = projection, settings, redis_facts

    def collect(self) -> Iterator[Metric]:
        state: State = self.projection.state
        yield from self._jobs(state)
        yield from self._nodes(state)
        yield from self._streams()
        clients = GaugeMetricFamily(f"{PREFIX}_sse_clients", "Server-sent event streams the gateway serves now")
        clients.add_metric([], len(self.projection.subscribers) + len(self.projection.log_subscribers))
        yield clients

    def _jobs(self, state: State) -> Iterator[Metric]:
        counts = Counter((job.status.value, job.spec.task_type.value) for job in state.jobs.values())
        jobs = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Jobs by status and task type (deleted ones left out)", labels=["status", "task_type"]
        )
        for status in JobStatus:
            for task_type in TaskType:
                jobs.add_metric([status.value, task_type.value], counts.get((status.value, task_type.value), 0))
        yield jobs
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Queued jobs by priority", labels=["priority"])
        by_priority = Counter(job.priority for job in state.queue_iter())
        for priority in range(11):
            depth.add_metric([str(priority)], by_priority.get(priority, 0))
        yield depth
        waits: dict[tuple[str, ...], list[float]] = {}
        durations: dict[tuple[str, ...], list[float]] = {}
        for job in state.jobs.values():
            kind = job.spec.task_type.value
            if job.started_at is not None:
                waits.setdefault((kind,), []).append(max(0.0, (job.started_at - job.submitted_at).total_seconds()))
            if job.status in TERMINAL and job.started_at is not None and job.finished_at is not None:
                ran = max(0.0, (job.finished_at - job.started_at).total_seconds())
                durations.setdefault((kind, job.status.value), []).append(ran)
        yield _histogram(
            f"{PREFIX}_job_wait_seconds",
            "From submit to the first start, of the jobs that started",
            ["task_type"],
            waits,
            WAIT_BUCKETS,
        )
        yield _histogram(
            f"{PREFIX}_job_duration_seconds",
            "From start to end, of the jobs that ended after starting",
            ["task_type", "status"],
            durations,
            DURATION_BUCKETS,
        )

    def _nodes(self, state: State) -> Iterator[Metric]:
        now = datetime.now(UTC) - self.projection.redis_clock_behind
        timeout_s = self.settings.heartbeat_interval_s * 5
        states = GaugeMetricFamily(
            f"{PREFIX}_node_state", "1 for each node's state (up, silent, degraded, lost)", labels=["node", "state"]
        )
        names = ["memory_used_bytes", "memory_total_bytes", "utilization_ratio", "temperature_celsius"]
        docs = {
            "memory_used_bytes": "GPU memory in use, as the node's last heartbeat read it",
            "memory_total_bytes": "GPU memory",
            "utilization_ratio": "GPU utilisation, 0 to 1",
            "temperature_celsius": "GPU temperature",
        }
        gauges = {n: GaugeMetricFamily(f"{PREFIX}_gpu_{n}", docs[n], labels=["node", "gpu", "name"]) for n in names}
        held = GaugeMetricFamily(f"{PREFIX}_gpu_held", "1 where a job holds the GPU", labels=["node", "gpu"])
        for name, node in sorted(state.nodes.items()):
            beat = self.projection.heartbeats.get(name)
            current = node_state(node.up, beat, now, timeout_s)
            for each in ("up", "silent", "degraded", "lost"):
                states.add_metric([name, each], 1.0 if each == current else 0.0)
            samples = {gpu.index: gpu for gpu in beat.gpus} if beat is not None else {}
            for gpu in node.gpus:
                labels = [name, str(gpu.index), gpu.name]
                held.add_metric(labels[:2], 1.0 if gpu_key(name, gpu.index) in state.allocations else 0.0)
                gauges["memory_total_bytes"].add_metric(labels, gpu.memory_total_mb * 2**20)
                sample = samples.get(gpu.index)
                if sample is None:
                    continue
                gauges["memory_used_bytes"].add_metric(labels, sample.memory_used_mb * 2**20)
                if sample.utilization_pct is not None:
                    gauges["utilization_ratio"].add_metric(labels, sample.utilization_pct / 100)
                if sample.temperature_c is not None:
                    gauges["temperature_celsius"].add_metric(labels, sample.temperature_c)
        yield states
        yield held
        yield from gauges.values()

    def _streams(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            f"{PREFIX}_consumer_group_pending",
            "Entries delivered to a group, not yet acknowledged",
            labels=["stream", "group"],
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_consumer_group_lag",
            "Entries of a stream a group has yet to be delivered",
            labels=["stream", "group"],
        )
        for group in self.redis_facts["groups"]:
            labels = [group["stream"], group["group"]]
            pending.add_metric(labels, group["pending"])
            if group["lag"] is not None:
                lag.add_metric(labels, group["lag"])
        yield pending
        yield lag
        dead = GaugeMetricFamily(f"{PREFIX}_dead_letters", "Entries in the dead-letter stream")
        dead.add_metric([], self.redis_facts["dead"])
        yield dead


class Processes(Collector):
    """Every live process's own metrics, from its latest heartbeat."""

    def __init__(self, projection: Projection) -> None:
        self.projection = projection

    def collect(self) -> Iterator[Metric]:
        now = datetime.now(UTC)
        merged: dict[str, Metric] = {}
        for (service, instance), beat in sorted(self.projection.services.items()):
            if now - beat.at > timedelta(seconds=max(3 * beat.interval_s, 5)):
                continue  # gone: its last numbers would only mislead
            for family in beat.metrics:
                metric = merged.get(family.name) or merged.setdefault(family.name, _metric(family))
                for sample in family.samples:
                    metric.add_sample(
                        sample.name, {**sample.labels, "service": service, "instance": instance}, sample.value
                    )
        yield from merged.values()


def _metric(family: MetricFamily) -> Metric:
    return Metric(family.name, family.help, family.type)


def _allowed(request: Request) -> None:
    user = request.user
    if not request.app.state.auth.enabled:
        return
    if not isinstance(user, Principal) or not user.is_authenticated:
        raise ApiError(401, "unauthorized", "an API key is required (an admin's, or one of the metrics role)")
    if user.role not in ("admin", "metrics"):
        raise ApiError(403, "forbidden", "this needs an admin's key or one of the metrics role")


async def metrics(request: Request) -> Response:
    _allowed(request)
    projection: Projection = request.app.state.projection
    bus = request.app.state.bus
    facts = {"groups": await consumer_groups(bus, projection.state), "dead": await bus.redis.xlen(bus.keys.dead_letter)}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Cluster(projection, request.app.state.settings, facts))
    registry.register(Processes(projection))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def routes() -> Iterable[Route]:
    # (Prometheus text, documented in the README, not in the JSON API's OpenAPI document)
    return [Route("/metrics", metrics, methods=["GET"], include_in_schema=False)]
