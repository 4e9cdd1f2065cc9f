"""Every message the processes exchange: one envelope, one pydantic model per type, one union.

Which stream carries each type, which services append it and which read it: :mod:`events.routing`
(``ROUTES``, checked against the services' code by tests/test_routing.py; ``python -m
events.routing`` prints it as a table).

Facts are named in the past tense, commands in the imperative. A type's ``v`` is its schema version;
older versions are upcast on decode (see :mod:`events.codec`).

(One module though long: it is the language's catalogue, one small model per type, and the
union of every type must see them all.)
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal, TypedDict

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from events.params import ExtraValue, JobSpec, ModelHub
from events.quotas import Quotas

ENVELOPE_FIELDS = ("type", "v", "id", "at", "source", "causation_id", "job_id", "actor")


def new_id() -> str:
    """128 random bits, as 32 hex digits."""
    return os.urandom(16).hex()


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """The envelope. Subclasses add their payload fields and fix ``type``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str] = "message"
    type: str
    v: int = 1
    id: str = Field(default_factory=new_id)
    at: datetime = Field(default_factory=utcnow)
    source: str = ""
    causation_id: str | None = None
    job_id: str | None = None
    actor: str | None = None

    def payload(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude=set(ENVELOPE_FIELDS))


class Ids(TypedDict, total=False):
    """The envelope ids a decision carries over from what caused it: ``m.JobQueued(**ids, ...)``."""

    job_id: str | None
    causation_id: str | None
    actor: str | None


class Command(Message):
    kind: ClassVar[str] = "command"


class Event(Message):
    kind: ClassVar[str] = "event"


class Telemetry(Message):
    kind: ClassVar[str] = "telemetry"


# ---------------------------------------------------------------------------------------------
# Commands for the scheduler ({st}:commands), appended by the gateway on behalf of `actor` (and
# the settings the log folds, by the scheduler itself at start).


class SubmitJob(Command):
    type: Literal["job.submit"] = "job.submit"
    spec: JobSpec
    team: str | None = None  # the submitter's team (from its API key entry), for team quotas
    sweep_id: str | None = None  # a point of this sweep (sent after its sweep.create)
    point: dict[str, ExtraValue] | None = None  # the point's values of the sweep's grid


class CreateSweep(Command):
    """A grid search: one job per point follows, each a job.submit with the sweep's id."""

    type: Literal["sweep.create"] = "sweep.create"
    sweep_id: str
    name: str | None = None
    grid: dict[str, list[ExtraValue]]  # train_params field -> its values
    max_concurrent: int | None = Field(None, ge=1)  # at most this many of its jobs hold GPUs at once
    job_ids: list[str]  # one per point, in the grid's order
    team: str | None = None


class CancelSweep(Command):
    type: Literal["sweep.cancel"] = "sweep.cancel"
    sweep_id: str


class CancelJob(Command):
    type: Literal["job.cancel"] = "job.cancel"
    reason: str | None = None


class SetPriority(Command):
    type: Literal["job.set_priority"] = "job.set_priority"
    priority: int = Field(ge=0, le=10)


class ReleaseJob(Command):
    """Let a job submitted with ``hold`` be queued (``POST /jobs/{id}/start``)."""

    type: Literal["job.release"] = "job.release"


class DeleteJob(Command):
    type: Literal["job.delete"] = "job.delete"


class RequestExport(Command):
    type: Literal["job.export"] = "job.export"


class ProcessQueue(Command):
    type: Literal["queue.process"] = "queue.process"


class SuspendJob(Command):
    """Checkpoint a running job, free its GPUs, and hold it until resumed."""

    type: Literal["job.suspend"] = "job.suspend"


class ResumeJob(Command):
    """Queue a suspended job again in its original place."""

    type: Literal["job.resume"] = "job.resume"


class SetQuotas(Command):
    """Replace the quota table (an admin's ``PUT /admin/quotas``, or QUOTAS at start)."""

    type: Literal["quotas.set"] = "quotas.set"
    quotas: Quotas
    from_config: bool = False  # sent by the scheduler at start, from its QUOTAS setting


