"""Each process's own Prometheus metrics (prometheus-client), carried to the gateway in its
`service.heartbeat`: the gateway's `/metrics` serves them beside the cluster's, labelled with the
process's `service` and `instance`. One scrape target for the whole system, wherever its processes
run, behind the gateway's access control; a process that stops beating drops out of the scrape.

Names follow Prometheus conventions: `swift_trainer_` prefix, base units (seconds, bytes), `_total`
for counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

from events.messages import MetricFamily, MetricSample

# Every process's: CPU seconds, resident memory, open files. Then one registry per service for what
# its own code counts (a heartbeat carries its service's only).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(namespace="swift_trainer", registry=REGISTRY)
SCHEDULER = CollectorRegistry(auto_describe=True)
RUNNER = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The scheduler
DECISION_SECONDS = Histogram(
    "swift_trainer_scheduler_decision_seconds",
    "From a command's entry in the commands stream to the commit of the scheduler's decision on it",
    buckets=_LATENCY_BUCKETS,
    registry=SCHEDULER,
)
COMMITS = Counter(
    "swift_trainer_scheduler_commits",
    "Commits of decided reads, by how they ended (ok; conflict and some_duplicate are decided again)",
    ["status"],
    registry=SCHEDULER,
)

# The runner
RUNS_STARTED = Counter("swift_trainer_runner_runs_started", "Job attempts (ranks) the runner started", registry=RUNNER)
RUNS_ENDED = Counter(
    "swift_trainer_runner_runs_ended",
    "Job attempts (ranks) the runner saw end, by outcome (the fact it reported)",
    ["outcome"],
    registry=RUNNER,
)
SUPERVISED = Gauge("swift_trainer_runner_supervised_runs", "Job attempts the runner supervises now", registry=RUNNER)
PUMP_SECONDS = Histogram(
    "swift_trainer_runner_pump_seconds",
    "Time to store a run's new output lines, progress and checkpoints (one pump)",
    buckets=_LATENCY_BUCKETS,
    registry=RUNNER,
)
_OWN = {"scheduler": SCHEDULER, "runner": RUNNER}


def snapshot(service: str) -> list[MetricFamily]:
    """This process's metrics as they are now, for its heartbeat."""
    families = []
    own = _OWN.get(service)
    for family in [*REGISTRY.collect(), *(own.collect() if own is not None else ())]:
        samples = [MetricSample(name=s.name, labels=dict(s.labels), value=s.value) for s in family.samples]
        if samples:
            families.append(
                MetricFamily(name=family.name, type=family.type, help=family.documentation, samples=samples)
            )
    return families
