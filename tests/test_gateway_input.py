"""Bad input gets a clear 4xx JSON error naming the field, and nothing reaches the log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.bodies import MAX_BODY_BYTES
from services.gateway.projection import Projection
from services.gateway.submit import SwiftFlags
from tests.examples import GPU, LM, started


@pytest.fixture(scope="session")
def swift_flags(tmp_path_factory: pytest.TempPathFactory) -> SwiftFlags:
    """The installed ms-swift's flags, read once for the session (importing ms-swift is slow)."""
    return SwiftFlags(tmp_path_factory.mktemp("swift-flags"))


@pytest.fixture
async def client(bus: Bus, tmp_path: Path, swift_flags: SwiftFlags) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(namespace=bus.keys.namespace, path_roots=str(tmp_path), data_dir=tmp_path / "data")
    app = create_app(settings, bus, Projection(bus, bus.redis), swift_flags)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost/api/v1/training") as client:
        yield client


@pytest.fixture
def valid(local_job: dict[str, object]) -> dict[str, object]:
    return local_job


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
        ({"preemptible": "yes"}, "preemptible"),
        ({"preemptible": 1}, "preemptible"),
        ({"hold": "true"}, "hold"),
        ({"nodes": "2"}, "nodes"),
        ({"nodes": 1.5}, "nodes"),
        ({"nodes": True}, "nodes"),
        ({"nodes": 0}, "nodes"),
        ({"nodes": 100_000}, "nodes"),
        ({"hub": "github"}, "hub"),
        ({"depends_on": ["no-such-job"]}, "depends_on.0"),
        ({"depends_on": ["../etc"]}, "depends_on.0"),
        ({"depends_on": "abc"}, "depends_on"),
        ({"depends_on": ["a1", "a1"]}, "depends_on"),
        ({"depends_on": [f"j{i}" for i in range(65)]}, "depends_on"),
        ({"dependency": "afterwards"}, "dependency"),
        ({"notify": {"url": "http://127.0.0.1:9000/hook"}}, "notify.url"),  # loopback: ALLOW_LOOPBACK_WEBHOOKS off
        ({"notify": {"url": "http://localhost/hook"}}, "notify.url"),
        ({"notify": {"url": "https://example.org/hook", "events": ["job.exploded"]}}, "notify.events.0"),
        ({"notify": {"url": "https://example.org/hook", "format": "teams"}}, "notify.format"),
        ({"notify": "https://example.org/hook"}, "notify"),
        ({"hub": ""}, "hub"),
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
    ("setting", "given", "stored", "use_hf"),
    [
        ("modelscope", None, "modelscope", "0"),
        ("huggingface", None, "huggingface", "1"),
        ("modelscope", "huggingface", "huggingface", "1"),
        ("huggingface", "modelscope", "modelscope", "0"),
    ],
)
async def test_a_job_is_stored_with_its_hub_or_the_model_hub_setting_and_runs_with_it(
    bus: Bus, tmp_path: Path, swift_flags: SwiftFlags, setting: str, given: str | None, stored: str, use_hf: str
) -> None:
    settings = load_settings(
        namespace=bus.keys.namespace, path_roots=str(tmp_path), data_dir=tmp_path / "data", model_hub=setting
    )
    app = create_app(settings, bus, Projection(bus, bus.redis), swift_flags)
    body = {"task_type": "language_model", "model_path": "Qwen/Qwen2.5-7B-Instruct", "data_path": "org/set#20"}
    if given is not None:
        body["hub"] = given
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
        dry = await client.post("/api/v1/training/jobs", json={**body, "dry_run": True})
        assert dry.status_code == 200, dry.text
        # The command runs with the hub chosen, whatever USE_HF the runner's environment holds
        assert dry.json()["env"]["USE_HF"] == use_hf
        accepted = await client.post("/api/v1/training/jobs", json=body)
    assert accepted.status_code == 202, accepted.text
    (entry,) = await bus.redis.xrange(bus.keys.commands)
    assert decode(entry[1]).spec.hub == stored  # the record says where its ids come from


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


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_path": "/etc"}, "model_path"),
        ({"output_dir": "/var/tmp/elsewhere"}, "output_dir"),
        ({"output_dir": "../../elsewhere"}, "output_dir"),  # relative to DATA_DIR, then out of the roots
        ({"train_params": {"extra_args": {"no_such_flag": 1}}}, "train_params.extra_args.no_such_flag"),
        ({"train_params": {"extra_args": {"learning_rate": 1}}}, "train_params.extra_args.learning_rate"),
        ({"train_params": {"extra_args": {"use_hf": True}}}, "train_params.extra_args.use_hf"),
        ({"train_params": {"extra_args": {"--lora_dropout": 0.1}}}, "train_params.extra_args"),
        ({"train_params": {"extra_args": {"lora_dropout": "0.1\n--deepspeed"}}}, "train_params.extra_args"),
    ],
)
async def test_paths_outside_the_roots_and_unknown_or_clashing_flags_are_refused(
    client: httpx.AsyncClient, bus: Bus, valid: dict[str, object], change: dict[str, object], field: str
) -> None:
    response = await client.post("/jobs", json={**valid, **change})
    assert response.status_code == 422, response.text
    assert field in fields_of(response)
    assert await bus.redis.xlen(bus.keys.commands) == 0


