"""A sweep trained for real: a 2x2 grid of the tiny model on four (simulated) GPUs with at most
two points at once, read back from the log, cancelled in bulk, and shown on the dashboard's sweep
page in Chromium."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer
from tests.system import TRAINING_TIMEOUT_S, System, job_body, running
from tests.test_dashboard import artifacts

pytestmark = pytest.mark.e2e

ENDS = ("job.succeeded", "job.failed", "job.cancelled", "job.stopped")


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("sweep"), SIMULATED_GPUS="4") as system:
        yield system


def until(what: str, check: Any, timeout_s: float = TRAINING_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def most_at_once(system: System, job_ids: list[str]) -> int:
    """How many of the jobs held GPUs at once, from the log: scheduled until they ended."""
    changes: list[tuple[tuple[int, int], int]] = []
    for job_id in job_ids:
        for event in httpx.get(f"{system.base}/jobs/{job_id}/events").json()["events"]:
            at = tuple(int(part) for part in event["entry_id"].split("-"))
            if event["type"] == "job.scheduled":
                changes.append((at, 1))  # type: ignore[arg-type]
            elif event["type"] in ENDS:
                changes.append((at, -1))  # type: ignore[arg-type]
    held = most = 0
    for _, change in sorted(changes):
        held += change
        most = max(most, held)
    return most


def test_a_sweep_runs_two_at_once_is_cancelled_in_bulk_and_shows_every_curve(
    system: System, assets: DemoAssets, browser: Browser
) -> None:
    # Given a 2x2 grid over the learning rate and the length of the run, at most two at once, on
    # four free GPUs (the short points end by themselves, the long ones run until cancelled)
    job = {**job_body(assets, logging_steps=1, save_steps=5), "auto_export": False, "name": "grid"}
    grid = {"learning_rate": [0.005, 0.002], "max_steps": [6, 5000]}
    answer = httpx.post(f"{system.base}/sweeps", json={"job": job, "grid": grid, "max_concurrent": 2})
    assert answer.status_code == 202, answer.text
    sweep_id, job_ids = answer.json()["sweep_id"], answer.json()["job_ids"]
    assert len(job_ids) == 4
    url = f"{system.base}/sweeps/{sweep_id}"

    # When the short points have completed and the long ones both train
    def long_ones_train() -> dict[str, Any] | None:
        view = httpx.get(url).json()
        statuses = [p["status"] for p in view["points"]]
        steps = [p["step"] or 0 for p in view["points"]]
        done = statuses[0] == statuses[2] == "completed" and statuses[1] == statuses[3] == "running"
        return view if done and steps[1] >= 1 and steps[3] >= 1 else None

    view = until("the short points to complete and the long ones to train", long_ones_train)
    # Then their results are in the sweep, the best a completed point
    short = [view["points"][0], view["points"][2]]
    assert all(p["train_loss"] is not None and p["step"] == 6 for p in short)
    assert view["best"]["job_id"] in {p["job_id"] for p in short}
    assert [p["point"] for p in view["points"]] == [
        {"learning_rate": 0.005, "max_steps": 6},
        {"learning_rate": 0.005, "max_steps": 5000},
        {"learning_rate": 0.002, "max_steps": 6},
        {"learning_rate": 0.002, "max_steps": 5000},
    ]
    listed = httpx.get(f"{system.base}/jobs", params={"sweep_id": sweep_id}).json()
    assert sorted(j["job_id"] for j in listed["jobs"]) == sorted(job_ids)

    # When the sweep is cancelled, the two still running stop (with a checkpoint), the rest stays
    cancelled = httpx.post(f"{url}/cancel")
    assert cancelled.status_code == 202 and sorted(cancelled.json()["cancelling"]) == sorted([job_ids[1], job_ids[3]])
    final = until("every point to end", lambda: (v := httpx.get(url).json())["ended"] and v)
    assert [p["status"] for p in final["points"]] == ["completed", "cancelled", "completed", "cancelled"]
    # And the log shows that no more than two held GPUs at once, though four were free
    assert most_at_once(system, job_ids) == 2
    state_url = f"http://127.0.0.1:{system.port}/api/v1/audit/state"
    assert system.cli("audit", "check", "--gateway", state_url).startswith("ok: every invariant holds")
    # And replaying the log rebuilds the sweep
    replayed = json.loads(system.cli("replay", "--state"))["sweeps"][sweep_id]
    assert (replayed["job_ids"], replayed["max_concurrent"], replayed["grid"]) == (job_ids, 2, grid)

    # And the dashboard's sweep page shows every point's curve on one chart, and the table sorts
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(f"http://127.0.0.1:{system.port}/#/sweeps")
    page.locator(f'#sweeps tr[data-sweep-id="{sweep_id}"] a').click()
    expect(page.locator("#sweep-chart")).to_have_attribute("data-series", "4", timeout=20_000)
    expect(page.locator("#sweep-chart .u-legend .u-series")).to_have_count(5)  # step, then one per point
    rows = page.locator("#sweep-points tr")
    expect(rows).to_have_count(4)
    expect(page.locator("#sweep-best")).to_contain_text("Best so far")
    page.locator('#sweep-head th[data-sort="status"]').click()
    expect(rows.nth(0)).to_have_attribute("data-status", "cancelled")
    expect(rows.nth(3)).to_have_attribute("data-status", "completed")
    page.screenshot(path=str(artifacts() / "dashboard-sweep.png"), full_page=True)
    assert not problems, problems
    page.close()
