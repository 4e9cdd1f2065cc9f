"""Bad input gets a clear 4xx JSON error naming the field, and nothing reaches the log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from events.bus import Bus
from services.config import load_settings
from services.gateway.app import MAX_BODY_BYTES, create_app
from services.gateway.projection import Projection


@pytest.fixture
async def client(bus: Bus) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(namespace=bus.keys.namespace)
    app = create_app(settings, bus, Projection(bus, bus.redis))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway/api/v1/training") as client:
        yield client


@pytest.fixture
def valid(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    return {
        "task_type": "language_model",
        "model_path": str(tmp_path / "model"),
        "data_path": str(tmp_path / "train.jsonl"),
    }


def fields_of(response: httpx.Response) -> set[str]:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"])
    return {d["field"] for d in body["error"]["details"]}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"task_type": "painting"}, "task_type"),
        ({"priority": 11}, "priority"),
        ({"priority": -1}, "priority"),
        ({"model_path": None}, "model_path"),
        ({"model_path": "/no/such/model"}, "model_path"),
        ({"data_path": "../../etc/../secret"}, "data_path"),
        ({"model_path": "-rf/evil"}, "model_path"),
        ({"gpu_count": 0}, "gpu_count"),
        ({"train_params": {"learning_rate": "fast"}}, "train_params.learning_rate"),
        ({"train_params": {"bogus": 1}}, "train_params.bogus"),
        ({"train_params": {"model_type": "qwen2 --deepspeed zero3"}}, "train_params.model_type"),
        ({"surprise": True}, "surprise"),
    ],
)
async def test_invalid_jobs_are_422_naming_the_field_and_log_nothing(
    client: httpx.AsyncClient, bus: Bus, valid: dict[str, object], change: dict[str, object], field: str
) -> None:
    body = {**valid, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = await client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert field in fields_of(response)
    assert await bus.redis.xlen(bus.keys.commands) == 0
    assert await bus.redis.xlen(bus.keys.events) == 0


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b"[1, 2]", 422, "validation_error"),
        (b"x" * (MAX_BODY_BYTES + 1), 413, "payload_too_large"),
    ],
)
async def test_bodies_that_are_not_a_job_object_are_refused(
    client: httpx.AsyncClient, bus: Bus, content: bytes, status: int, code: str
) -> None:
    response = await client.post("/jobs", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert fields_of(response) <= {"body"}
    assert await bus.redis.xlen(bus.keys.commands) == 0


async def test_unknown_jobs_and_bad_query_parameters_are_clear_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/jobs/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert (await client.post("/jobs/nope/cancel")).status_code == 404
    bad_status = await client.get("/jobs", params={"status": "sleeping"})
    assert bad_status.status_code == 400 and fields_of(bad_status) == {"status"}
    bad_size = await client.get("/jobs", params={"size": "0"})
    assert bad_size.status_code == 400 and fields_of(bad_size) == {"size"}
    no_route = await client.get("/nowhere")
    assert no_route.status_code == 404 and no_route.json()["error"]["code"] == "not_found"
    wrong_method = await client.delete("/queue")
    assert wrong_method.status_code == 405


async def test_a_hub_reference_is_accepted_as_is(client: httpx.AsyncClient, bus: Bus, valid: dict[str, object]) -> None:
    body = {**valid, "model_path": "Qwen/Qwen2.5-7B-Instruct", "data_path": "AI-ModelScope/coco#20000"}
    response = await client.post("/jobs", json=body)
    # Nobody is scheduling in this test: the job is accepted and waits for a decision.
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    assert await bus.redis.xlen(bus.keys.commands) == 1


@pytest.mark.parametrize(
    "change",
    [{"model_path": "~no-such-user-here/model"}, {"model_path": "/" + "a" * 300}, {"data_path": "./bad\u0000name"}],
)
async def test_odd_paths_are_422_not_500(
    client: httpx.AsyncClient, valid: dict[str, object], change: dict[str, object]
) -> None:
    response = await client.post("/jobs", json={**valid, **change})
    assert response.status_code == 422, response.text
    assert set(change) <= fields_of(response)


async def test_a_deeply_nested_body_is_400_not_500(client: httpx.AsyncClient) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    response = await client.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 413)


@pytest.mark.parametrize("last_id", ["abc", "1--1", "1_000-0", "99999999999999999999-0", "-1-0"])
async def test_a_bad_last_event_id_is_400_before_the_stream_starts(
    client: httpx.AsyncClient, bus: Bus, valid: dict[str, object], last_id: str
) -> None:
    from events.messages import JobAccepted
    from events.params import LanguageModelJob

    projection = client._transport.app.state.projection  # type: ignore[attr-defined]
    projection.state.apply("5-0", JobAccepted(job_id="j", spec=LanguageModelJob(**valid)))
    response = await client.get("/jobs/j/stream", headers={"Last-Event-ID": last_id})
    assert response.status_code == 400
    assert fields_of(response) == {"Last-Event-ID"}
