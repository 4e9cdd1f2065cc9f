"""What the gateway answers with: one pydantic model per JSON body, from which the OpenAPI
document takes its response schemas (see :mod:`services.gateway.openapi`).

A view is closed (``additionalProperties: false``) and every field it always writes is required;
a field that is sometimes left out is marked so and has no ``null`` in its schema. Open maps
(``additionalProperties`` with a schema) are used only where the keys are data: job ids,
environment variables, service names, a stream entry's raw fields.

(One module though long: it is the API's reference, a catalogue of small models read top to
bottom beside the OpenAPI document, and the models share their field conventions.)
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema

from events import messages as m
from events.keys import EXPORTER_GROUP, RUNNER_GROUP, SCHEDULER_GROUP
from events.params import DeployParams, LanguageModelTrainParams, MultiModalTrainParams, TaskType
from events.quotas import Limit, Quotas
from events.records import Export, Job, JobStatus, Node, Progress
from events.state import State

# ---------------------------------------------------------------------------------------------
# Shared


CLOSED = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class View(BaseModel):
    """A response body: closed, and what it always writes is required."""

    model_config = CLOSED


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(description="the field, parameter or header at fault ('body' for the whole body)")
    message: str
    type: str | SkipJsonSchema[None] = Field(
        None, description="pydantic's error type; only on invalid jobs", json_schema_extra=_no_default
    )


class ErrorInfo(View):
    code: str = Field(description="stable, for machines: job_not_found, validation_error, illegal_state, …")
    message: str
    details: list[ErrorDetail] = Field(description="the fields at fault, for bad input")


class Error(View):
    error: ErrorInfo


Role = Literal["admin", "user"]
ServiceType = Literal["gateway", "scheduler", "gpu-monitor", "runner", "exporter"]
# Live instances per service type (the type is what a process calls itself in its heartbeats).
Services = Annotated[
    dict[str, list[str]], Field(description="the live instances of each service type, by the names they report")
]


# ---------------------------------------------------------------------------------------------
# Jobs


class ProgressView(Progress):
    model_config = CLOSED


class ExportView(Export):
    model_config = CLOSED


class RecordedJob(Job):
    """A job as the fold records it."""

    model_config = CLOSED

    progress: ProgressView | None
    export: ExportView


class JobView(RecordedJob):
    task_type: TaskType
    queue_position: int | None = Field(ge=1, description="1-based place in the queue; null when not queued")
    suspendable: bool = Field(description="POST /jobs/{id}/suspend applies now")
    resumable: bool = Field(description="POST /jobs/{id}/resume applies now")
    waiting_on: list[str] = Field(description="while waiting: the jobs it still waits for")


class JobCreated(View):
    job_id: str
    status: JobStatus = Field(description="as decided within the submit wait; pending when not decided yet")
    message: str
    queue_position: int | None = Field(ge=1)
    estimated_wait_time: float | None = Field(description="seconds until the estimated start; null when unknown")
    command_position: str = Field(description="the submit command's entry in the commands stream")


class JobList(View):
    jobs: list[JobView]
    total: int = Field(ge=0)
    page: int = Field(ge=1)
    size: int = Field(ge=1)
    next_cursor: str | None = Field(description="pass as cursor for the next page; null on the last")


class CommandAccepted(View):
    job_id: str
    status: JobStatus = Field(description="the job's status when the command was accepted")
    command_position: str = Field(description="the command's entry in the commands stream")
    message: str


class DeletedFinished(View):
    deleted: list[str] = Field(description="the ids of the jobs a deletion was requested for")
    count: int = Field(ge=0)


class JobProgress(View):
    job_id: str
    status: JobStatus
    progress: ProgressView | None = Field(description="the last progress report; null before the first")


class LogLine(View):
    entry_id: str = Field(description="the line's entry in the job's output stream")
    fd: Literal["stdout", "stderr", "export"] | None = Field(description="which output: the job's, or its export's")
    line: str | None


class JobLogs(View):
    job_id: str
    rank: int = Field(0, description="whose lines: a gang job's rank (?rank=), 0 by default")
    lines: list[LogLine] = Field(description="oldest first")


class CommandLine(View):
    argv: list[str]
    env: dict[str, str] = Field(description="the environment set for the process, on top of the runner's")
    shell: str = Field(description="argv quoted for a POSIX shell")


class RankCommand(CommandLine):
    """One rank of a gang job: its node's process."""

    rank: int
    node: str | None = Field(None, description="where it started (none before)")


