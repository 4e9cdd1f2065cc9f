"""The job routes: submit (with its dry run), list, read, the command a job runs, its logs, and
the commands on one job (cancel, start, suspend, resume, export, delete).
"""

from __future__ import annotations

import shlex
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from events import messages as m
from events.admission import queued_quota_block
from events.connection import text_entries
from events.dependencies import names, verdict
from events.params import JobSpec, TaskType
from events.records import Job, JobStatus
from events.state import State
from services.config import Settings
from services.gateway import views
from services.gateway.auth import may_see, principal
from services.gateway.bodies import read_json, submitted
from services.gateway.context import actor, bus_of, choice, illegal, int_param, named_job, projection_of, send_command
from services.gateway.errors import ApiError
from services.gateway.projection import Projection
from services.gateway.submit import dry_run_launch


def job_view(job: Job, state: State, positions: dict[str, int] | None = None) -> dict[str, Any]:
    view = job.model_dump(mode="json")
    view["task_type"] = job.spec.task_type
    view["suspendable"], view["resumable"] = job.may_suspend, job.may_resume
    view["waiting_on"] = verdict(state, job.spec).waiting_on if job.status == JobStatus.waiting else []
    if positions is None:
        view["queue_position"] = state.queue_position(job.job_id)
    else:
        view["queue_position"] = positions.get(job.job_id)
    return view