class SetHalfLife(Command):
    """Fair share's usage half-life, sent by the scheduler at start from its setting."""

    type: Literal["usage.set_half_life"] = "usage.set_half_life"
    half_life_s: float = Field(gt=0)


# Commands from the scheduler to a node's runner ({st}:node:<name>) and to the exporter.


class StartJob(Command):
    type: Literal["job.start"] = "job.start"
    attempt: int
    node: str
    gpu_ids: list[int]
    spec: JobSpec
    resume_from: str | None = None  # a checkpoint of an earlier attempt to continue from
    # torchrun's rendezvous: a gang job's rank on this node (of spec.nodes), rank 0's address,
    # and the port of the attempt (also set for a job on several GPUs of one node)
    rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


class StopJob(Command):
    type: Literal["job.stop"] = "job.stop"
    attempt: int
    # preempt: for a more urgent job (or its node was lost); suspend: on request. Both report
    # job.stopped when the attempt is gone; a stop of an attempt already given up is ignored.
    reason: Literal["cancel", "timeout", "preempt", "suspend", "idle"] = "cancel"
    rank: int = 0  # of a gang job: the rank on the node the stop is sent to


class StartExport(Command):
    type: Literal["export.start"] = "export.start"
    checkpoint: str
    output_dir: str
    hub: ModelHub | None = None  # the job's: where its base model came from


# ---------------------------------------------------------------------------------------------
# Facts ({st}:events); which service appends each: events/routing.py.


class JobAccepted(Event):
    type: Literal["job.accepted"] = "job.accepted"
    spec: JobSpec
    team: str | None = None
    sweep_id: str | None = None
    point: dict[str, ExtraValue] | None = None


class SweepCreated(Event):
    """A sweep's record: its grid, its cap and its jobs (accepted next, one per point)."""

    type: Literal["sweep.created"] = "sweep.created"
    sweep_id: str
    name: str | None = None
    grid: dict[str, list[ExtraValue]]
    max_concurrent: int | None = None
    job_ids: list[str]


class FailureReason(StrEnum):
    """Why a job was rejected or failed (``job.rejected``, ``job.failed``, a gang rank's
    ``job.rank_ended``): a closed set the producers choose from, read leniently (see Reason)."""

    # the runner's, from the exit status and the last output lines
    OOM = "oom"
    BAD_ARGUMENT = "bad_argument"
    DATASET_NOT_FOUND = "dataset_not_found"
    MODEL_NOT_FOUND = "model_not_found"
    KILLED = "killed"  # stopped from outside
    UNKNOWN = "unknown"
    # the runner's, when it stopped the job or could not start it
    TIMEOUT = "timeout"
    IDLE = "idle"
    PATH_OUTSIDE_ROOTS = "path_outside_roots"
    SPAWN_FAILED = "spawn_failed"
    # the scheduler's
    NODE_LOST = "node_lost"  # retries used up
    RUNNER_LOST = "runner_lost"
    DEPENDENCY_FAILED = "dependency_failed"
    QUOTA = "quota"
    UNSATISFIABLE = "unsatisfiable"  # no node could ever hold it


class StopReason(StrEnum):
    """Why an attempt was stopped without ending the job (``job.stopped``)."""

    # the runner's
    PREEMPT = "preempt"
    SUSPEND = "suspend"
    # the scheduler's, when no report will come
    NODE_LOST = "node_lost"
    RUNNER_LOST = "runner_lost"
    LOST = "lost"  # the attempt ended while no runner watched it


def _known(members: type[StrEnum]) -> BeforeValidator:
    """Read a known value as its member; any other text (a producer newer or older than this
    reader) is kept as it is, so that no entry of the log becomes unreadable."""

    def known(value: object) -> object:
        if isinstance(value, str) and not isinstance(value, members):
            try:
                return members(value)
            except ValueError:
                return value
        return value

    return BeforeValidator(known)


Reason = Annotated[FailureReason | str, _known(FailureReason)]
Stopped = Annotated[StopReason | str, _known(StopReason)]


class JobRejected(Event):
    type: Literal["job.rejected"] = "job.rejected"
    reason: Reason
    message: str


class JobQueued(Event):
    type: Literal["job.queued"] = "job.queued"
    v: int = 2  # v2 adds behind_job_id
    position: int  # 1-based place in the queue when queued
    behind_job_id: str | None = None  # the job right ahead of it then (None: first in line)


