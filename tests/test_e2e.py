"""End to end through the real processes and the real `swift` CLI: submit a LoRA job on a tiny
model built offline, watch it live over SSE, find the merged model, and replay the log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer
from tests.system import System, job_body, read_stream, seen

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    system = System(redis_server.url, tmp_path_factory.mktemp("system"))
    system.start()
    try:
        system.wait_healthy()
        yield system
    finally:
        codes = system.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}"


def test_a_lora_job_trains_live_exports_and_replays(system: System, assets: DemoAssets) -> None:
    # Given the system running on simulated GPUs
    # When a LoRA job on the tiny model is submitted
    response = httpx.post(f"{system.base}/jobs", json=job_body(assets))
    assert response.status_code == 202, response.text
    created = response.json()
    job_id = created["job_id"]
    assert created["status"] in ("queued", "scheduled", "running")
    # Then its stream shows the whole life of the job, in order
    events = read_stream(f"{system.base}/jobs/{job_id}/stream", seen("export.completed"))
    types = [e.event for e in events]
    expected = [
        "job.accepted",
        "job.queued",
        "job.scheduled",
        "job.started",
        "job.progress",
        "job.succeeded",
        "export.requested",
        "export.started",
        "export.completed",
    ]
    positions = [types.index(t) for t in expected]
    assert positions == sorted(positions), types
    progress = [json.loads(e.data)["payload"] for e in events if e.event == "job.progress"]
    assert progress and all(p["step"] >= 1 and p["max_steps"] == 12 for p in progress)
    assert any(p["loss"] is not None for p in progress)
    assert progress[-1]["step"] == 12 and progress[-1]["percent"] == 100.0
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)

    # And the merged model is on disk
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["export"]["status"] == "completed"
    merged = Path(job["export"]["path"])
    assert (merged / "config.json").is_file()
    assert any(merged.glob("*.safetensors"))
    assert job["last_checkpoint"].endswith("checkpoint-12")
    logs = httpx.get(f"{system.base}/jobs/{job_id}/logs", params={"tail": 50}).json()["lines"]
    assert any("last_model_checkpoint" in line["line"] for line in logs)

    # And replaying the log rebuilds what the API shows
    replayed = json.loads(system.cli("replay", "--state", "--job", job_id))
    assert replayed == {k: v for k, v in job.items() if k in replayed}
    assert set(job) - set(replayed) == {"queue_position", "task_type"}
    lines = [json.loads(line) for line in system.cli("replay", "--job", job_id).splitlines()]
    assert [line["entry_id"] for line in lines] == ids
    assert [line["type"] for line in lines] == types


def test_a_reconnect_with_last_event_id_resumes_exactly_after_it(system: System, assets: DemoAssets) -> None:
    # Given a job being watched live
    body = job_body(assets, max_steps=8, save_steps=4)
    body["auto_export"] = False
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    url = f"{system.base}/jobs/{job_id}/stream"
    first = read_stream(url, seen("job.progress"))
    # When the browser drops the connection and reconnects with the last id it saw, while the job
    # keeps training
    rest = read_stream(url, seen("job.succeeded"), last_event_id=first[-1].id)
    # Then it gets exactly the events after that id: no gap, no repeat
    history = httpx.get(f"{system.base}/jobs/{job_id}/events").json()["events"]
    assert [e.id for e in first + rest] == [e["entry_id"] for e in history]
    # And a reconnect from the middle of the history also resumes right after that id
    middle = history[len(history) // 2]["entry_id"]
    again = read_stream(url, seen("job.succeeded"), last_event_id=middle)
    assert [e.id for e in again] == [e["entry_id"] for e in history[len(history) // 2 + 1 :]]


def test_a_deploy_job_serves_an_openai_api_until_cancelled(system: System, assets: DemoAssets) -> None:
    # Given a deploy job of the tiny model
    body = {
        "task_type": "deploy",
        "model_path": str(assets.model_dir),
        "deploy_params": {"model_type": "qwen2", "template": "qwen2_5", "served_model_name": "tiny"},
    }
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    url = f"{system.base}/jobs/{job_id}/stream"
    events = read_stream(url, seen("job.serving"))
    # Then it serves an OpenAI-compatible API at the endpoint it reports
    endpoint = json.loads(events[-1].data)["payload"]["endpoint"]
    assert httpx.get(f"{endpoint}/models").json()["data"][0]["id"] == "tiny"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "What is 2 plus 2?"}], "max_tokens": 4}
    answer = httpx.post(f"{endpoint}/chat/completions", json=chat, timeout=60).json()
    assert answer["usage"]["completion_tokens"] >= 1
    # And cancelling it stops the server and frees its GPU
    assert httpx.post(f"{system.base}/jobs/{job_id}/cancel").status_code == 202
    read_stream(url, seen("job.cancelled"), last_event_id=events[-1].id)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{endpoint}/models", timeout=2)
    gpus = httpx.get(f"{system.base}/gpus").json()["nodes"][0]["gpus"]
    assert all(gpu["held_by"] is None for gpu in gpus)
