"""End to end through the real processes and the real `swift` CLI: submit a LoRA job on a tiny
model built offline, watch it live over SSE, find the merged model, and replay the log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from services.demo.tinymodel import DemoAssets, build_demo_assets
from tests.conftest import RedisServer
from tests.system import System

pytestmark = pytest.mark.e2e

TRAINING_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("demo"))


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


def job_body(assets: DemoAssets, **params: object) -> dict[str, object]:
    return {
        "task_type": "language_model",
        "model_path": str(assets.model_dir),
        "data_path": str(assets.dataset_path),
        "train_params": {
            "model_type": "qwen2",
            "template": "qwen2_5",
            "max_steps": 12,
            "logging_steps": 2,
            "save_steps": 6,
            "torch_dtype": "float32",
            "learning_rate": 0.005,
            **params,
        },
    }


def read_stream(
    url: str, until: Callable[[list[ServerSentEvent]], bool], last_event_id: str | None = None
) -> list[ServerSentEvent]:
    """Events with an id from an SSE stream, until ``until`` holds for what was read."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    events: list[ServerSentEvent] = []
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=60)) as client,
        connect_sse(client, "GET", url, headers=headers) as source,
    ):
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if sse.data:  # pings and the retry hint are comments: no data, and no event of their own
                events.append(sse)
                if until(events):
                    return events
            assert time.monotonic() < deadline, f"stream stalled after {[e.event for e in events]}"
    raise AssertionError(f"stream ended after {[e.event for e in events]}")


def seen(event_type: str) -> Callable[[list[ServerSentEvent]], bool]:
    return lambda events: any(e.event == event_type for e in events)


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
