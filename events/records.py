"""The records the state keeps: jobs (their statuses and what may be asked of them), sweeps,
nodes, and the keys of GPUs in the allocation table."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from events import messages as m
from events.params import ExtraValue, JobSpec, TrainType


class JobStatus(StrEnum):
    pending = "pending"  # accepted by the gateway, not yet decided by the scheduler
    held = "held"  # accepted with hold: waits to be released (POST /jobs/{id}/start)
    waiting = "waiting"  # accepted with dependencies not yet met (depends_on, a deploy's source)
    queued = "queued"  # waiting for GPUs
    scheduled = "scheduled"  # GPUs allocated, start command sent to the node's runner
    running = "running"  # the swift process runs
    serving = "serving"  # a deploy job answers requests
    preempted = "preempted"  # gave its GPUs to a more urgent job; queued again once stopped
    suspended = "suspended"  # stopped on request with a checkpoint; waits to be resumed
    completed = "completed"  # training finished with exit code 0
    failed = "failed"  # rejected, crashed, or timed out
    cancelled = "cancelled"  # stopped on request


TERMINAL = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})


HOLDS_GPUS = frozenset({JobStatus.scheduled, JobStatus.running, JobStatus.serving})


WAITING = frozenset({JobStatus.pending, JobStatus.held, JobStatus.queued})


# Gave up its GPUs before its end: while ``stopping``, its attempt's process is still on its way
# out (reports of that attempt still count).
YIELDED = frozenset({JobStatus.preempted, JobStatus.suspended})


# Counted against a user's limit of jobs waiting at once.
QUEUED_FOR_QUOTA = frozenset(
    {JobStatus.pending, JobStatus.held, JobStatus.waiting, JobStatus.queued, JobStatus.preempted}
)


ANONYMOUS = "anonymous"  # the owner of jobs submitted with access control off


class ExportStatus(StrEnum):
    none = "none"  # never asked for
    pending = "pending"  # asked for, waiting for the exporter
    running = "running"  # swift export runs
    completed = "completed"  # merged model on disk
    failed = "failed"  # swift export failed


class Progress(m.ProgressMetrics):
    at: datetime | None = None


class Export(BaseModel):
    status: ExportStatus = ExportStatus.none
    checkpoint: str | None = None
    output_dir: str | None = None
    path: str | None = None
    error: str | None = None


class PeerCommand(BaseModel):
    """How a gang job's rank other than 0 started."""

    rank: int
    node: str
    argv: list[str]
    env: dict[str, str]