async def create_job(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    projection = projection_of(request)
    submission = await submitted(request, await read_json(request))
    if submission.dry_run:
        launch = dry_run_launch(
            submission.spec, runs_dir=settings.runs_dir, omp_num_threads=settings.job_omp_num_threads
        )
        ranks = _planned_ranks(submission.spec, "<job_id>", settings)
        return JSONResponse(
            {
                "dry_run": True,
                **command_view(launch.argv, launch.env),
                "ranks": [r.model_dump(mode="json") for r in ranks],
            }
        )
    who = principal(request)
    over = queued_quota_block(projection.state, who.name, who.team)
    if over is not None:
        raise _over_quota(over)
    command = m.SubmitJob(job_id=m.new_id(), spec=submission.spec, actor=who.name, team=who.team)
    position = await bus_of(request).send(bus_of(request).keys.commands, command)
    job_id = command.job_id or ""

    await projection.wait_decided(job_id, settings.submit_wait_s)
    job = projection.job(job_id)
    if job is not None and job.status == JobStatus.failed and job.reason == m.FailureReason.QUOTA:
        # Submissions racing past the check above: the scheduler counted them, in log order.
        raise _over_quota(job.message or "over the limit of jobs waiting", job_id)
    body = {
        "job_id": job_id,
        "status": job.status if job else JobStatus.pending,
        "queue_position": _decided_position(job),
        "estimated_wait_time": _wait(projection, job_id),
        "command_position": position,
        "message": _submit_message(job),
    }
    return JSONResponse(body, status_code=202, headers={"Location": f"{request.url.path.rstrip('/')}/{job_id}"})


def _over_quota(why: str, job_id: str | None = None) -> ApiError:
    rejected = f" (job {job_id} was rejected)" if job_id else ""
    return ApiError(
        429,
        "quota_exceeded",
        f"over quota: {why}{rejected}",
        [{"field": "queued", "message": why}],
    )


def command_view(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    return views.CommandLine(argv=argv, env=env, shell=shlex.join(argv)).model_dump(mode="json")


async def job_command(request: Request) -> JSONResponse:
    """The exact command of a job: as started, or as it will be started."""
    job = named_job(request)
    settings: Settings = request.app.state.settings
    if job.argv:
        argv, env = job.argv, job.env
        ranks = [
            views.RankCommand(rank=0, node=job.node, argv=argv, env=env, shell=shlex.join(argv)),
            *(
                views.RankCommand(rank=p.rank, node=p.node, argv=p.argv, env=p.env, shell=shlex.join(p.argv))
                for p in job.peer_commands
            ),
        ]
        ranks = ranks if job.spec.nodes > 1 else []
    else:
        launch = dry_run_launch(job.spec, job.job_id, settings.runs_dir, settings.job_omp_num_threads)
        argv, env = launch.argv, launch.env
        ranks = _planned_ranks(job.spec, job.job_id, settings)
    body = views.JobCommand(
        job_id=job.job_id, started=bool(job.argv), argv=argv, env=env, shell=shlex.join(argv), ranks=ranks
    )
    return JSONResponse(body.model_dump(mode="json"))


def _planned_ranks(spec: JobSpec, job_id: str, settings: Settings) -> list[views.RankCommand]:
    """Each rank's command of a gang job as it will start (none for a job on one node)."""
    ranks = []
    for rank in range(spec.nodes if spec.nodes > 1 else 0):
        launch = dry_run_launch(spec, job_id, settings.runs_dir, settings.job_omp_num_threads, rank=rank)
        ranks.append(views.RankCommand(rank=rank, argv=launch.argv, env=launch.env, shell=shlex.join(launch.argv)))
    return ranks


def _decided_position(job: Job | None) -> int | None:
    """A job's place in the queue as the scheduler decided it. Not its place when the answer is
    written: the projection may by then have folded later events too (the job ahead starting, or
    cancelled in the same read of commands), and a second job would be told it is first as well."""
    return job.queue_position_at_submit if job is not None and job.status == JobStatus.queued else None


def _wait(projection: Projection, job_id: str) -> float | None:
    """Seconds until a queued job is expected to start (None when unknown or not queued)."""
    computed_at, estimates = projection.estimates()
    estimate = estimates.get(job_id)
    if estimate is None:
        return None
    wait = estimate.view(computed_at, datetime.now(UTC))["estimated_wait_s"]
    return wait if isinstance(wait, float) else None


def _submit_message(job: Job | None) -> str:
    if job is None or job.status == JobStatus.pending:
        return "accepted; the scheduler has not decided yet"
    if job.status == JobStatus.failed:
        return f"rejected: {job.message}"
    if job.status == JobStatus.queued:
        return "queued: waiting for free GPUs"
    if job.status == JobStatus.held:
        return "held: POST /jobs/{id}/start queues it"
    if job.status == JobStatus.waiting:
        return "waiting for the jobs it depends on to end"
    return f"{job.status} on {job.node} GPUs {job.gpu_ids}"


async def list_jobs(request: Request) -> JSONResponse:
    """Jobs newest first, filtered by status, task type, priority, owner and the job they depend
    on; paged by ``page`` and ``size``, or by ``cursor`` (the ``next_cursor`` of the previous page)."""
    projection = projection_of(request)
    state = projection.state
    status = choice(request, "status", set(JobStatus.__members__))
    task_type = choice(request, "task_type", set(TaskType.__members__))
    priority = int_param(request, "priority", -1, 0, 10) if "priority" in request.query_params else None
    owner = request.query_params.get("owner")
    needs = request.query_params.get("depends_on")
    sweep = request.query_params.get("sweep_id")
    page = int_param(request, "page", 1, 1, 1_000_000)
    size = int_param(request, "size", 50, 1, 500)
    everything = [*state.jobs.values(), *filter(None, map(projection.job, list(projection.pending)))]
    jobs = [
        job
        for job in everything
        if (status is None or job.status == status)
        and (task_type is None or job.spec.task_type == task_type)
        and (priority is None or job.priority == priority)
        and (owner is None or job.submitted_by == owner)
        and (needs is None or names(job.spec, needs))
        and (sweep is None or job.sweep_id == sweep)
        and may_see(request, job.submitted_by)
    ]
    jobs.sort(key=lambda job: (job.submitted_at, job.job_id), reverse=True)
    cursor = request.query_params.get("cursor")
    if cursor is not None:
        ids = [job.job_id for job in jobs]
        if cursor not in ids:
            raise ApiError(
                400, "bad_parameter", "cursor is not a job of this listing", [{"field": "cursor", "message": "unknown"}]
            )
        start = ids.index(cursor) + 1
    else:
        start = (page - 1) * size
    chunk = jobs[start : start + size]
    positions = {job.job_id: i for i, job in enumerate(state.queue(), start=1)}
    more = start + size < len(jobs)
    return JSONResponse(
        {
            "jobs": [job_view(job, state, positions) for job in chunk],
            "total": len(jobs),
            "page": page,
            "size": size,
            "next_cursor": chunk[-1].job_id if more and chunk else None,
        }
    )


async def get_job(request: Request) -> JSONResponse:
    return JSONResponse(job_view(named_job(request), projection_of(request).state))


async def job_progress(request: Request) -> JSONResponse:
    job = named_job(request)
    progress = views.ProgressView.model_validate(job.progress.model_dump()) if job.progress else None
    body = views.JobProgress(job_id=job.job_id, status=job.status, progress=progress)
    return JSONResponse(body.model_dump(mode="json"))


async def job_logs(request: Request) -> JSONResponse:
    job = named_job(request)
    tail = int_param(request, "tail", 200, 1, 10_000)
    rank = int_param(request, "rank", 0, 0, job.spec.nodes - 1)  # a gang job's ranks each keep theirs
    bus = bus_of(request)
    entries = text_entries(await bus.redis.xrevrange(bus.keys.logs(job.job_id, rank), count=tail))
    lines = [{"entry_id": i, "fd": f.get("fd"), "line": f.get("line")} for i, f in reversed(entries)]
    return JSONResponse({"job_id": job.job_id, "rank": rank, "lines": lines})


async def cancel_job(request: Request) -> JSONResponse:
    job = named_job(request)
    if not job.may_cancel:
        raise ApiError(
            409,
            "illegal_state",
            f"job {job.job_id} is already {job.status}",
            [{"field": "status", "message": job.status}],
        )
    return await send_command(request, m.CancelJob(job_id=job.job_id, actor=actor(request)), "cancel requested", job)


async def start_job(request: Request) -> JSONResponse:
    """Release a job submitted with ``hold``: it joins the queue by its priority and submit order."""
    job = named_job(request)
    if not job.may_release:
        raise illegal(job, "start")
    return await send_command(
        request, m.ReleaseJob(job_id=job.job_id, actor=actor(request)), "released to the queue", job
    )


async def suspend_job(request: Request) -> JSONResponse:
    """Stop a running training job with a checkpoint, free its GPUs, and hold it until resumed."""
    job = named_job(request)
    if not job.may_suspend:
        if job.spec.task_type == TaskType.deploy:
            raise ApiError(
                409,
                "illegal_state",
                f"cannot suspend job {job.job_id}: a deploy job is not suspended (it is {job.status})",
                [{"field": "status", "message": job.status}],
            )
        raise illegal(job, "suspend", "only a running training job can be" if job.status != JobStatus.running else "")
    return await send_command(request, m.SuspendJob(job_id=job.job_id, actor=actor(request)), "suspend requested", job)


async def resume_job(request: Request) -> JSONResponse:
    """Queue a suspended job again in its original place (its priority and submit order)."""
    job = named_job(request)
    if not job.may_resume:
        raise illegal(job, "resume", "only a suspended job can be")
    return await send_command(request, m.ResumeJob(job_id=job.job_id, actor=actor(request)), "resume requested", job)


async def export_job(request: Request) -> JSONResponse:
    job = named_job(request)
    if not job.may_export:
        why = "it is being exported already" if job.exporting else "only a completed LoRA job with a checkpoint can be"
        raise ApiError(
            409,
            "illegal_state",
            f"cannot export job {job.job_id}: {why}",
            [{"field": "status", "message": job.status}],
        )
    return await send_command(
        request, m.RequestExport(job_id=job.job_id, actor=actor(request)), "export requested", job
    )


async def delete_job(request: Request) -> JSONResponse:
    job = named_job(request)
    if not job.may_delete:
        raise illegal(job, "delete")
    return await send_command(request, m.DeleteJob(job_id=job.job_id, actor=actor(request)), "deletion requested", job)
