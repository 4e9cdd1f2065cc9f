"""Task types and their defaults, deleting every finished job, and the system's status, through
the real gateway app and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode
from events.log import catch_up
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection
from tests.examples import GPU, LM, started


@pytest.fixture
async def api(bus: Bus, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # Given a node, a completed job, a failed one and a running one
    facts: list[m.Message] = [m.NodeJoined(node="n1", simulated=True, gpus=[GPU, GPU.model_copy(update={"index": 1})])]
    for job_id, gpu in (("done", 0), ("broken", 0), ("busy", 1)):
        facts += [
            m.JobAccepted(job_id=job_id, spec=LM, actor="alice"),
            m.JobQueued(job_id=job_id, position=1),
            m.JobScheduled(job_id=job_id, node="n1", gpu_ids=[gpu], attempt=1),
            started(job_id),
        ]
        if job_id == "done":
            facts.append(m.JobSucceeded(job_id=job_id, attempt=1, exit_code=0, run_dir="/r"))
        if job_id == "broken":
            facts.append(m.JobFailed(job_id=job_id, attempt=1, exit_code=1, reason="oom"))
    await bus.append(bus.keys.events, *facts)
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data")
    projection = Projection(bus, bus.redis)
    await catch_up(bus, projection.state)
    app = create_app(settings, bus, projection)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost/api/v1/training"
    ) as client:
        yield client


async def test_supported_types_and_their_defaults(api: httpx.AsyncClient) -> None:
    types = (await api.get("/supported-types")).json()
    assert [t["task_type"] for t in types["task_types"]] == ["multimodal", "language_model", "deploy"]
    assert types["default"] == "multimodal"
    multimodal = (await api.get("/params/default", params={"task_type": "multimodal"})).json()
    assert multimodal["priority"] == 5 and multimodal["gpu_count"] == 1
    assert multimodal["train_params"]["num_epochs"] == 1.0 and "vit_lr" in multimodal["train_params"]
    language = (await api.get("/params/default", params={"task_type": "language_model"})).json()
    assert "vit_lr" not in language["train_params"] and language["auto_export"] is True
    deploy = (await api.get("/params/default", params={"task_type": "deploy"})).json()
    assert deploy["deploy_params"]["infer_backend"] == "transformers" and "train_params" not in deploy
    bad = await api.get("/params/default", params={"task_type": "painting"})
    assert bad.status_code == 400 and bad.json()["error"]["details"][0]["field"] == "task_type"


async def test_deleting_all_finished_jobs_leaves_running_ones(api: httpx.AsyncClient, bus: Bus) -> None:
    response = await api.delete("/jobs")
    assert response.status_code == 202
    assert sorted(response.json()["deleted"]) == ["broken", "done"]
    commands = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.commands)]
    assert sorted((c.type, c.job_id) for c in commands) == [("job.delete", "broken"), ("job.delete", "done")]


async def test_system_status_shows_nodes_redis_consumers_and_jobs(api: httpx.AsyncClient, bus: Bus) -> None:
    await bus.redis.set(bus.keys.leader, "scheduler-1", px=5000)
    status = (await api.get("/system/status")).json()
    assert [(n["node"], n["up"], n["gpus"]) for n in status["nodes"]] == [("n1", True, 2)]
    assert status["scheduler"] == {"leader": "scheduler-1"}
    assert status["redis"]["streams"]["events"] == await bus.redis.xlen(bus.keys.events)
    assert status["redis"]["used_memory_bytes"] > 0
    assert status["jobs_by_status"]["running"] == 1 and status["jobs_by_status"]["completed"] == 1
    assert status["jobs_by_status"]["failed"] == 1 and status["log_position"]
    processor = (await api.get("/queue/processor/status")).json()
    assert processor["leader"] == "scheduler-1" and processor["running"] is True
    assert 0 < processor["lease_ms_left"] <= 5000


async def test_jobs_list_filters_and_pages_with_a_cursor(api: httpx.AsyncClient) -> None:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = (await api.get("/jobs", params={"size": 1, **({"cursor": cursor} if cursor else {})})).json()
        seen += [job["job_id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == ["broken", "busy", "done"] and len(seen) == 3
    assert seen == [job["job_id"] for job in (await api.get("/jobs")).json()["jobs"]]  # newest first, both ways
    assert (await api.get("/jobs", params={"task_type": "deploy"})).json()["total"] == 0
    assert (await api.get("/jobs", params={"task_type": "language_model", "priority": 5})).json()["total"] == 3
    assert (await api.get("/jobs", params={"owner": "bob"})).json()["total"] == 0
    for params in ({"priority": 11}, {"task_type": "painting"}, {"cursor": "nope"}, {"status": "asleep"}):
        response = await api.get("/jobs", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["details"][0]["field"] == next(iter(params))