class JobCommand(View):
    job_id: str
    started: bool = Field(description="true: as started; false: as it will start")
    argv: list[str]
    env: dict[str, str] = Field(description="the environment set for the process, on top of the runner's")
    shell: str = Field(description="argv quoted for a POSIX shell")
    ranks: list[RankCommand] = Field(default_factory=list, description="a gang job's ranks, 0 first (its argv above)")


class DryRun(CommandLine):
    """What a submission would run, instead of submitting it."""

    dry_run: Literal[True]
    ranks: list[RankCommand] = Field(default_factory=list, description="a gang job's ranks, 0 first")


# ---------------------------------------------------------------------------------------------
# The queue


class QueueEntry(View):
    position: int = Field(ge=1)
    job_id: str
    name: str | None
    priority: int = Field(ge=0, le=10)
    gpu_count: int = Field(ge=1)
    submitted_at: datetime
    submitted_by: str | None
    team: str | None = Field(description="the submitter's team, whose quota the job counts against")
    order_reason: str = Field(
        description="why it is where it is: its priority and submit order, or (fair share) its owner's decayed usage"
    )
    waiting_reason: Literal["quota", "gpus"] = Field(
        description="quota: its owner or team holds their GPU quota (it holds up no one); gpus: it waits for GPUs"
    )
    waiting_message: str = Field(description="what it waits for, in words")
    estimated_start_at: datetime | None = Field(description="null when not known")
    estimated_wait_s: float | None = Field(ge=0, description="null when not known")
    estimate_basis: str = Field(description="how the start was estimated, or why it cannot be")


class Queue(View):
    queue: list[QueueEntry] = Field(description="in start order")


class NotQueued(View):
    job_id: str
    status: JobStatus
    queued: Literal[False]


class Queued(QueueEntry):
    status: Literal[JobStatus.queued]
    queued: Literal[True]


class QueueStatus(RootModel[NotQueued | Queued]):
    """A job that is not queued, or its entry in the queue."""


class PriorityChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(ge=0, le=10, description="0-10, higher starts first")


# ---------------------------------------------------------------------------------------------
# Sharing the pool


class QuotaTable(View):
    quotas: Quotas = Field(description="the table in force")
    from_config: bool = Field(description="it is the table the QUOTAS setting gave")
    known_users: list[str] = Field(description="the users API_KEYS names (a table may name only these, and *)")
    known_teams: list[str] = Field(description="the teams API_KEYS names (a table may name only these)")


class QuotasApplied(QuotaTable):
    applied: bool = Field(description="the table asked for is in force (false: not yet within the wait)")
    command_position: str = Field(description="the quotas.set command's entry in the commands stream")


class UsageRow(View):
    name: str
    gpus_in_use: int = Field(ge=0, description="GPUs its jobs hold, borrowing ones included")
    gpus_within_quota: int = Field(ge=0, description="GPUs its jobs hold within its quota")
    jobs_waiting: int = Field(ge=0, description="jobs pending, held, queued or preempted")
    gpu_hours_day: float = Field(ge=0, description="GPU-hours used in the hours that overlap the last day")
    gpu_hours_week: float = Field(ge=0, description="GPU-hours used in the hours that overlap the last week")
    decayed_gpu_hours: float = Field(ge=0, description="GPU-hours, each halved every half-life: fair share's measure")
    limit: Limit | None = Field(description="its quota (for a user, its own or that of *); null: none")


class UsageReport(View):
    at: datetime = Field(description="when it was computed")
    fair_share: bool
    half_life_s: float = Field(description="fair share's half-life of usage")
    users: list[UsageRow] = Field(description="a user sees their own row; an admin every user's")
    teams: list[UsageRow] = Field(description="a user sees their team's row; an admin every team's")


