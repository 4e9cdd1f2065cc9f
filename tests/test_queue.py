"""The queue through the real processes: priority order with FIFO inside a level, estimates,
priority changes, removal, 409s, and the next job starting when the running one is cancelled."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer, wait_for
from tests.system import System, job_body, read_stream, running, seen

pytestmark = pytest.mark.e2e


@pytest.fixture
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("queue"), SIMULATED_GPUS="1", STOP_GRACE_S="5") as system:
        yield system


def test_priorities_order_the_queue_and_the_highest_starts_next(system: System, assets: DemoAssets) -> None:
    long = {**job_body(assets, max_steps=100_000, save_steps=100_000), "auto_export": False}
    running = httpx.post(f"{system.base}/jobs", json=long).json()["job_id"]
    read_stream(f"{system.base}/jobs/{running}/stream", seen("job.started"))
    # Given five jobs submitted behind it with priorities 0, 5, 5, 10, 0
    ids = {}
    for name, priority in [("p0a", 0), ("p5a", 5), ("p5b", 5), ("p10", 10), ("p0b", 0)]:
        response = httpx.post(f"{system.base}/jobs", json={**long, "priority": priority, "name": name})
        assert response.status_code == 202 and response.json()["status"] == "queued"
        ids[name] = response.json()["job_id"]
    # Then the queue lists them 10, 5, 5, 0, 0 with positions 1-5, and says it cannot tell when
    queue = httpx.get(f"{system.base}/queue").json()["queue"]
    assert [(e["name"], e["position"]) for e in queue] == [("p10", 1), ("p5a", 2), ("p5b", 3), ("p0a", 4), ("p0b", 5)]
    assert all(e["estimated_start_at"] is None and "no ETA" in e["estimate_basis"] for e in queue)
    status = httpx.get(f"{system.base}/queue/{ids['p5b']}/status").json()
    assert status["position"] == 3 and status["queued"] is True
    # When a priority changes and a job is removed, the queue follows
    assert httpx.patch(f"{system.base}/queue/{ids['p0b']}", json={"priority": 6}).status_code == 202
    assert httpx.delete(f"{system.base}/queue/{ids['p5a']}").status_code == 202

    def order() -> list[str]:
        return [e["name"] for e in httpx.get(f"{system.base}/queue").json()["queue"]]

    wait_for(lambda: order() == ["p10", "p0b", "p5b", "p0a"], 10, "the new order")
    # And operations that do not apply are 409s with the state the job is in
    for response in (
        httpx.patch(f"{system.base}/queue/{running}", json={"priority": 1}),
        httpx.delete(f"{system.base}/queue/{running}"),
        httpx.delete(f"{system.base}/jobs/{running}"),
    ):
        assert response.status_code == 409 and response.json()["error"]["details"] == [
            {"field": "status", "message": "running"}
        ]
    # When the running job is cancelled, the priority-10 job starts next
    assert httpx.post(f"{system.base}/jobs/{running}/stop").status_code == 202
    read_stream(f"{system.base}/jobs/{ids['p10']}/stream", seen("job.scheduled"))
    assert [e["name"] for e in httpx.get(f"{system.base}/queue").json()["queue"]] == ["p0b", "p5b", "p0a"]
    # And a finished job can be deleted: gone from the list, its history kept in the log
    assert httpx.delete(f"{system.base}/jobs/{running}").status_code == 202
    wait_for(lambda: httpx.get(f"{system.base}/jobs/{running}").status_code == 404, 10, "the deletion")
    assert httpx.get(f"{system.base}/jobs/{running}").json()["error"]["code"] == "job_not_found"  # as if never there
    assert any(line for line in system.cli("replay", "--job", running).splitlines())
    for job_id in [ids["p10"], ids["p0b"], ids["p5b"], ids["p0a"]]:
        httpx.post(f"{system.base}/jobs/{job_id}/cancel")


def test_requests_written_for_the_original_api_work_unchanged(system: System, assets: DemoAssets) -> None:
    api = system.base
    long = {**job_body(assets, max_steps=100_000, save_steps=100_000), "auto_export": False}
    busy = httpx.post(f"{api}/jobs", json=long).json()["job_id"]
    read_stream(f"{api}/jobs/{busy}/stream", seen("job.started"))
    # A create body as the original took it: no task_type (multimodal), its parameter names
    original = {
        "data_path": str(assets.dataset_path),
        "model_path": str(assets.model_dir),
        "output_dir": str(system.data_dir / "original-out"),
        "priority": 3,
        "train_params": {"num_epochs": 2, "batch_size": 1, "learning_rate": 1e-4, "vit_lr": 2e-5},
    }
    created = httpx.post(f"{api}/jobs", json=original)
    assert created.status_code == 202, created.text
    body = created.json()
    assert {"job_id", "status", "message", "queue_position", "estimated_wait_time"} <= set(body)
    assert (body["status"], body["queue_position"]) == ("queued", 1)
    first = body["job_id"]
    assert httpx.get(f"{api}/jobs/{first}").json()["task_type"] == "multimodal"
    # "hold": true is accepted and never scheduled until POST /jobs/{id}/start releases it
    held = httpx.post(f"{api}/jobs", json={**original, "hold": True}).json()
    assert held["status"] == "held" and held["queue_position"] is None
    status = httpx.get(f"{api}/queue/{held['job_id']}/status").json()
    assert (status["status"], status["queued"]) == ("held", False)
    assert httpx.post(f"{api}/jobs/{held['job_id']}/start").status_code == 202

    def queue_status() -> dict[str, object]:
        return httpx.get(f"{api}/queue/{held['job_id']}/status").json()

    wait_for(lambda: queue_status()["queued"] is True, 10, "the released job to be queued")
    assert queue_status()["position"] == 2
    again = httpx.post(f"{api}/jobs/{held['job_id']}/start")
    assert again.status_code == 409 and again.json()["error"]["details"] == [{"field": "status", "message": "queued"}]
    # The queue processor's status
    processor = httpx.get(f"{api}/queue/processor/status").json()
    assert processor["running"] is True and processor["leader"] and processor["schedulers"]
    # Stop, and paging through jobs by status, newest first
    for job_id in (first, held["job_id"]):
        assert httpx.post(f"{api}/jobs/{job_id}/stop").status_code == 202

    def cancelled(page: int) -> dict[str, object]:
        return httpx.get(f"{api}/jobs", params={"page": page, "size": 1, "status": "cancelled"}).json()

    wait_for(lambda: cancelled(1)["total"] == 2, 10, "both jobs to be cancelled")
    assert [job["job_id"] for job in cancelled(1)["jobs"]] == [held["job_id"]]
    assert [job["job_id"] for job in cancelled(2)["jobs"]] == [first]
    httpx.post(f"{api}/jobs/{busy}/stop")
