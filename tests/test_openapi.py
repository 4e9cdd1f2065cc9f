"""The OpenAPI document describes every route the gateway serves, validates as OpenAPI 3.1, and
the interactive docs come with their assets from the gateway itself, open without a key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from events import messages as m
from events.bus import Bus
from events.keys import SCHEDULER_GROUP
from events.log import catch_up
from events.quotas import Limit, Quotas
from services.config import load_settings
from services.gateway import openapi
from services.gateway.app import create_app
from services.gateway.projection import Projection
from tests.examples import DEPLOY, GPU, LM, SAMPLE, started

KEYS = "root:admin:root-key-0123456789ab"


@pytest.fixture
async def gateway(bus: Bus, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", api_keys=KEYS)
    app = create_app(settings, bus, Projection(bus, bus.redis))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        yield client, app


def served(routes: list[object], prefix: str = "") -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            found |= served(list(route.routes), prefix + route.path)
        elif isinstance(route, Route) and route.include_in_schema:  # not the docs, nor the dashboard
            found |= {(method.lower(), prefix + route.path) for method in route.methods or () if method != "HEAD"}
    return found


async def test_the_document_is_valid_and_covers_every_route(gateway: tuple[httpx.AsyncClient, object]) -> None:
    client, app = gateway
    response = await client.get("/openapi.json")  # open: no key
    assert response.status_code == 200
    document = response.json()
    validate(document)
    described = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert described == served(app.routes)  # type: ignore[attr-defined]
    created = document["paths"]["/api/v1/training/jobs"]["post"]
    assert created["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert "422" in created["responses"] and "401" in created["responses"]
    spec = document["components"]["schemas"]["LanguageModelJob"]
    assert {"model_path", "data_path", "train_params", "priority"} <= set(spec["properties"])


async def test_the_docs_and_their_assets_are_served_offline_without_a_key(
    gateway: tuple[httpx.AsyncClient, object],
) -> None:
    client, _ = gateway
    page = await client.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    for asset in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        response = await client.get(f"/docs/assets/{asset}")
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert (await client.get("/api/v1/training/jobs")).status_code == 401


def test_every_success_body_is_typed() -> None:
    """No 2xx JSON answer is a bare object: each names a component that lists its properties (or
    its alternatives), and no schema anywhere is an object of unknown shape. Streams are SSE."""
    document = openapi.document("/api/v1")
    schemas = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith("2"):
                    continue
                [(media, content)] = response["content"].items()
                if path.endswith("/stream"):
                    assert media == "text/event-stream", (method, path)
                    continue
                assert media == "application/json", (method, path)
                name = content["schema"]["$ref"].removeprefix("#/components/schemas/")
                assert {"properties", "oneOf", "anyOf"} & set(schemas[name]), (method, path, status)

    def untyped(node: object) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "object" and not {"properties", "additionalProperties", "$ref"} & set(node):
                return True
            if node.get("additionalProperties") is True:  # a map of anything
                return True
            return any(untyped(value) for value in node.values())
        return isinstance(node, list) and any(untyped(value) for value in node)

    assert not [name for name, schema in schemas.items() if untyped(schema)]


def test_the_job_forms_find_their_schemas() -> None:
    """The dashboard's form takes the first component whose task_type names the task type."""
    schemas = openapi.document("/api/v1")["components"]["schemas"]
    for task_type, name in (
        ("language_model", "LanguageModelJob"),
        ("multimodal", "MultiModalJob"),
        ("deploy", "DeployJob"),
    ):
        found = next(
            key
            for key, schema in schemas.items()
            if (tag := schema.get("properties", {}).get("task_type"))
            and (tag.get("const") == task_type or task_type in tag.get("enum", []))
        )
        assert found == name


