"""Idle-GPU reclaim: a training job whose (simulated) GPUs read idle for its idle timeout is stopped
with a checkpoint and fails with reason idle, while one whose GPUs are busy runs on; a deploy that
serves no request for its idle timeout is stopped the same way."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from events import messages as m
from events.bus import Append
from services.demo.tinymodel import DemoAssets
from services.scheduler import rules
from tests.conftest import RedisServer, wait_for
from tests.examples import GPU, started
from tests.system import TRAINING_TIMEOUT_S, System, finish, job_body, read_stream, running, seen
from tests.test_dependencies import Pool
from tests.test_scheduler_rules import KEYS, LIMITS, NOW


@pytest.fixture(scope="module")
def utilization(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpus") / "utilization.json"


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, utilization: Path) -> Iterator[System]:
    utilization.write_text(json.dumps({"*": 90}))
    settings = {"SIMULATED_GPU_UTILIZATION_FILE": str(utilization), "IDLE_GPU_UTIL_PCT": "5", "SIMULATED_GPUS": "2"}
    with running(redis_server.url, tmp_path_factory.mktemp("idle"), **settings) as system:
        yield system


def step(system: System, job_id: str) -> int:
    progress = httpx.get(f"{system.base}/jobs/{job_id}").json()["progress"]
    return progress["step"] if progress else 0


@pytest.mark.e2e
def test_a_job_whose_gpus_go_idle_is_stopped_with_a_checkpoint_and_one_kept_busy_runs_on(
    system: System, assets: DemoAssets, utilization: Path
) -> None:
    # Given two long jobs with an idle timeout of 2 s, their GPUs busy (90 %)
    body = {**job_body(assets, max_steps=100_000, save_steps=100_000), "idle_timeout_s": 2, "auto_export": False}
    first = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    second = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    wait_for(lambda: step(system, first) >= 2 and step(system, second) >= 2, TRAINING_TIMEOUT_S, "both to train")
    # When the first one's GPU reads idle (0 %), the other's still busy
    gpu = httpx.get(f"{system.base}/jobs/{first}").json()["gpu_ids"][0]
    utilization.write_text(json.dumps({str(gpu): 0, "*": 90}))
    # Then it is stopped once idle for 2 s, with a checkpoint, and fails with reason idle
    events = read_stream(f"{system.base}/jobs/{first}/stream", seen("job.failed"))
    asked = next(json.loads(e.data)["payload"] for e in events if e.event == "job.cancel_requested")
    assert asked["reason"] == "idle: its GPUs under 5 % for 2 s"
    job = httpx.get(f"{system.base}/jobs/{first}").json()
    assert (job["status"], job["reason"]) == ("failed", "idle")
    assert job["message"] == "stopped: it kept its GPUs idle for its idle timeout"
    assert job["last_checkpoint"] and Path(job["last_checkpoint"]).is_dir()  # saved on the way out
    # And the busy one, with the same timeout, runs on (for longer than that timeout by now)
    other = httpx.get(f"{system.base}/jobs/{second}").json()
    assert other["status"] == "running" and not other["cancel_requested"]
    httpx.post(f"{system.base}/jobs/{second}/cancel")
    utilization.write_text(json.dumps({"*": 90}))


@pytest.mark.e2e
def test_a_deploy_that_serves_no_request_for_its_idle_timeout_is_stopped(system: System, assets: DemoAssets) -> None:
    # Given a deploy of the tiny model with an idle timeout of 6 s
    body = {
        "task_type": "deploy",
        "model_path": str(assets.model_dir),
        "idle_timeout_s": 6,
        "deploy_params": {"served_model_name": "tiny", "model_type": "qwen2", "template": "qwen2_5"},
    }
    job_id, events = finish(system, body, until="job.serving")
    endpoint = json.loads(events[-1].data)["payload"]["endpoint"]
    # When it answers a request now and then, it keeps serving past its timeout
    served_until = time.monotonic() + 9
    while time.monotonic() < served_until:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "What is 2 plus 2?"}], "max_tokens": 2}
        assert httpx.post(f"{endpoint}/chat/completions", json=chat, timeout=60).status_code == 200
        time.sleep(2)
    assert httpx.get(f"{system.base}/jobs/{job_id}").json()["status"] == "serving"
    last_request = time.monotonic()
    # Then, left alone, it is stopped after about its idle timeout, failed with reason idle
    read_stream(f"{system.base}/jobs/{job_id}/stream", seen("job.failed"), last_event_id=events[-1].id)
    idle_for = time.monotonic() - last_request
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert (job["status"], job["reason"]) == ("failed", "idle")
    assert job["message"] == "stopped: it served no request for its idle timeout"
    assert idle_for >= 5.5, idle_for


def test_a_running_job_whose_gpus_read_idle_for_its_timeout_is_stopped_and_busy_or_unknown_readings_reset_it() -> None:
    pool = Pool({"node-a": 2})
    pool.ask("a", gpu_count=2, idle_timeout_s=10, auto_export=False)
    pool.fold([Append(KEYS.events, started("a", 1, "node-a", "0,1"))])
    since: dict[str, datetime] = {}

    def beat(at_s: float, *utils: int | None) -> list[Append]:
        gpus = [
            m.GpuSample(**GPU.model_copy(update={"index": i}).model_dump(), memory_used_mb=0, utilization_pct=u)
            for i, u in enumerate(utils)
        ]
        heartbeat = m.NodeHeartbeat(node="node-a", simulated=True, gpus=gpus, at=NOW)
        pool.heartbeats["node-a"] = heartbeat
        return rules.reclaim_idle(
            pool.state, KEYS, heartbeat, pool.heartbeats, since, LIMITS, NOW + timedelta(seconds=at_s)
        )

    assert beat(0, 0, 1) == [] and beat(9, 0, 0) == []  # idle, not yet for 10 s
    assert beat(9.5, 0, 40) == []  # one GPU busy: the count starts again
    assert beat(10, 0, None) == []  # a reading NVML could not make counts as busy
    assert beat(11, 0, 0) == [] and beat(20, 0, 0) == []
    decided = beat(21, 0, 0)
    assert [a.message.type for a in decided] == ["job.cancel_requested", "job.stop"]
    assert decided[0].message.reason == "idle: its GPUs under 5 % for 10 s"  # type: ignore[attr-defined]
    assert decided[1].message.reason == "idle"  # type: ignore[attr-defined]
    pool.fold(decided)
    assert beat(40, 0, 0) == []  # asked once