class Rank(BaseModel):
    """Where one rank of a gang job runs."""

    node: str
    gpu_ids: list[int]


class JobScheduled(Event):
    type: Literal["job.scheduled"] = "job.scheduled"
    node: str  # rank 0's, for a gang job
    gpu_ids: list[int]
    attempt: int
    peers: list[Rank] = Field(default_factory=list)  # a gang job's ranks 1, 2, ... in order
    master_addr: str | None = None  # rank 0's node address (a gang job)
    master_port: int | None = None  # torchrun's rendezvous port for the attempt
    # Why the attempt starts from zero though the job has a checkpoint: no node in service can
    # read it (LOST_CHECKPOINT=restart)
    fresh_start: str | None = None
    # Started over its owner's GPU quota on GPUs no job within quota waited for: the first to be
    # preempted when one does.
    borrowing: bool = False
    preempted: list[str] = Field(default_factory=list)  # the jobs preempted for it, in this decision


class JobStarted(Event):
    type: Literal["job.started"] = "job.started"
    attempt: int
    node: str
    pid: int
    pgid: int
    run_dir: str
    argv: list[str]
    cuda_visible_devices: str
    env: dict[str, str] = Field(default_factory=dict)  # set on top of the runner's environment
    rank: int = 0  # of a gang job; the job runs once every rank has started


class ProgressMetrics(BaseModel):
    """A training step as ms-swift logs it (also the job record's progress)."""

    step: int = 0
    max_steps: int = 0
    percent: float = 0.0
    loss: float | None = None
    grad_norm: float | None = None
    learning_rate: float | None = None
    token_acc: float | None = None
    epoch: float | None = None
    elapsed_s: float | None = None
    remaining_s: float | None = None
    train_speed_s_per_it: float | None = None
    eval: dict[str, float] = Field(default_factory=dict)


class JobProgress(Event, ProgressMetrics):
    type: Literal["job.progress"] = "job.progress"
    attempt: int


class CheckpointSaved(Event):
    type: Literal["job.checkpoint_saved"] = "job.checkpoint_saved"
    attempt: int
    step: int
    path: str


class JobServing(Event):
    type: Literal["job.serving"] = "job.serving"
    attempt: int
    endpoint: str


class JobSucceeded(Event):
    type: Literal["job.succeeded"] = "job.succeeded"
    attempt: int
    exit_code: int
    run_dir: str
    last_checkpoint: str | None = None
    # The run's last logged values: `loss` (its last training row), `eval_loss` and the other
    # eval_* metrics (its last evaluation), `train_loss` (ms-swift's mean over the run)
    final: dict[str, float] = Field(default_factory=dict)


class JobFailed(Event):
    type: Literal["job.failed"] = "job.failed"
    attempt: int | None = None
    exit_code: int | None = None
    reason: Reason  # a FailureReason; a failed gang rank's (job.rank_ended) when a rank failed
    message: str = ""
    stderr_tail: list[str] = Field(default_factory=list)


class JobLost(Event):
    """A runner found an attempt's processes gone with no exit status: the job ended while no
    runner watched it, for a reason nobody saw. The scheduler retries it (max_retries) or fails it."""

    type: Literal["job.lost"] = "job.lost"
    attempt: int
    message: str = ""


class RankEnded(Event):
    """A rank of a gang job other than a finished or stopped rank 0 ended (rank 0's end is the
    job's). ``failed``: it exited on its own with an error (or vanished), and the whole attempt is
    stopped and retried from its last checkpoint while the job has retries, else it fails with
    this rank's reason."""

    type: Literal["job.rank_ended"] = "job.rank_ended"
    attempt: int
    rank: int
    node: str
    exit_code: int | None = None
    failed: bool = False
    reason: Reason = ""
    message: str = ""
    stderr_tail: list[str] = Field(default_factory=list)


class JobRequeued(Event):
    """An attempt ended by the infrastructure (its node or its runner was lost); the job waits
    to run again."""

    type: Literal["job.requeued"] = "job.requeued"
    attempt: int
    reason: Reason  # node_lost, runner_lost, or a failed gang rank's reason (retried)
    # Whether it used one of the job's max_retries: an attempt lost with its node before it ran
    # (before every rank of a gang job had started) did not.
    retry: bool = True


