"""End to end through the real processes and the real `swift` CLI: submit a LoRA job on a tiny
model built offline, watch it live over SSE, find the merged model, and replay the log."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import connect_sse

from events import messages as m
from events.bus import Bus
from events.keys import Keys
from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer
from tests.system import System, finish, job_body, read_stream, running, seen, steps

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("system"), clean_exits=True) as system:
        yield system


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
    assert set(job) - set(replayed) == {"queue_position", "task_type", "suspendable", "resumable", "waiting_on"}
    lines = [json.loads(line) for line in system.cli("replay", "--job", job_id).splitlines()]
    assert [line["entry_id"] for line in lines] == ids
    assert [line["type"] for line in lines] == types
    # And every invariant of the log holds, the gateway's state equal to its fold
    state_url = system.base.replace("/training", "/audit/state")
    assert system.cli("audit", "check", "--gateway", state_url).startswith("ok: every invariant holds")


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
    # And the stream of all events, filtered to this job, replays the same from the start
    everything = read_stream(f"{system.base}/events/stream?since=0-0&job_id={job_id}", seen("job.succeeded"))
    assert [e.id for e in everything] == [e["entry_id"] for e in history]


def test_a_jobs_output_lines_stream_live_and_resume_without_gaps(system: System, assets: DemoAssets) -> None:
    # Given a job whose output is followed live, from its next line on
    body = {**job_body(assets, max_steps=8, save_steps=4), "auto_export": False}
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    url = f"{system.base}/jobs/{job_id}/logs/stream?tail=0"
    first = read_stream(url, lambda lines: len(lines) >= 3)
    # When the browser reconnects with the last line it saw, while the job goes on
    done = lambda lines: any("last_model_checkpoint" in json.loads(e.data)["line"] for e in lines)  # noqa: E731
    rest = read_stream(url, done, last_event_id=first[-1].id)
    # Then the lines it got are exactly the job's lines from where it started, in order, once each
    stored = [line["entry_id"] for line in httpx.get(f"{system.base}/jobs/{job_id}/logs?tail=10000").json()["lines"]]
    start = stored.index(first[0].id)
    got = [e.id for e in first + rest]
    assert got == stored[start : start + len(got)]
    assert all(e.event == "log" and {"fd", "line"} == set(json.loads(e.data)) for e in first + rest)


def test_the_all_events_stream_delivers_live_events_by_type(system: System, assets: DemoAssets) -> None:
    # Given a browser following every job.accepted from now on
    url = f"{system.base}/events/stream?type=job.acc*"
    events, ids = [], []
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, connect_sse(client, "GET", url) as source:
        for sse in source.iter_sse():
            if sse.retry is not None and not ids:
                # When, once the stream is open, two jobs are submitted
                ids = [httpx.post(f"{system.base}/jobs", json=job_body(assets)).json()["job_id"] for _ in range(2)]
            elif sse.data:
                events.append(sse)
                if len(events) == 2:
                    break
    # Then both acceptances arrive, and nothing else
    assert [(e.event, json.loads(e.data)["job_id"]) for e in events] == [("job.accepted", i) for i in ids]
    for job_id in ids:
        httpx.post(f"{system.base}/jobs/{job_id}/cancel")


def test_a_deploy_of_a_trained_model_serves_an_openai_api_until_cancelled(system: System, assets: DemoAssets) -> None:
    # Given a LoRA job trained and merged
    source, _ = finish(system, job_body(assets, max_steps=4, save_steps=4), until="export.completed")
    # When its exported model is deployed
    body = {"task_type": "deploy", "source_job_id": source, "deploy_params": {"served_model_name": "tiny"}}
    job_id, events = finish(system, body, until="job.serving")
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert job["spec"]["model_path"] == httpx.get(f"{system.base}/jobs/{source}").json()["export"]["path"]
    # Then it serves an OpenAI-compatible API at the endpoint it reports, on a port of the pool
    endpoint = json.loads(events[-1].data)["payload"]["endpoint"]
    port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
    assert 20000 <= port <= 20999
    assert httpx.get(f"{endpoint}/models").json()["data"][0]["id"] == "tiny"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "What is 2 plus 2?"}], "max_tokens": 4}
    answer = httpx.post(f"{endpoint}/chat/completions", json=chat, timeout=60).json()
    assert answer["usage"]["completion_tokens"] >= 1
    # And cancelling it stops the server, frees its port and its GPU
    assert httpx.post(f"{system.base}/jobs/{job_id}/cancel").status_code == 202
    read_stream(f"{system.base}/jobs/{job_id}/stream", seen("job.cancelled"), last_event_id=events[-1].id)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
    gpus = httpx.get(f"{system.base}/gpus").json()["nodes"][0]["gpus"]
    assert all(gpu["held_by"] is None for gpu in gpus)


def test_a_train_export_deploy_pipeline_is_submitted_at_once(system: System, assets: DemoAssets) -> None:
    # Given a LoRA job just submitted, and at once a deploy of its merged model and a job that
    # runs only if it fails
    train = httpx.post(f"{system.base}/jobs", json=job_body(assets, max_steps=4, save_steps=4)).json()["job_id"]
    serve = {"task_type": "deploy", "source_job_id": train, "deploy_params": {"served_model_name": "piped"}}
    answer = httpx.post(f"{system.base}/jobs", json=serve)
    assert answer.status_code == 202, answer.text
    deploy_id = answer.json()["job_id"]
    fallback = {**job_body(assets), "depends_on": [train], "dependency": "afternotok"}
    fallback_id = httpx.post(f"{system.base}/jobs", json=fallback).json()["job_id"]
    # Then the deploy waits (out of the queue) until the export is done, then serves the merged model
    events = read_stream(f"{system.base}/jobs/{deploy_id}/stream", seen("job.serving"))
    types = [e.event for e in events]
    assert types[:4] == ["job.accepted", "job.waiting", "job.dependencies_met", "job.queued"], types
    trained = httpx.get(f"{system.base}/jobs/{train}").json()
    assert trained["export"]["status"] == "completed"
    met = json.loads(events[2].data)
    assert met["payload"]["model_path"] == trained["export"]["path"]
    assert met["at"] >= next(e for e in trained_events(system, train) if e["type"] == "export.completed")["at"]
    deploy = httpx.get(f"{system.base}/jobs/{deploy_id}").json()
    assert deploy["spec"]["model_path"] == trained["export"]["path"]
    endpoint = json.loads(events[-1].data)["payload"]["endpoint"]
    assert httpx.get(f"{endpoint}/models").json()["data"][0]["id"] == "piped"
    # And the job that needed a failure fails, naming the job it waited for
    fell = httpx.get(f"{system.base}/jobs/{fallback_id}").json()
    assert (fell["status"], fell["reason"]) == ("failed", "dependency_failed")
    assert fell["message"] == f"job {train} completed, and afternotok needed it to fail or be cancelled"
    assert httpx.post(f"{system.base}/jobs/{deploy_id}/cancel").status_code == 202
    read_stream(f"{system.base}/jobs/{deploy_id}/stream", seen("job.cancelled"), last_event_id=events[-1].id)


def trained_events(system: System, job_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{system.base}/jobs/{job_id}/events").json()["events"]  # type: ignore[no-any-return]


def test_a_full_fine_tuning_job_completes(system: System, assets: DemoAssets) -> None:
    job_id, events = finish(system, job_body(assets, train_type="full", max_steps=6, save_steps=6))
    assert steps(events) == sorted(steps(events)) and steps(events)[-1] == 6
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert job["last_checkpoint"].endswith("checkpoint-6")
    assert (Path(job["last_checkpoint"]) / "model.safetensors").is_file()  # the whole model, no adapter
    assert job["export"]["status"] == "none"


def test_a_two_gpu_job_runs_through_torchrun(system: System, assets: DemoAssets) -> None:
    body = {**job_body(assets, max_steps=6, save_steps=6), "gpu_count": 2, "auto_export": False}
    job_id, events = finish(system, body)
    assert steps(events)[-1] == 6
    command = httpx.get(f"{system.base}/jobs/{job_id}/command").json()
    assert command["started"] and command["env"]["NPROC_PER_NODE"] == "2"
    assert command["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_dataset_gone_at_start_fails_with_dataset_not_found(
    system: System, assets: DemoAssets, tmp_path: Path
) -> None:
    dataset = tmp_path / "train.jsonl"
    shutil.copy(assets.dataset_path, dataset)
    body = {**job_body(assets), "data_path": str(dataset)}
    response = httpx.post(f"{system.base}/jobs", json=body)
    dataset.unlink()  # before the trainer, still importing, reads it
    job_id = response.json()["job_id"]
    read_stream(f"{system.base}/jobs/{job_id}/stream", seen("job.failed"))
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert job["reason"] == "dataset_not_found" and job["exit_code"] == 1
    assert any("does not exist" in line for line in job["stderr_tail"])


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("model_path", "no-such-org/no-such-model", "model_not_found"),
        ("data_path", "no-such-org/no-such-set", "dataset_not_found"),
    ],
)
def test_a_hub_id_that_cannot_be_downloaded_fails_naming_the_hub_and_the_id(
    system: System, assets: DemoAssets, field: str, value: str, reason: str
) -> None:
    # Given a job from Hugging Face while no hub can be reached (the tests run offline)
    body = {**job_body(assets), field: value, "hub": "huggingface"}
    job_id, _ = finish(system, body, until="job.failed")
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    # Then it fails for its model or its dataset, in a line that names the hub and the id
    assert job["reason"] == reason and job["spec"]["hub"] == "huggingface"
    what = field.removesuffix("_path").replace("data", "dataset")
    assert job["message"] == (
        f"{what} {value!r} could not be downloaded from Hugging Face (huggingface.co):"
        " offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    )
    # And the traceback's end is kept, with the command that ran
    assert any(line.lstrip().startswith('File "') for line in job["stderr_tail"])
    assert any("Error" in line for line in job["stderr_tail"])
    assert httpx.get(f"{system.base}/jobs/{job_id}/command").json()["env"]["USE_HF"] == "1"


def test_a_job_over_its_time_limit_fails_with_reason_timeout(system: System, assets: DemoAssets) -> None:
    body = {**job_body(assets, max_steps=100_000, save_steps=100_000), "time_limit_s": 20, "auto_export": False}
    job_id, events = finish(system, body, until="job.failed")
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert job["reason"] == "timeout"
    assert "job.progress" in [e.event for e in events]  # it was training when stopped


async def flood_of_events(url: str, namespace: str, count: int) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    bus = Bus(client, Keys(namespace), "test")
    for _ in range(count // 500):
        await bus.append_events([m.NodeJoined(node="flood", simulated=True, gpus=[]) for _ in range(500)])
    await client.aclose()


def test_a_client_that_never_reads_is_cut_off_while_others_keep_receiving(system: System) -> None:
    # Given a client that opens the all-events stream and then never reads
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", system.port))
    stalled.sendall(b"GET /api/v1/training/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    position = httpx.get(f"{system.base}/health").json()["log_position"]
    # When a flood of events lands: far more than a client may fall behind by, and than the
    # network buffers between the gateway and the stalled client hold
    flood = 30_000
    anyio.run(flood_of_events, system.env["REDIS_URL"], system.namespace, flood)
    # Then a client reading as it should gets every one of them, in order, once
    url = f"{system.base}/events/stream?since={position}&type=node.joined"
    got = read_stream(url, lambda events: len(events) >= flood)
    assert len({e.id for e in got}) == flood
    # And the stalled one was cut off: its stream ends, short, however much it then reads
    stalled.settimeout(60)
    received = b""
    while chunk := stalled.recv(1 << 16):
        received += chunk
    stalled.close()
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"event: node.joined") < flood
    assert b"event: overflow" in received[-300:] and received.endswith(b"0\r\n\r\n")  # told why; stream ended
