"""Sweeps: a grid over train_params, one job per point, at most max_concurrent holding GPUs at
once; bad grids refused naming the field; one cancel for every point. (The real training of a
sweep is in test_e2e and the dashboard's sweep page in test_dashboard.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode
from events.quotas import Limit, Quotas
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection
from services.gateway.sweeps import sweep_view
from services.scheduler import rules
from tests.test_dependencies import Pool
from tests.test_scheduler_rules import KEYS, LIMITS, NOW


def sweep(pool: Pool, sweep_id: str, grid: dict[str, list[m.ExtraValue]], max_concurrent: int | None) -> list[str]:
    """A sweep as the gateway sends it: its record, then a submission per point."""
    points = [{"learning_rate": lr, "lora_rank": rank} for lr in grid["learning_rate"] for rank in grid["lora_rank"]]
    job_ids = [f"{sweep_id}-{i}" for i in range(len(points))]
    create = m.CreateSweep(sweep_id=sweep_id, grid=grid, max_concurrent=max_concurrent, job_ids=job_ids, actor="alice")
    pool.settle(rules.create_sweep(pool.state, KEYS, create))
    for job_id, point in zip(job_ids, points, strict=True):
        spec = pool.spec(auto_export=False, train_params={"max_steps": 5, **point})
        command = m.SubmitJob(job_id=job_id, spec=spec, actor="alice", sweep_id=sweep_id, point=point)
        pool.settle(rules.submit(pool.state, KEYS, command, pool.heartbeats, LIMITS, NOW))
    return job_ids


def test_a_sweep_runs_at_most_max_concurrent_points_at_once_and_holds_up_no_one() -> None:
    # Given four free GPUs and a 2x2 sweep that may run two at once
    pool = Pool({"node-a": 4})
    ids = sweep(pool, "s", {"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]}, max_concurrent=2)
    # Then two points start, and the other two wait, queued
    assert pool.status(*ids) == ["scheduled", "scheduled", "queued", "queued"]
    assert pool.state.sweep_running("s") == 2
    # And a job submitted after them takes a free GPU: the waiting points hold up no one
    pool.ask("other", auto_export=False)
    assert pool.status("other") == ["scheduled"]
    # When a point ends, the next one starts in its place
    pool.end(ids[0], "completed")
    assert pool.status(*ids) == ["completed", "scheduled", "scheduled", "queued"]
    assert pool.state.jobs[ids[2]].point == {"learning_rate": 5e-5, "lora_rank": 8}
    # When the sweep is cancelled, every point not ended is: the queued at once, the running by its runner
    facts = pool.settle(rules.cancel_sweep(pool.state, KEYS, m.CancelSweep(sweep_id="s", actor="alice")))
    assert pool.status(ids[3]) == ["cancelled"]
    assert {f.job_id for f in facts if isinstance(f, m.JobCancelRequested)} == {ids[1], ids[2]}
    stops = {c.job_id for c in pool.sent if isinstance(c, m.StopJob)}
    assert {ids[1], ids[2]} <= stops and ids[0] not in stops


def test_a_sweeps_cap_holds_for_points_that_borrow_gpus_over_quota() -> None:
    # Given four free GPUs, an owner whose quota is no GPU at all, and a 2x2 sweep of theirs that
    # may run one point at once (queued: over quota, with borrowing off)
    pool = Pool({"node-a": 4})
    table = Quotas(users={"alice": Limit(gpus=0)})
    pool.settle(rules.set_quotas(pool.state, KEYS, m.SetQuotas(quotas=table)))
    ids = sweep(pool, "s", {"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]}, max_concurrent=1)
    assert pool.status(*ids) == ["queued"] * 4
    # When a pass may lend the free GPUs to jobs over quota
    borrowing = replace(LIMITS, borrowing=True)
    pool.settle(rules.schedule(pool.state, KEYS, pool.heartbeats, borrowing, NOW, m.ProcessQueue()))
    # Then one point borrows a GPU, and the sweep's other points wait for it
    assert pool.status(*ids) == ["scheduled", "queued", "queued", "queued"]
    assert pool.state.jobs[ids[0]].borrowing and pool.state.sweep_running("s") == 1
    pool.settle(rules.schedule(pool.state, KEYS, pool.heartbeats, borrowing, NOW, m.ProcessQueue()))
    assert pool.state.sweep_running("s") == 1


def test_without_a_cap_a_sweep_takes_every_free_gpu_and_its_view_names_the_best_point() -> None:
    pool = Pool({"node-a": 4})
    ids = sweep(pool, "s", {"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]}, max_concurrent=None)
    assert pool.status(*ids) == ["scheduled"] * 4
    for job_id, loss in zip(ids, [0.9, 0.5, 0.7, 0.6], strict=True):
        pool.end(job_id, "completed")
        pool.state.jobs[job_id].final = {"loss": loss, "eval_loss": loss + 0.1}
    view = sweep_view(pool.state.sweeps["s"], pool.state)
    assert view.ended and view.counts == {"completed": 4}
    assert view.best is not None and (view.best.job_id, view.best.metric) == (ids[1], "eval_loss")
    assert view.best.point == {"learning_rate": 1e-4, "lora_rank": 16}
    assert [p.eval_loss for p in view.points] == pytest.approx([1.0, 0.6, 0.8, 0.7])


@pytest.fixture
async def client(bus: Bus, tmp_path: Path, local_job: dict[str, object]) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        namespace=bus.keys.namespace, path_roots=str(tmp_path), data_dir=tmp_path / "data", max_sweep_points=8
    )
    app = create_app(settings, bus, Projection(bus, bus.redis))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost/api/v1/training"
    ) as client:
        yield client


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"grid": {}}, "grid"),
        ({"grid": {"learning_rate": []}}, "grid.learning_rate"),
        ({"grid": {"learning_rate": ["fast"]}}, "grid.learning_rate"),
        ({"grid": {"lora_rank": [8, 8.5]}}, "grid.lora_rank"),
        ({"grid": {"lora_rank": [8, 8]}}, "grid.lora_rank"),
        ({"grid": {"bogus": [1]}}, "grid.bogus"),
        ({"grid": {"extra_args": [1]}}, "grid.extra_args"),
        ({"grid": {"learning_rate": [1e-4, 2e-4, 3e-4], "lora_rank": [4, 8, 16]}}, "grid"),  # 9 > MAX_SWEEP_POINTS
        ({"grid": {"learning_rate": [{"a": 1}]}}, "grid.learning_rate.0"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": "2"}, "max_concurrent"),
        ({"job": {"task_type": "deploy", "model_path": "/m"}}, "job.task_type"),
        ({"job": {"task_type": "language_model"}}, "job.model_path"),
        ({"surprise": 1}, "surprise"),
        ({"job": {"dry_run": True}}, "job.dry_run"),
    ],
)
async def test_a_bad_sweep_is_422_naming_the_field_and_sends_nothing(
    client: httpx.AsyncClient, bus: Bus, local_job: dict[str, object], change: dict[str, object], field: str
) -> None:
    body = {"job": local_job, "grid": {"learning_rate": [1e-4, 5e-5]}, "max_concurrent": 1, **change}
    response = await client.post("/sweeps", json=body)
    assert response.status_code == 422, response.text
    assert field in {d["field"] for d in response.json()["error"]["details"]}, response.text
    assert await bus.redis.xlen(bus.keys.commands) == 0


async def test_a_sweep_is_its_record_then_a_job_per_point_in_one_append(
    client: httpx.AsyncClient, bus: Bus, local_job: dict[str, object]
) -> None:
    body = {"job": {**local_job, "name": "lr"}, "grid": {"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]}}
    response = await client.post("/sweeps", json={**body, "max_concurrent": 2})
    assert response.status_code == 202, response.text
    answer = response.json()
    commands = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.commands)]
    create, *submits = commands
    assert isinstance(create, m.CreateSweep) and create.sweep_id == answer["sweep_id"]
    assert (create.max_concurrent, create.job_ids) == (2, answer["job_ids"])
    assert [c.job_id for c in submits] == answer["job_ids"]
    assert all(isinstance(c, m.SubmitJob) and c.sweep_id == answer["sweep_id"] for c in submits)
    points = [c.point for c in submits]  # type: ignore[attr-defined]
    assert points == [
        {"learning_rate": 1e-4, "lora_rank": 8},
        {"learning_rate": 1e-4, "lora_rank": 16},
        {"learning_rate": 5e-5, "lora_rank": 8},
        {"learning_rate": 5e-5, "lora_rank": 16},
    ]
    # Each job carries its point in its parameters, and a name that says which point it is
    for command, point in zip(submits, points, strict=True):
        params = command.spec.train_params  # type: ignore[attr-defined]
        assert (params.learning_rate, params.lora_rank) == (point["learning_rate"], point["lora_rank"])
    assert submits[1].spec.name == "lr learning_rate=0.0001 lora_rank=16"  # type: ignore[attr-defined]