@pytest.fixture
async def lived(bus: Bus, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Projection]]:
    """A gateway over a log with a job in every state, output lines, heartbeats and a leader."""
    gpus = [GPU.model_copy(update={"index": i, "uuid": f"GPU-{i}"}) for i in range(3)]
    lm = LM.model_copy(update={"train_params": LM.train_params.model_copy(update={"max_steps": 20})})
    facts: list[m.Message] = [m.NodeJoined(node="n1", simulated=True, gpus=gpus)]

    def accepted(job_id: str, spec: object = lm) -> list[m.Message]:
        return [m.JobAccepted(job_id=job_id, spec=spec, actor="root")]

    def placed(job_id: str, gpu: int) -> list[m.Message]:
        return [
            m.JobQueued(job_id=job_id, position=1),
            m.JobScheduled(job_id=job_id, node="n1", gpu_ids=[gpu], attempt=1),
            started(job_id, 1, "n1", str(gpu)),
        ]

    facts += [*accepted("running"), *placed("running", 0)]
    facts += [m.JobProgress(job_id="running", attempt=1, step=2, max_steps=20, percent=10.0, loss=1.5)]
    facts += [m.CheckpointSaved(job_id="running", attempt=1, step=2, path="/r/checkpoint-2")]
    facts += [*accepted("done"), *placed("done", 1)]
    facts += [
        m.JobSucceeded(job_id="done", attempt=1, exit_code=0, run_dir="/r", last_checkpoint="/r/checkpoint-20"),
        m.ExportRequested(job_id="done", checkpoint="/r/checkpoint-20", output_dir="/r/merged"),
        m.ExportStarted(job_id="done", argv=["swift", "export"]),
        m.ExportCompleted(job_id="done", path="/r/merged"),
    ]
    facts += [*accepted("suspended"), *placed("suspended", 1), m.JobSuspended(job_id="suspended", attempt=1)]
    facts += [*accepted("serving", DEPLOY), *placed("serving", 2)]
    facts += [m.JobServing(job_id="serving", attempt=1, endpoint="http://127.0.0.1:9000/v1")]
    facts += [*accepted("held", lm.model_copy(update={"hold": True})), m.JobHeld(job_id="held")]
    facts += [*accepted("queued"), m.JobQueued(job_id="queued", position=1)]
    facts += [*accepted("wide", lm.model_copy(update={"gpu_count": 3})), m.JobQueued(job_id="wide", position=2)]
    facts += [*accepted("broken"), m.JobRejected(job_id="broken", reason="unsatisfiable", message="no such GPU")]
    facts += [*accepted("gone"), m.JobRejected(job_id="gone", reason="unsatisfiable", message="x")]
    facts += [m.JobDeleted(job_id="gone")]
    grid: dict[str, list[m.ExtraValue]] = {"learning_rate": [1e-4, 5e-5]}
    facts += [m.SweepCreated(sweep_id="sweep", grid=grid, max_concurrent=1, job_ids=["done", "queued"], actor="root")]
    await bus.append(bus.keys.events, *facts[:4])
    await bus.redis.xadd(bus.keys.events, {"type": "job.progress", "job_id": "running", "data": "not json"})
    await bus.append(bus.keys.events, *facts[4:])
    for fd, line in (("stdout", "step 1"), ("stderr", "warning"), ("export", "merged")):
        await bus.redis.xadd(bus.keys.logs("running"), {"fd": fd, "line": line})
    await bus.redis.set(bus.keys.leader, "scheduler-1", px=5000)
    await bus.redis.set(bus.keys.fence, "3")
    await bus.redis.xgroup_create(bus.keys.commands, SCHEDULER_GROUP, id="0", mkstream=True)
    settings = load_settings(
        namespace=bus.keys.namespace,
        data_dir=tmp_path / "data",
        api_keys=f"{KEYS},bob:user:bob-key-0123456789ab",
        submit_wait_s=0,
    )
    projection = Projection(bus, bus.redis)
    await catch_up(bus, projection.state)
    projection.heartbeats["n1"] = m.NodeHeartbeat(node="n1", simulated=True, gpus=[SAMPLE])
    app = create_app(settings, bus, projection, swift_flags=None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"Authorization": "Bearer root-key-0123456789ab"},
    ) as client:
        yield client, projection