class JobPreempted(Event):
    """The attempt gives its GPUs to a more urgent job (``by_job_id``, scheduled in the same
    decision): its runner stops it, with a checkpoint, and it is queued again in its original
    place once job.stopped reports it gone."""

    type: Literal["job.preempted"] = "job.preempted"
    attempt: int
    by_job_id: str
    reason: Literal["priority", "borrowing"]  # a lower priority, or it ran over its quota
    step: int | None = None  # the last step the log knew of when it was decided


class JobSuspended(Event):
    """Suspended on request: its GPUs are freed, its runner stops it with a checkpoint, and it
    waits for job.resume."""

    type: Literal["job.suspended"] = "job.suspended"
    attempt: int


class JobStopped(Event):
    """A preempted or suspended attempt's processes are gone."""

    type: Literal["job.stopped"] = "job.stopped"
    attempt: int
    exit_code: int | None = None
    last_checkpoint: str | None = None  # what the next attempt resumes from
    step: int | None = None  # the step of that checkpoint
    reason: Stopped = ""


class JobResumed(Event):
    type: Literal["job.resumed"] = "job.resumed"
    position: int
    behind_job_id: str | None = None


class QuotasChanged(Event):
    type: Literal["quotas.changed"] = "quotas.changed"
    quotas: Quotas
    from_config: bool = False


class HalfLifeChanged(Event):
    """Fair share's usage half-life: usage so far keeps its decayed value."""

    type: Literal["usage.half_life_changed"] = "usage.half_life_changed"
    half_life_s: float = Field(gt=0)


class JobPriorityChanged(Event):
    type: Literal["job.priority_changed"] = "job.priority_changed"
    priority: int
    previous: int


class JobHeld(Event):
    """Accepted with ``hold``: not queued, never scheduled, until released."""

    type: Literal["job.held"] = "job.held"


class JobWaiting(Event):
    """Accepted with dependencies not met yet: not queued, holding back no one, until they are."""

    type: Literal["job.waiting"] = "job.waiting"
    on: list[str]  # the jobs it waits for (a deploy's source job included), in the order given


class DependenciesMet(Event):
    """A waiting job's dependencies are met: it queues (or is held) next. A deploy of another
    job's export is given the merged model's path."""

    type: Literal["job.dependencies_met"] = "job.dependencies_met"
    model_path: str | None = None


class NotificationDelivered(Event):
    """The notifier POSTed an event to a webhook, which answered 2xx."""

    type: Literal["notification.delivered"] = "notification.delivered"
    event_id: str  # the notified event's id (in the delivery's X-Swift-Trainer-Event-Id header)
    event_type: str
    url: str  # without credentials or query
    status_code: int
    attempts: int


class NotificationFailed(Event):
    """The notifier gave up on a webhook: no 2xx after its attempts (or a refused URL)."""

    type: Literal["notification.failed"] = "notification.failed"
    event_id: str
    event_type: str
    url: str
    status_code: int | None = None  # the last answer's, if any came
    attempts: int
    error: str


class JobDeleted(Event):
    """A finished job leaves the job list; its history stays in the log."""

    type: Literal["job.deleted"] = "job.deleted"


class JobCancelRequested(Event):
    type: Literal["job.cancel_requested"] = "job.cancel_requested"
    reason: str | None = None


class JobCancelled(Event):
    type: Literal["job.cancelled"] = "job.cancelled"
    attempt: int | None = None
    exit_code: int | None = None
    last_checkpoint: str | None = None  # saved on the way out (SIGTERM with a jit checkpoint)


class ExportRequested(Event):
    type: Literal["export.requested"] = "export.requested"
    checkpoint: str
    output_dir: str


class ExportStarted(Event):
    type: Literal["export.started"] = "export.started"
    argv: list[str]


class ExportCompleted(Event):
    type: Literal["export.completed"] = "export.completed"
    path: str


class ExportFailed(Event):
    type: Literal["export.failed"] = "export.failed"
    exit_code: int | None = None
    message: str = ""
    stderr_tail: list[str] = Field(default_factory=list)


class GpuInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    uuid: str
    name: str
    memory_total_mb: int


class NodeJoined(Event):
    type: Literal["node.joined"] = "node.joined"
    node: str
    simulated: bool
    gpus: list[GpuInfo]
    addr: str | None = None  # where other nodes reach it (NODE_ADDR): a gang's rank 0 address


class NodeLossReason(StrEnum):
    """Why a node was lost (``node.lost``), which is also why the attempts on it ended."""

    NODE_LOST = "node_lost"  # its heartbeats stopped
    RUNNER_LOST = "runner_lost"  # its runner's did


class NodeLost(Event):
    type: Literal["node.lost"] = "node.lost"
    node: str
    reason: NodeLossReason = NodeLossReason.NODE_LOST


# ---------------------------------------------------------------------------------------------
# Telemetry ({st}:telemetry, capped).


class GpuProcess(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int
    used_memory_mb: int


class GpuSample(GpuInfo):
    memory_used_mb: int
    memory_free_mb: int | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    processes: list[GpuProcess] = Field(default_factory=list)


class StorageRoot(BaseModel):
    """A storage root of a node (one of its PATH_ROOTS, or its runs directory) and the nodes
    whose marker files it holds there: those that share it."""

    path: str
    nodes: list[str] = Field(default_factory=list)


class NodeHeartbeat(Telemetry):
    type: Literal["node.heartbeat"] = "node.heartbeat"
    node: str
    simulated: bool  # True when no NVML driver: the inventory is made up for laptops and CI
    gpus: list[GpuSample]
    degraded: str | None = None  # what NVML could not read; the inventory may be incomplete
    addr: str | None = None  # NODE_ADDR
    roots: list[StorageRoot] = Field(default_factory=list)  # which of its roots other nodes share


class MetricSample(BaseModel):
    name: str  # the sample's own name (a histogram's _bucket, _sum, _count; a counter's _total)
    labels: dict[str, str] = Field(default_factory=dict)
    value: float


class MetricFamily(BaseModel):
    """One Prometheus metric of a process, as prometheus-client collects it."""

    name: str
    type: str  # counter, gauge, histogram, summary, info, unknown
    help: str = ""
    samples: list[MetricSample]


class ServiceHeartbeat(Telemetry):
    type: Literal["service.heartbeat"] = "service.heartbeat"
    service: str
    instance: str
    started_at: datetime
    interval_s: float
    node: str | None = None  # the node it runs on (a runner serves that node's jobs)
    metrics: list[MetricFamily] = Field(default_factory=list)  # its own, served by the gateway's /metrics


AnyMessage = Annotated[
    SubmitJob
    | CancelJob
    | RequestExport
    | SetPriority
    | DeleteJob
    | ReleaseJob
    | ProcessQueue
    | SuspendJob
    | ResumeJob
    | SetQuotas
    | SetHalfLife
    | CreateSweep
    | CancelSweep
    | StartJob
    | StopJob
    | StartExport
    | JobAccepted
    | JobRejected
    | JobQueued
    | JobScheduled
    | JobStarted
    | JobProgress
    | CheckpointSaved
    | JobServing
    | JobSucceeded
    | JobFailed
    | JobCancelRequested
    | JobPriorityChanged
    | JobLost
    | RankEnded
    | JobRequeued
    | JobDeleted
    | JobHeld
    | JobWaiting
    | NotificationDelivered
    | NotificationFailed
    | DependenciesMet
    | JobCancelled
    | JobPreempted
    | JobSuspended
    | JobStopped
    | JobResumed
    | QuotasChanged
    | HalfLifeChanged
    | SweepCreated
    | ExportRequested
    | ExportStarted
    | ExportCompleted
    | ExportFailed
    | NodeJoined
    | NodeLost
    | NodeHeartbeat
    | ServiceHeartbeat,
    Field(discriminator="type"),
]


def message_types() -> dict[str, type[Message]]:
    """Every concrete message class by its ``type`` string."""
    found: dict[str, type[Message]] = {}
    stack: list[type[Message]] = [Message]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        default = cls.model_fields["type"].default
        if isinstance(default, str) and cls.model_fields["type"].annotation is not str:
            found[default] = cls
    return found
