"""`GET /metrics` after a real job ran: scraped and parsed with prometheus_client's parser, its
values those the API answers; each process's own metrics under its service's label; and only an
admin's key or a metrics key may read it (which reads nothing else)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer
from tests.system import System, finish, job_body, running
from tests.test_compose import dashboard_metrics

pytestmark = pytest.mark.e2e

ADMIN, USER, SCRAPER = "root-key-0123456789ab", "dana-key-0123456789ab", "prom-key-0123456789ab"
KEYS = f"root:admin:{ADMIN},dana:user:{USER},prometheus:metrics:{SCRAPER}"


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("metrics"), API_KEYS=KEYS) as system:
        yield system


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def scrape(system: System, key: str = SCRAPER) -> dict[str, list[Sample]]:
    response = httpx.get(f"http://127.0.0.1:{system.port}/metrics", headers=bearer(key), timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(response.text):
        samples.setdefault(family.name, [])  # (a family with nothing to report now is still declared)
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_metrics_after_a_job_match_the_api_and_carry_each_process(system: System, assets: DemoAssets) -> None:
    # Given a job that ran to the end, and one waiting behind a held one
    api = httpx.Client(base_url=system.base, headers=bearer(USER), timeout=30)
    finish(system, {**job_body(assets, max_steps=4, save_steps=4), "auto_export": False}, auth=bearer(USER))
    held = api.post("/jobs", json={**job_body(assets), "hold": True, "priority": 7}).json()["job_id"]
    assert api.get(f"/jobs/{held}").json()["status"] == "held"

    # When Prometheus scrapes, once the runner's heartbeat carries the job's end (and the
    # scheduler's, both submissions)
    def runner_saw_it_end() -> dict[str, list[Sample]] | None:
        samples = scrape(system)
        ended = [
            s
            for s in samples.get("swift_trainer_runner_runs_ended_total", [])
            if s.labels.get("outcome") == "job.succeeded"
        ]
        decided = samples.get("swift_trainer_scheduler_decision_seconds_count", [])
        return samples if ended and ended[0].value >= 1 and decided and decided[0].value >= 2 else None

    deadline = time.monotonic() + 30
    samples = None
    while samples is None and time.monotonic() < deadline:
        samples = runner_saw_it_end()
        time.sleep(0.3)
    assert samples is not None, "the runner's metrics never showed the job's end"

    # Then the cluster's numbers are the API's
    admin = httpx.Client(base_url=system.base, headers=bearer(ADMIN), timeout=30)
    for status in ("completed", "held", "queued"):
        listed = admin.get("/jobs", params={"status": status, "task_type": "language_model"}).json()["total"]
        assert value(samples, "swift_trainer_jobs", status=status, task_type="language_model") == listed, status
    assert value(samples, "swift_trainer_jobs", status="completed", task_type="language_model") >= 1
    queued = len(admin.get("/queue").json()["queue"])
    assert sum(s.value for s in samples["swift_trainer_queue_depth"]) == queued
    waited = value(samples, "swift_trainer_job_wait_seconds_count", task_type="language_model")
    started = [j for j in admin.get("/jobs", params={"size": 500}).json()["jobs"] if j["started_at"]]
    assert waited == len(started)
    ran = value(samples, "swift_trainer_job_duration_seconds_count", task_type="language_model", status="completed")
    assert ran == len([j for j in started if j["status"] == "completed"])
    gpus = admin.get("/gpus").json()["nodes"]
    for node in gpus:
        assert value(samples, "swift_trainer_node_state", node=node["node"], state=node["summary"]["state"]) == 1
        for gpu in node["gpus"]:
            labels = {"node": node["node"], "gpu": str(gpu["index"])}
            assert value(samples, "swift_trainer_gpu_memory_total_bytes", **labels) == gpu["memory_total_mb"] * 2**20
            assert value(samples, "swift_trainer_gpu_held", **labels) == (1 if gpu["held_by"] else 0)
    groups = admin.get("/system/status").json()["consumer_groups"]
    for group in groups:
        labels = {"stream": group["stream"], "group": group["group"]}
        assert value(samples, "swift_trainer_consumer_group_pending", **labels) >= 0
    assert value(samples, "swift_trainer_dead_letters") == 0

    # And each process's own metrics, under its service
    for service in ("gateway", "scheduler", "gpu-monitor", "runner", "exporter", "notifier"):
        assert value(samples, "swift_trainer_process_resident_memory_bytes", service=service) > 10 * 2**20
    assert value(samples, "swift_trainer_scheduler_commits_total", service="scheduler", status="ok") >= 3
    assert value(samples, "swift_trainer_scheduler_decision_seconds_count", service="scheduler") >= 2
    assert value(samples, "swift_trainer_runner_runs_started_total", service="runner") >= 1
    # And every metric the bundled Grafana dashboard queries is one the scrape has
    scraped = {re.sub(r"_(bucket|total|count|sum)$", "", name) for name in samples}
    assert dashboard_metrics() <= scraped, dashboard_metrics() - scraped
    api.post(f"/jobs/{held}/cancel")


def test_only_an_admin_or_a_metrics_key_reads_metrics_and_a_metrics_key_reads_nothing_else(system: System) -> None:
    url = f"http://127.0.0.1:{system.port}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=bearer(USER)).status_code == 403
    assert httpx.get(url, headers=bearer(ADMIN)).status_code == 200
    assert httpx.get(url, headers=bearer(SCRAPER)).status_code == 200
    for path in ("/api/v1/training/jobs", "/api/v1/training/gpus", "/api/v1/audit/state"):
        assert httpx.get(f"http://127.0.0.1:{system.port}{path}", headers=bearer(SCRAPER)).status_code == 403, path
    denied = httpx.post(f"{system.base}/jobs", json={}, headers=bearer(SCRAPER))
    assert denied.status_code == 403