async def test_real_bodies_match_the_document(lived: tuple[httpx.AsyncClient, Projection]) -> None:
    """Every operation answers, with every success status it documents, a body its schema
    accepts; errors too. (The generated requests of test_schemathesis mostly meet no job.)"""
    client, projection = lived
    document = (await client.get("/openapi.json")).json()
    seen: set[tuple[str, str, int]] = set()

    async def check(method: str, template: str, status: int, **kwargs: Any) -> dict[str, Any]:
        path = template.format(**kwargs.pop("ids", {}))
        response = await client.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        operation = document["paths"][template][method.lower()]
        assert str(status) in operation["responses"], (method, template, status)
        schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
        validator = Draft202012Validator(
            {**schema, "components": document["components"]}, format_checker=Draft202012Validator.FORMAT_CHECKER
        )
        errors = list(validator.iter_errors(response.json()))
        assert not errors, (method, path, status, [f"{list(e.absolute_path)}: {e.message}" for e in errors][:5])
        seen.add((method.lower(), template, status))
        return response.json()  # type: ignore[no-any-return]

    api = "/api/v1/training"
    job, queue = f"{api}/jobs/{{job_id}}", f"{api}/queue/{{job_id}}"
    assert (await check("GET", f"{api}/health", 503))["status"] == "degraded"
    for service in ("gateway", "scheduler", "gpu-monitor", "runner", "exporter"):
        beat = m.ServiceHeartbeat(service=service, instance="h-1", started_at=m.utcnow(), interval_s=60)
        projection.services[(service, "h-1")] = beat
    projection.ready.set()
    assert (await check("GET", f"{api}/health", 200))["missing"] == []
    listing = await check("GET", f"{api}/jobs", 200, params={"size": 3})
    assert listing["next_cursor"] and len(listing["jobs"]) == 3
    for job_id in ("running", "done", "suspended", "serving", "held", "queued", "wide", "broken"):
        ids = {"job_id": job_id}
        await check("GET", job, 200, ids=ids)
        await check("GET", f"{job}/progress", 200, ids=ids)
        await check("GET", f"{job}/logs", 200, ids=ids)
        await check("GET", f"{job}/events", 200, ids=ids)
        await check("GET", f"{job}/timeline", 200, ids=ids)
        await check("GET", f"{job}/command", 200, ids=ids)
        await check("GET", f"{queue}/status", 200, ids=ids)
    events = (await check("GET", f"{job}/events", 200, ids={"job_id": "running"}))["events"]
    assert any("undecodable" in event for event in events)
    timeline = (await check("GET", f"{job}/timeline", 200, ids={"job_id": "running"}))["timeline"]
    assert any(item["text"].startswith("unreadable") for item in timeline)
    assert len((await check("GET", f"{job}/logs", 200, ids={"job_id": "running"}))["lines"]) == 3
    entries = (await check("GET", f"{api}/queue", 200))["queue"]
    assert [e["job_id"] for e in entries] == ["queued", "wide"] and entries[1]["estimated_start_at"] is None
    assert (await check("GET", f"{queue}/status", 200, ids={"job_id": "queued"}))["queued"] is True
    nodes = (await check("GET", f"{api}/gpus", 200))["nodes"]
    assert [("memory_used_mb" in gpu, gpu["held_by"]) for gpu in nodes[0]["gpus"]] == [
        (True, "running"),
        (False, None),
        (False, "serving"),
    ]
    assert (await check("GET", f"{api}/system/status", 200))["consumer_groups"]
    await check("GET", f"{api}/queue/processor/status", 200)
    await check("GET", f"{api}/supported-types", 200)
    for task_type in ("multimodal", "language_model", "deploy"):
        await check("GET", f"{api}/params/default", 200, params={"task_type": task_type})
    await check("GET", "/api/v1/audit/events", 200, params={"limit": 5})
    await check("GET", "/api/v1/audit/state", 200)
    await check("GET", "/api/v1/auth/me", 200)
    await check("POST", "/api/v1/auth/token", 200)
    await check("DELETE", "/api/v1/auth/token", 200)

    # Commands, each on a job in a state it applies to
    spec = {
        "task_type": "language_model",
        "model_path": "Qwen/Qwen2.5-7B-Instruct",
        "data_path": "AI-ModelScope/coco#20",
    }
    assert (await check("POST", f"{api}/jobs", 200, json={**spec, "dry_run": True}))["dry_run"] is True
    assert (await check("POST", f"{api}/jobs", 202, json=spec))["status"] == "pending"
    await check("POST", f"{job}/suspend", 202, ids={"job_id": "running"})
    await check("POST", f"{job}/resume", 202, ids={"job_id": "suspended"})
    await check("POST", f"{job}/cancel", 202, ids={"job_id": "running"})
    await check("POST", f"{job}/stop", 202, ids={"job_id": "serving"})
    await check("POST", f"{job}/start", 202, ids={"job_id": "held"})
    assert (await check("POST", f"{job}/export", 202, ids={"job_id": "done"}))["status"] == "completed"
    await check("PATCH", queue, 202, ids={"job_id": "queued"}, json={"priority": 9})
    await check("DELETE", queue, 202, ids={"job_id": "wide"})
    await check("DELETE", job, 202, ids={"job_id": "broken"})
    await check("POST", f"{api}/queue/process", 202)
    sweep = await check("GET", f"{api}/sweeps/{{sweep_id}}", 200, ids={"sweep_id": "sweep"})
    assert [p["status"] for p in sweep["points"]] == ["completed", "queued"] and sweep["best"] is None
    assert (await check("GET", f"{api}/sweeps", 200))["total"] == 1
    await check("POST", f"{api}/sweeps/{{sweep_id}}/cancel", 202, ids={"sweep_id": "sweep"})
    started = await check("POST", f"{api}/sweeps", 202, json={"job": spec, "grid": {"lora_rank": [8, 16]}})
    assert started["points"] == 2
    await check("POST", f"{api}/sweeps", 422, json={"job": spec, "grid": {}})
    await check("GET", f"{api}/sweeps/{{sweep_id}}", 404, ids={"sweep_id": "nope"})
    assert (await check("DELETE", f"{api}/jobs", 202))["count"] == 2
    assert (await check("GET", "/api/v1/admin/quotas", 200))["known_users"] == ["bob", "root"]
    assert (await check("PUT", "/api/v1/admin/quotas", 200, json={}))["applied"] is True  # the table in force
    table = {"users": {"root": {"gpus": 1}}}
    assert (await check("PUT", "/api/v1/admin/quotas", 202, json=table))["applied"] is False  # no scheduler here
    assert [row["name"] for row in (await check("GET", "/api/v1/usage", 200))["users"]] == ["bob", "root"]

    # Errors have the one shape
    await check("GET", job, 404, ids={"job_id": "gone"})
    await check("GET", job, 404, ids={"job_id": "nobody"})
    await check("POST", f"{job}/cancel", 409, ids={"job_id": "broken"})
    await check("PATCH", queue, 422, ids={"job_id": "queued"}, json={"priority": 11})
    await check(
        "PATCH", queue, 400, ids={"job_id": "queued"}, content=b"{", headers={"Content-Type": "application/json"}
    )
    await check("POST", f"{api}/jobs", 422, json={"task_type": "deploy"})
    await check("POST", f"{api}/jobs", 413, content=b" " * (1024 * 1024 + 1))
    await check("GET", f"{job}/logs", 400, ids={"job_id": "running"}, params={"tail": "0"})
    await check("GET", f"{api}/jobs", 401, headers={"Authorization": "Bearer wrong-key-0123456789"})
    await check("GET", "/api/v1/audit/state", 403, headers={"Authorization": "Bearer bob-key-0123456789ab"})
    await check("POST", f"{job}/suspend", 409, ids={"job_id": "serving"})
    await check("PUT", "/api/v1/admin/quotas", 422, json={"users": {"carol": {"gpus": 1}}})
    await check("PUT", "/api/v1/admin/quotas", 403, json={}, headers={"Authorization": "Bearer bob-key-0123456789ab"})
    projection.state.quotas = Quotas(users={"root": Limit(queued=0)})
    assert (await check("POST", f"{api}/jobs", 429, json=spec))["error"]["code"] == "quota_exceeded"

    documented = {
        (method, path, int(status))
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        for status, response in operation["responses"].items()
        if "application/json" in response["content"] and (status.startswith("2") or operation.get("security") == [])
    }
    assert documented <= seen, sorted(documented - seen)