class ProcessRequested(View):
    command_position: str
    message: str


class ProcessorStatus(View):
    running: bool = Field(description="a scheduler holds the lease")
    leader: str | None
    lease_ms_left: int = Field(ge=0)
    fencing_token: int | None = Field(ge=1)
    schedulers: list[str] = Field(description="live scheduler instances, leading or standing by")


# ---------------------------------------------------------------------------------------------
# The cluster


GpuStatus = Annotated[
    Literal["free", "busy", "foreign", "unavailable"],
    Field(
        description="free: a job could be placed on it now; busy: a job holds it; foreign: no job holds it but other "
        "processes use more than FOREIGN_MEMORY_THRESHOLD_MB of it; unavailable: its node is not up (see its state)"
    ),
]


class HeldGpu(m.GpuInfo):
    """A GPU of a node that has not sent a sample of it yet."""

    held_by: str | None = Field(description="the job that holds it")
    status: GpuStatus


class SampledGpu(m.GpuSample):
    """A GPU as the node's last heartbeat saw it."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    held_by: str | None = Field(description="the job that holds it")
    status: GpuStatus


class NodeSummary(View):
    """A node in one line: what a dashboard of many nodes shows before its GPUs."""

    state: Literal["up", "silent", "degraded", "lost"] = Field(
        description="up: heard from and in service; silent: no heartbeat for 5 intervals, its GPUs offered to no "
        "one; degraded: NVML could not read everything, its GPUs offered to no one; lost: declared lost in the log"
    )
    gpus: int = Field(ge=0)
    free: int = Field(
        ge=0, description="GPUs a job could be placed on now: the node up, no job holds it, no other process uses it"
    )
    busy: int = Field(ge=0, description="GPUs a job holds")
    foreign: int = Field(
        ge=0, description="GPUs no job holds that other processes use more than FOREIGN_MEMORY_THRESHOLD_MB of"
    )
    jobs: int = Field(ge=0, description="jobs holding its GPUs")
    memory_used_mb: int = Field(ge=0, description="as its last heartbeat measured, over its GPUs")
    memory_total_mb: int = Field(ge=0)
    heartbeat_age_s: float | None = Field(ge=0, description="seconds since its last heartbeat, at the view's time")


class ClusterSummary(View):
    nodes: int = Field(ge=0)
    nodes_up: int = Field(ge=0, description="nodes whose state is up")
    gpus: int = Field(ge=0)
    free: int = Field(ge=0)
    busy: int = Field(ge=0)
    foreign: int = Field(ge=0)
    jobs: int = Field(ge=0, description="jobs holding GPUs (one on several nodes counts once)")
    memory_used_mb: int = Field(ge=0)
    memory_total_mb: int = Field(ge=0)


class NodeGpus(View):
    node: str
    up: bool = Field(description="not declared lost in the log (see summary.state for whether it is heard from)")
    simulated: bool
    last_heartbeat_at: datetime | None
    summary: NodeSummary
    gpus: list[SampledGpu | HeldGpu]


class Gpus(View):
    at: datetime = Field(description="when the view was made: what heartbeat ages count from")
    summary: ClusterSummary
    nodes: list[NodeGpus] = Field(description="by name")


class NodeStatus(View):
    node: str
    up: bool
    epoch: int = Field(ge=1, description="how many times the node has joined")
    gpus: int = Field(ge=0)
    simulated: bool
    last_heartbeat: datetime | None
    degraded: str | None = Field(description="what NVML could not read; null when all is well or no heartbeat")


class Leader(View):
    leader: str | None


class StreamLengths(View):
    events: int
    commands: int
    telemetry: int
    dead: int


class RedisStatus(View):
    used_memory_bytes: int
    used_memory_human: str
    streams: StreamLengths


class ConsumerGroup(View):
    stream: str
    group: Literal[SCHEDULER_GROUP, RUNNER_GROUP, EXPORTER_GROUP]  # type: ignore[valid-type]
    consumers: int
    pending: int
    lag: int | None


JobsByStatus = create_model(  # type: ignore[call-overload]  # every status, with how many jobs have it (fields made from the enum)
    "JobsByStatus", __base__=View, **{status.value: (int, Field(ge=0)) for status in JobStatus}
)


class SystemStatus(View):
    nodes: list[NodeStatus]
    scheduler: Leader
    services: Services
    redis: RedisStatus
    consumer_groups: list[ConsumerGroup]
    jobs_by_status: JobsByStatus
    log_position: str = Field(description="the last entry of the log this gateway has read")


class Health(View):
    status: Literal["ok"]
    redis: Literal[True]
    services: Services
    missing: list[ServiceType] = Field(max_length=0)
    log_position: str


class Degraded(View):
    status: Literal["degraded"]
    redis: bool = Field(description="whether Redis answered a ping within 2 s")
    services: Services
    missing: list[ServiceType] = Field(description="service types with no live instance")
    log_position: str


# ---------------------------------------------------------------------------------------------
# Task types


class TaskTypeInfo(View):
    task_type: TaskType
    runs: str
    params_field: Literal["train_params", "deploy_params"]


class SupportedTypes(View):
    task_types: list[TaskTypeInfo]
    default: TaskType = Field(description="the task type of a job that names none")


class _Defaults(View):
    task_type: TaskType
    priority: int
    gpu_count: int
    max_retries: int


class LanguageModelDefaults(_Defaults):
    task_type: Literal[TaskType.language_model]
    auto_export: bool
    train_params: LanguageModelTrainParams


class MultiModalDefaults(_Defaults):
    task_type: Literal[TaskType.multimodal]
    auto_export: bool
    train_params: MultiModalTrainParams


class DeployDefaults(_Defaults):
    task_type: Literal[TaskType.deploy]
    deploy_params: DeployParams


class DefaultParams(
    RootModel[Annotated[LanguageModelDefaults | MultiModalDefaults | DeployDefaults, Field(discriminator="task_type")]]
):
    """What a job of a task type gets for what it leaves out."""


# ---------------------------------------------------------------------------------------------
# The history: entries of the log as `events.describe.render` writes them


EVENT_TYPES: dict[str, type[m.Message]] = {
    name: cls for name, cls in sorted(m.message_types().items()) if cls.kind == "event"
}
EventType = Literal[tuple(EVENT_TYPES)]  # type: ignore[valid-type]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entry_id: str = Field(description="the entry's id in the log")
    id: str = Field(description="the message's own id")
    at: datetime
    source: str = Field(description="the process that wrote it")
    causation_id: str | None = Field(description="the id of the message it answers")
    job_id: str | None
    actor: str | None = Field(description="who asked for it")
    hash: str | SkipJsonSchema[None] = Field(
        None, description="the entry's link in the hash chain", json_schema_extra=_no_default
    )


def _entry_model(type_: str, cls: type[m.Message]) -> type[BaseModel]:
    """An entry of one event type: the envelope, and its payload as the current version has it."""
    payload_fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in cls.model_fields.items() if name not in m.ENVELOPE_FIELDS
    }
    payload = create_model(
        f"{cls.__name__}Payload",
        __config__=ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True),
        **payload_fields,
    )
    version = cls.model_fields["v"].default
    return create_model(
        f"{cls.__name__}Entry",
        __base__=_Entry,
        type=(Literal[type_], ...),  # type: ignore[arg-type]  # (a Literal of a value known at run time)
        v=(Literal[version], Field(description="its schema version (older entries are shown upcast)")),  # type: ignore[arg-type]
        payload=(payload, ...),
    )


_ENTRIES = tuple(_entry_model(name, cls) for name, cls in EVENT_TYPES.items())


class UndecodableEntry(View):
    """An entry this release cannot read, shown raw with the reason."""

    entry_id: str
    type: str | None
    undecodable: str = Field(description="why it cannot be read")
    raw: dict[str, str] = Field(description="the entry's fields as stored")


class LoggedEntry(
    RootModel[Annotated[Union[_ENTRIES], Field(discriminator="type")] | UndecodableEntry]  # type: ignore[valid-type]  # noqa: UP007
):
    """An entry of the log: an event (its envelope and payload, by type), or one this release
    cannot read."""


class JobEvents(View):
    job_id: str
    events: list[LoggedEntry] = Field(description="in log order")


class AuditEvents(View):
    events: list[LoggedEntry] = Field(description="in log order")
    next_cursor: str | None = Field(description="pass as cursor for the next page; null on the last")


class TimelineItem(View):
    entry_id: str = Field(description="the entry; for a run of progress reports, the first")
    at: datetime
    type: EventType  # type: ignore[valid-type]
    actor: str | None
    source: str
    text: str


class UnreadableItem(View):
    entry_id: str
    type: str | None
    text: str = Field(description="unreadable: and the reason")


class Timeline(View):
    job_id: str
    timeline: list[TimelineItem | UnreadableItem]


class RecordedNode(Node):
    model_config = CLOSED


class FoldedState(State):
    """The state folded from the log: jobs and nodes by id and name, the GPU allocations by
    ``node/index``, and the log position it was folded up to."""

    model_config = CLOSED

    # (the same records, as closed schemas: a narrower type for the document's sake)
    jobs: dict[str, RecordedJob]  # type: ignore[assignment]
    nodes: dict[str, RecordedNode]  # type: ignore[assignment]
    allocations: dict[str, str] = Field(description="node/index -> the id of the job that holds the GPU")


# ---------------------------------------------------------------------------------------------
# Access


class Token(View):
    token: str = Field(description="also set as the HttpOnly cookie st_token")
    expires_in: float = Field(description="seconds")
    name: str
    role: Role


class SignedOut(View):
    signed_out: Literal[True]


class Me(View):
    name: str = Field(description="anonymous when access control is off")
    role: Role
    team: str | None = Field(description="the team its API key names; null: none")
    access_control: bool = Field(description="whether API keys are required")


# ---------------------------------------------------------------------------------------------
# Sweeps

GridValue = str | int | float | bool


class SweepRequest(BaseModel):
    """A grid search: one job per combination of the grid's values."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Read as a map (the grid fills in its train_params), checked as POST /jobs checks a job.
    job: Annotated[dict[str, Any], WithJsonSchema({"x-component": "JobSpec"})] = Field(
        description="a training job's body, as for POST /jobs (its train_params the base)"
    )
    grid: dict[str, list[GridValue]] = Field(
        description='train_params field -> its values, e.g. {"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]}'
    )
    max_concurrent: int | None = Field(None, ge=1, description="at most this many of its jobs hold GPUs at once")
    name: str | None = Field(None, max_length=200)


