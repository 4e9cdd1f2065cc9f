"""One example of every message type, shared by the codec and fold tests."""

from __future__ import annotations

from events import messages as m
from events.params import DeployJob, LanguageModelJob, MultiModalJob
from events.quotas import Limit, Quotas

LM = LanguageModelJob(task_type="language_model", model_path="/models/tiny", data_path="/data/train.jsonl")
MM = MultiModalJob(task_type="multimodal", model_path="Qwen/Qwen2.5-VL-3B-Instruct", data_path="AI-ModelScope/coco#200")
DEPLOY = DeployJob(task_type="deploy", model_path="/models/merged")
QUOTAS = Quotas(users={"alice": Limit(gpus=2, queued=10), "*": Limit(gpus=1)}, teams={"ml": Limit(gpus=4)})
GPU = m.GpuInfo(index=0, uuid="GPU-0", name="Simulated GPU (no NVML)", memory_total_mb=24576)
SAMPLE = m.GpuSample(
    **GPU.model_dump(), memory_used_mb=10, utilization_pct=3, processes=[m.GpuProcess(pid=1, used_memory_mb=5)]
)


def examples() -> list[m.Message]:
    job = {"job_id": "job-1", "actor": "alice", "causation_id": "cmd-1", "source": "test@host"}
    return [
        m.SubmitJob(spec=LM, **job),
        m.SubmitJob(spec=MM, **job),
        m.SubmitJob(spec=DEPLOY, **job),
        m.CancelJob(reason="not needed", **job),
        m.RequestExport(**job),
        m.SetPriority(priority=9, **job),
        m.DeleteJob(**job),
        m.ReleaseJob(**job),
        m.SuspendJob(**job),
        m.ResumeJob(**job),
        m.SetQuotas(quotas=QUOTAS, actor="root"),
        m.SetHalfLife(half_life_s=3600.0),
        m.JobPreempted(attempt=1, by_job_id="job-2", reason="priority", step=40, **job),
        m.JobSuspended(attempt=1, **job),
        m.JobStopped(attempt=1, exit_code=0, last_checkpoint="/out/v0/checkpoint-42", step=42, reason="preempt", **job),
        m.JobResumed(position=1, **job),
        m.QuotasChanged(quotas=QUOTAS, actor="root"),
        m.HalfLifeChanged(half_life_s=3600.0),
        m.JobHeld(**job),
        m.JobWaiting(on=["job-0"], **job),
        m.NotificationDelivered(
            event_id="e-1",
            event_type="job.succeeded",
            url="https://hooks.example.org/x",
            status_code=200,
            attempts=1,
            **job,
        ),
        m.NotificationFailed(
            event_id="e-1",
            event_type="job.failed",
            url="https://hooks.example.org/x",
            attempts=4,
            error="HTTP 503",
            **job,
        ),
        m.CreateSweep(
            sweep_id="s-1", grid={"learning_rate": [1e-4, 5e-5]}, max_concurrent=1, job_ids=["job-1", "job-2"]
        ),
        m.CancelSweep(sweep_id="s-1", actor="alice"),
        m.SweepCreated(
            sweep_id="s-1", grid={"learning_rate": [1e-4, 5e-5]}, max_concurrent=1, job_ids=["job-1", "job-2"]
        ),
        m.DependenciesMet(model_path="/runs/job-0/checkpoint-20-merged", **job),
        m.JobPriorityChanged(priority=9, previous=5, **job),
        m.JobDeleted(**job),
        m.JobRequeued(attempt=1, reason="node_lost", **job),
        m.JobLost(attempt=1, message="Killed", **job),
        m.RankEnded(attempt=1, rank=1, node="n2", exit_code=1, failed=True, reason="oom", message="OOM", **job),
        m.ProcessQueue(actor="bob"),
        m.StartJob(attempt=1, node="n1", gpu_ids=[0, 1], spec=LM, **job),
        m.StopJob(attempt=1, reason="cancel", **job),
        m.StartExport(checkpoint="/runs/ckpt-20", output_dir="/runs/ckpt-20-merged", **job),
        m.JobAccepted(spec=LM, **job),
        m.JobRejected(reason="unsatisfiable", message="too many GPUs", **job),
        m.JobQueued(position=3, **job),
        m.JobScheduled(node="n1", gpu_ids=[0], attempt=1, **job),
        m.JobScheduled(
            node="n1",
            gpu_ids=[0, 1],
            attempt=2,
            peers=[m.Rank(node="n2", gpu_ids=[2, 3])],
            master_addr="10.0.0.1",
            master_port=29501,
            **job,
        ),
        m.JobStarted(
            attempt=1, node="n1", pid=10, pgid=10, run_dir="/r", argv=["swift", "sft"], cuda_visible_devices="0", **job
        ),
        m.JobProgress(attempt=1, step=2, max_steps=20, percent=10.0, loss=1.5, eval={"eval_loss": 1.2}, **job),
        m.CheckpointSaved(attempt=1, step=10, path="/r/checkpoint-10", **job),
        m.JobServing(attempt=1, endpoint="http://127.0.0.1:9000/v1", **job),
        m.JobSucceeded(attempt=1, exit_code=0, run_dir="/r/v0", last_checkpoint="/r/checkpoint-20", **job),
        m.JobFailed(attempt=1, exit_code=1, reason="oom", message="CUDA out of memory", stderr_tail=["x"], **job),
        m.JobCancelRequested(reason="user", **job),
        m.JobCancelled(attempt=1, exit_code=-15, **job),
        m.ExportRequested(checkpoint="/c", output_dir="/c-merged", **job),
        m.ExportStarted(argv=["swift", "export"], **job),
        m.ExportCompleted(path="/c-merged", **job),
        m.ExportFailed(exit_code=1, message="boom", **job),
        m.NodeJoined(node="n1", simulated=True, gpus=[GPU]),
        m.NodeLost(node="n1"),
        m.NodeHeartbeat(node="n1", simulated=False, gpus=[SAMPLE]),
        m.ServiceHeartbeat(service="runner", instance="h-1", started_at=m.utcnow(), interval_s=2.0),
    ]


def started(job_id: str, attempt: int = 1, node: str = "n1", gpus: str = "") -> m.JobStarted:
    """A runner's report that an attempt started (for tests that drive the fold by hand)."""
    return m.JobStarted(
        job_id=job_id, attempt=attempt, node=node, pid=1, pgid=1, run_dir="/r", argv=[], cuda_visible_devices=gpus
    )
