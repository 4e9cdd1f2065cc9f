"""Sweeps: a grid over a training job's `train_params`, one job per point, at most
`max_concurrent` of them holding GPUs at once; their results side by side, and one cancel for all.

A sweep is a `sweep.create` command followed, in the same atomic append, by a `job.submit` per
point: the scheduler records it (`sweep.created`) and decides each job as any other, so replay
rebuilds sweeps like everything else.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from events import messages as m
from events.params import LanguageModelTrainParams, MultiModalTrainParams, TaskType
from events.records import TERMINAL, Job, JobStatus, Sweep
from events.state import State
from services.config import Settings
from services.gateway import views
from services.gateway.auth import may_see, principal
from services.gateway.bodies import read_json, submitted
from services.gateway.context import actor, bus_of, projection_of
from services.gateway.errors import ApiError, validation_details

# The fields a grid may vary, per task type: the typed training parameters (not extra_args).
_GRID_FIELDS = {
    TaskType.language_model.value: set(LanguageModelTrainParams.model_fields) - {"extra_args"},
    TaskType.multimodal.value: set(MultiModalTrainParams.model_fields) - {"extra_args"},
}


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", f"{field}: {message}", [{"field": field, "message": message}])


def _points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first field varying slowest."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def _point_name(base: str | None, point: dict[str, Any]) -> str:
    text = " ".join(f"{name}={value}" for name, value in point.items())
    return f"{base} {text}"[:200] if base else text[:200]


async def create_sweep(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    try:
        asked = views.SweepRequest.model_validate(await read_json(request))
    except ValidationError as exc:
        details = validation_details(exc, drop_tags={"str", "int", "float", "bool"})
        raise ApiError(422, "validation_error", "invalid sweep", details) from exc
    job = dict(asked.job)
    if "dry_run" in job:
        raise _invalid("job.dry_run", "a sweep is not dry-run: try one point as a job")
    task_type = job.setdefault("task_type", TaskType.multimodal.value)
    fields = _GRID_FIELDS.get(task_type) if isinstance(task_type, str) else None
    if fields is None:
        raise _invalid("job.task_type", "a sweep trains: language_model or multimodal")
    if not asked.grid:
        raise _invalid("grid", "give at least one train_params field and its values")
    for name, values in asked.grid.items():
        if name not in fields:
            raise _invalid(f"grid.{name}", f"not a train_params field of {task_type}")
        if not values:
            raise _invalid(f"grid.{name}", "give at least one value")
        if len(set(map(repr, values))) != len(values):
            raise _invalid(f"grid.{name}", "a value is given twice")
    count = math.prod(len(values) for values in asked.grid.values())
    if count > settings.max_sweep_points:
        raise _invalid("grid", f"{count} points, over MAX_SWEEP_POINTS ({settings.max_sweep_points})")
    params = job.get("train_params") or {}
    if not isinstance(params, dict):
        raise _invalid("job.train_params", "must be an object")
    who = principal(request)
    sweep_id = m.new_id()
    submits: list[m.Command] = []
    for point in _points(asked.grid):
        body = {**job, "train_params": {**params, **point}, "name": _point_name(job.get("name") or asked.name, point)}
        try:
            spec = (await submitted(request, body)).spec
        except ApiError as exc:
            raise _in_grid(exc, point) from exc
        command = m.SubmitJob(
            job_id=m.new_id(), spec=spec, actor=who.name, team=who.team, sweep_id=sweep_id, point=point
        )
        submits.append(command)
    job_ids = [command.job_id or "" for command in submits]
    create = m.CreateSweep(
        sweep_id=sweep_id,
        name=asked.name or job.get("name"),
        grid=asked.grid,
        max_concurrent=asked.max_concurrent,
        job_ids=job_ids,
        actor=who.name,
        team=who.team,
    )
    bus = bus_of(request)
    await bus.append(bus.keys.commands, create, *submits)  # all or nothing
    answer = views.SweepSubmitted(sweep_id=sweep_id, job_ids=job_ids, points=len(job_ids))
    return JSONResponse(
        answer.model_dump(mode="json"), status_code=202, headers={"Location": f"{request.url.path}/{sweep_id}"}
    )


def _in_grid(exc: ApiError, point: dict[str, Any]) -> ApiError:
    """A point's job refused: the fields the grid set are named as the grid's, with the value."""
    details: list[dict[str, Any]] = []
    for detail in exc.details or []:
        field = str(detail.get("field", ""))
        name = field.removeprefix("train_params.")
        if name in point:
            details.append({"field": f"grid.{name}", "message": f"{point[name]!r}: {detail.get('message')}"})
        else:
            details.append(
                {"field": f"job.{field}" if field and field != "body" else "job", "message": detail.get("message")}
            )
    return ApiError(exc.status, exc.code, exc.message, details)


def _sweep(request: Request) -> Sweep:
    state: State = projection_of(request).state
    sweep = state.sweeps.get(request.path_params["sweep_id"])
    if sweep is None or not may_see(request, sweep.created_by):
        raise ApiError(404, "not_found", f"no sweep {request.path_params['sweep_id']!r}")
    return sweep


def _point(job: Job | None, job_id: str, point: dict[str, Any]) -> views.SweepPoint:
    if job is None:
        return views.SweepPoint(job_id=job_id, point=point, status="deleted")
    progress = job.progress
    train = job.final.get("loss") if job.final else None
    if train is None and progress is not None:
        train = progress.loss
    evaluated = job.final.get("eval_loss") if job.final else None
    if evaluated is None and progress is not None:
        evaluated = progress.eval.get("eval_loss")
    return views.SweepPoint(
        job_id=job_id,
        name=job.spec.name,
        point=job.point or point,
        status=job.status.value,
        step=progress.step if progress else None,
        max_steps=progress.max_steps if progress else None,
        train_loss=train,
        eval_loss=evaluated,
    )


def sweep_view(sweep: Sweep, state: State) -> views.SweepView:
    points = [
        _point(state.jobs.get(job_id), job_id, point)
        for job_id, point in zip(sweep.job_ids, _points(sweep.grid), strict=False)
    ]
    counts: dict[str, int] = {}
    for point in points:
        counts[point.status] = counts.get(point.status, 0) + 1
    best = None
    for metric in ("eval_loss", "train_loss"):
        scored = [
            (getattr(p, metric), p)
            for p in points
            if getattr(p, metric) is not None and p.status == JobStatus.completed
        ]
        if scored:
            value, chosen = min(scored, key=lambda pair: pair[0])
            best = views.SweepBest(job_id=chosen.job_id, point=chosen.point, metric=metric, value=value)
            break
    ended = all(p.status in TERMINAL or p.status == "deleted" for p in points)
    return views.SweepView(
        sweep_id=sweep.sweep_id,
        name=sweep.name,
        grid=sweep.grid,
        max_concurrent=sweep.max_concurrent,
        created_at=sweep.created_at,
        created_by=sweep.created_by,
        ended=ended,
        counts=counts,
        best=best,
        points=points,
    )


async def get_sweep(request: Request) -> JSONResponse:
    return JSONResponse(sweep_view(_sweep(request), projection_of(request).state).model_dump(mode="json"))


async def list_sweeps(request: Request) -> JSONResponse:
    """Sweeps newest first, with each one's counts by status and best point."""
    state: State = projection_of(request).state
    visible = [sweep for sweep in state.sweeps.values() if may_see(request, sweep.created_by)]
    visible.sort(key=lambda sweep: (sweep.created_at, sweep.sweep_id), reverse=True)
    summaries = []
    for sweep in visible[:100]:
        full = sweep_view(sweep, state)
        summaries.append(views.SweepSummary(**full.model_dump(exclude={"points", "grid"}), points=len(full.points)))
    return JSONResponse(views.SweepList(sweeps=summaries, total=len(visible)).model_dump(mode="json"))


async def cancel_sweep(request: Request) -> JSONResponse:
    """Cancel every job of the sweep that has not ended (queued ones at once, running ones with a checkpoint)."""
    sweep = _sweep(request)
    state: State = projection_of(request).state
    live = [
        job_id for job_id in sweep.job_ids if (job := state.jobs.get(job_id)) is not None and job.status not in TERMINAL
    ]
    bus = bus_of(request)
    position = await bus.send(bus.keys.commands, m.CancelSweep(sweep_id=sweep.sweep_id, actor=actor(request)))
    body = views.SweepCancelled(sweep_id=sweep.sweep_id, cancelling=live, command_position=position)
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


def routes() -> list[Route]:
    return [
        Route("/sweeps", create_sweep, methods=["POST"]),
        Route("/sweeps", list_sweeps, methods=["GET"]),
        Route("/sweeps/{sweep_id}", get_sweep, methods=["GET"]),
        Route("/sweeps/{sweep_id}/cancel", cancel_sweep, methods=["POST"]),
    ]