async def test_a_dry_run_shows_the_exact_command_and_submits_nothing(
    client: httpx.AsyncClient, bus: Bus, valid: dict[str, object], tmp_path: Path
) -> None:
    body = {
        **valid,
        "gpu_count": 2,
        "output_dir": str(tmp_path / "out"),
        "train_params": {"train_type": "full", "max_steps": 7, "extra_args": {"lora_dropout": 0.1, "seed": 7}},
        "dry_run": True,
    }
    response = await client.post("/jobs", json=body)
    assert response.status_code == 200, response.text
    command = response.json()
    argv = command["argv"]
    assert argv[1] == "sft" and argv[argv.index("--output_dir") + 1] == str(tmp_path / "out")
    assert argv[argv.index("--tuner_type") + 1] == "full" and "--lora_rank" not in argv
    assert argv[-2:] == ["--lora_dropout=0.1", "--seed=7"]
    assert command["env"]["NPROC_PER_NODE"] == "2" and command["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert await bus.redis.xlen(bus.keys.commands) == 0


async def test_a_deploy_of_a_job_without_an_exported_model_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", json={"task_type": "deploy", "source_job_id": "nope"})
    assert response.status_code == 422 and fields_of(response) == {"source_job_id"}
    response = await client.post("/jobs", json={"task_type": "deploy"})
    assert response.status_code == 422


async def test_an_export_asked_for_while_one_is_under_way_is_409_and_sends_nothing(
    bus: Bus, tmp_path: Path, swift_flags: SwiftFlags
) -> None:
    # Given a completed LoRA job whose export is running
    projection = Projection(bus, bus.redis)
    facts: list[m.Message] = [
        m.NodeJoined(node="n1", simulated=True, gpus=[GPU]),
        m.JobAccepted(job_id="done", spec=LM, actor="anonymous"),
        m.JobQueued(job_id="done", position=1),
        m.JobScheduled(job_id="done", node="n1", gpu_ids=[0], attempt=1),
        started("done", 1, "n1", "0"),
        m.JobSucceeded(job_id="done", attempt=1, exit_code=0, run_dir="/r", last_checkpoint="/r/checkpoint-5"),
        m.ExportRequested(job_id="done", checkpoint="/r/checkpoint-5", output_dir="/r/checkpoint-5-merged"),
        m.ExportStarted(job_id="done", argv=["swift", "export"]),
    ]
    for i, fact in enumerate(facts, start=1):
        projection.state.apply(f"1-{i}", fact)
    settings = load_settings(namespace=bus.keys.namespace, path_roots=str(tmp_path), data_dir=tmp_path / "data")
    transport = httpx.ASGITransport(app=create_app(settings, bus, projection, swift_flags))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost/api/v1/training") as client:
        # When the export is asked for again
        response = await client.post("/jobs/done/export")
        # Then it is refused, saying why, and no command is sent
        assert response.status_code == 409, response.text
        assert "being exported already" in response.json()["error"]["message"]
        assert await bus.redis.xlen(bus.keys.commands) == 0
        # But once that export ended, the job may be exported again
        projection.state.apply("1-99", m.ExportCompleted(job_id="done", path="/r/checkpoint-5-merged"))
        assert (await client.post("/jobs/done/export")).status_code == 202