class Job(BaseModel):
    job_id: str
    spec: JobSpec
    status: JobStatus = JobStatus.pending
    priority: int
    seq: int  # submit order in the log: FIFO within a priority
    submitted_at: datetime
    submitted_by: str | None = None
    first_entry_id: str
    last_entry_id: str
    attempt: int = 0
    node: str | None = None  # rank 0's, for a gang job
    gpu_ids: list[int] = Field(default_factory=list)
    peers: list[m.Rank] = Field(default_factory=list)  # a gang job's other ranks, 1, 2, ...
    ranks_started: list[int] = Field(default_factory=list)  # of a gang job's attempt
    peer_commands: list[PeerCommand] = Field(default_factory=list)  # as ranks 1, 2, ... started
    master_port: int | None = None
    queue_position_at_submit: int | None = None
    pid: int | None = None
    run_dir: str | None = None
    argv: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress | None = None
    checkpoints: list[str] = Field(default_factory=list)
    last_checkpoint: str | None = None
    endpoint: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    stderr_tail: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    retries: int = 0  # attempts ended by the infrastructure and run again
    export: Export = Field(default_factory=Export)
    team: str | None = None
    borrowing: bool = False  # holds GPUs over its owner's quota
    stopping: bool = False  # its attempt gave up its GPUs and its process is being stopped
    preemptions: int = 0
    preempted_by: str | None = None  # the job it last gave its GPUs to
    preempted_jobs: list[str] = Field(default_factory=list)  # the jobs preempted for its last start
    checkpoint_at: datetime | None = None  # when the attempt's last checkpoint was saved
    checkpoint_step: int | None = None
    checkpoint_node: str | None = None  # the node that wrote the last checkpoint (its rank 0)
    usage_mark: datetime | None = None  # GPU time is credited to its owner up to here
    final: dict[str, float] = Field(default_factory=dict)  # the last values a completed run logged
    sweep_id: str | None = None  # a point of this sweep
    point: dict[str, ExtraValue] | None = None  # its values of the sweep's grid

    @property
    def owner(self) -> str:
        return self.submitted_by or ANONYMOUS

    @property
    def may_suspend(self) -> bool:
        """A running training job, not already on its way out, may be suspended."""
        return (
            self.status == JobStatus.running
            and self.spec.task_type != "deploy"
            and not self.cancel_requested
            and not self.stopping
        )

    @property
    def may_resume(self) -> bool:
        return self.status == JobStatus.suspended

    # What may be asked of a job now: the gateway answers 409 where the scheduler would decide
    # nothing, by the same predicates.

    @property
    def may_cancel(self) -> bool:
        return self.status not in TERMINAL

    @property
    def may_release(self) -> bool:
        """A job submitted with ``hold`` may be released to the queue."""
        return self.status == JobStatus.held

    @property
    def may_reprioritize(self) -> bool:
        return self.status == JobStatus.queued

    @property
    def exporting(self) -> bool:
        return self.export.status in (ExportStatus.pending, ExportStatus.running)

    @property
    def may_export(self) -> bool:
        """A completed LoRA job with a checkpoint, not being exported already."""
        return self.status == JobStatus.completed and self.is_lora and bool(self.last_checkpoint) and not self.exporting

    @property
    def may_delete(self) -> bool:
        """An ended job whose export (if any) is not under way."""
        return self.status in TERMINAL and not self.exporting

    @property
    def ranks(self) -> list[m.Rank]:
        """Where the attempt runs, rank by rank (one rank unless a gang job)."""
        if self.node is None:
            return []
        return [m.Rank(node=self.node, gpu_ids=self.gpu_ids), *self.peers]

    def gpus_on(self, node: str) -> list[int]:
        """The GPUs the attempt holds on a node."""
        return [index for rank in self.ranks if rank.node == node for index in rank.gpu_ids]

    def runs_on(self, node: str) -> bool:
        return any(rank.node == node for rank in self.ranks)

    @property
    def gpu_total(self) -> int:
        return sum(len(rank.gpu_ids) for rank in self.ranks)

    @property
    def is_lora(self) -> bool:
        params = getattr(self.spec, "train_params", None)
        return params is not None and params.train_type == TrainType.lora


class Sweep(BaseModel):
    sweep_id: str
    name: str | None = None
    grid: dict[str, list[ExtraValue]]
    max_concurrent: int | None = None
    job_ids: list[str]
    created_at: datetime
    created_by: str | None = None


class Node(BaseModel):
    name: str
    simulated: bool
    gpus: list[m.GpuInfo]
    addr: str | None = None  # NODE_ADDR: where other nodes reach it
    up: bool = True
    epoch: int = 1  # how many times the node has joined
    joined_at: datetime
    lost_at: datetime | None = None


class GpuKey(str):
    """A GPU's key in the allocation table, ``"node/index"``, read back into its parts. (Keys are
    made by :func:`gpu_key` as plain strings: that is on the scheduler's hot path.)"""

    __slots__ = ()

    @property
    def node(self) -> str:
        return self.rsplit("/", 1)[0]

    @property
    def gpu_index(self) -> int:
        return int(self.rsplit("/", 1)[1])


def gpu_key(node: str, index: int) -> str:
    """The key of a node's GPU in the allocation table (see :class:`GpuKey`)."""
    return f"{node}/{index}"