class SweepSubmitted(View):
    sweep_id: str
    job_ids: list[str] = Field(description="one job per point, in the grid's order (the first field varies slowest)")
    points: int


class SweepPoint(View):
    job_id: str
    name: str | None = None
    point: dict[str, GridValue] = Field(description="this job's values of the grid")
    status: str = Field(description="the job's status, or deleted")
    step: int | None = None
    max_steps: int | None = None
    train_loss: float | None = Field(None, description="its last training loss")
    eval_loss: float | None = Field(None, description="its last evaluation loss")


class SweepBest(View):
    job_id: str
    point: dict[str, GridValue]
    metric: Literal["eval_loss", "train_loss"] = Field(description="eval_loss where completed points evaluated")
    value: float


class SweepSummary(View):
    sweep_id: str
    name: str | None
    max_concurrent: int | None
    created_at: datetime
    created_by: str | None
    ended: bool = Field(description="every point has ended")
    counts: dict[str, int] = Field(description="points by status")
    best: SweepBest | None = Field(description="the completed point with the lowest loss")
    points: int


class SweepView(SweepSummary):
    grid: dict[str, list[GridValue]]
    points: list[SweepPoint]  # type: ignore[assignment]


class SweepList(View):
    sweeps: list[SweepSummary] = Field(description="newest first (the 100 newest)")
    total: int


class SweepCancelled(View):
    sweep_id: str
    cancelling: list[str] = Field(description="its jobs that had not ended")
    command_position: str
