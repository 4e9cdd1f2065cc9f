"""What the runner and the exporter report, through the real processes and the real `swift`:
every row a training logs, a job that ends while Redis is away, an export that outlived a killed
exporter, and a failure told in one line (on the API and on the dashboard)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from playwright.sync_api import Browser, expect

from services.demo.tinymodel import DemoAssets
from services.exporter.service import export_tag
from services.launch import SECRET_VARIABLES, TAG_VARIABLE
from services.processes import find_running
from tests.conftest import RedisServer, wait_for
from tests.system import System, job_body, on_own_redis, read_stream, running, seen

pytestmark = pytest.mark.e2e

REPORTED_AFTER_REDIS_S = 30  # how soon a job that ended during an outage is reported once Redis is back


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("reports")) as system:
        yield system


def history(system: System, job_id: str) -> list[dict[str, object]]:
    return httpx.get(f"{system.base}/jobs/{job_id}/events").json()["events"]


def progress_steps(system: System, job_id: str) -> list[int]:
    return [e["payload"]["step"] for e in history(system, job_id) if e["type"] == "job.progress"]  # type: ignore[index]


def test_every_row_a_training_logs_is_reported_in_order(system: System, assets: DemoAssets) -> None:
    # Given a job that logs each of its 24 steps
    body = {**job_body(assets, max_steps=24, save_steps=12, logging_steps=1), "auto_export": False}
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    # When it trains to the end
    events = read_stream(f"{system.base}/jobs/{job_id}/stream", seen("job.succeeded"))
    # Then each step is a progress fact, in order, live and in the log
    live = [json.loads(e.data)["payload"] for e in events if e.event == "job.progress"]
    assert [p["step"] for p in live] == list(range(1, 25))
    assert all(p["loss"] is not None for p in live)
    assert progress_steps(system, job_id) == list(range(1, 25))
    # And the timeline counts every report, and the fold of the log is what the API shows
    timeline = httpx.get(f"{system.base}/jobs/{job_id}/timeline").json()["timeline"]
    reports = [re.search(r"\((\d+) reports", item["text"]) for item in timeline if item["text"].startswith("trained")]
    assert sum(int(found.group(1)) for found in reports if found) == 24
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    replayed = json.loads(system.cli("replay", "--state", "--job", job_id))
    assert replayed == {k: v for k, v in job.items() if k in replayed}
    assert job["progress"]["step"] == 24 and job["progress"]["loss"] == live[-1]["loss"]


def test_an_export_a_killed_exporter_left_running_is_stopped_before_it_runs_again(
    system: System, assets: DemoAssets
) -> None:
    # Given a LoRA job trained, and its export running
    job_id = httpx.post(f"{system.base}/jobs", json=job_body(assets, max_steps=4, save_steps=4)).json()["job_id"]
    url = f"{system.base}/jobs/{job_id}/stream"
    first = read_stream(url, seen("export.started"))
    output_dir = httpx.get(f"{system.base}/jobs/{job_id}").json()["export"]["output_dir"]
    orphan = wait_for(lambda: find_running(export_tag(output_dir)), 30, "the export's process")
    try:
        # Held where it is (SIGSTOP): still there, however fast, when the exporter returns
        os.killpg(orphan.pid, signal.SIGSTOP)
        # When the exporter is SIGKILLed mid-export, its `swift export` outlives it
        system.stop("exporter", sig=signal.SIGKILL)
        assert orphan.is_running()
        # And an exporter starts again (the export is delivered to it again)
        system.start("exporter")
        # Then the export it runs starts only once the one left behind is gone
        [again] = wait_for(
            lambda: [p for p in exports(output_dir) if p.pid != orphan.pid], 60, "the export to run again"
        )
        assert not orphan.is_running(), "two exports of one directory ran at once"
        assert not SECRET_VARIABLES & set(again.environ())  # it loads a model: its code runs there
        # And it completes, once
        read_stream(url, seen("export.completed"), last_event_id=first[-1].id)
        types = [e["type"] for e in history(system, job_id)]
        assert types.count("export.started") == 1 and types.count("export.completed") == 1
        assert "export.failed" not in types
        job = httpx.get(f"{system.base}/jobs/{job_id}").json()
        assert (Path(job["export"]["path"]) / "config.json").is_file()
        wait_for(lambda: not again.is_running(), 30, "the export's process to be gone")
    finally:
        if orphan.is_running():
            os.killpg(orphan.pid, signal.SIGKILL)


def test_a_job_that_ends_while_redis_is_away_is_reported_soon_after_it_returns(
    assets: DemoAssets, tmp_path: Path
) -> None:
    # Given the system on its own Redis, with AOF, and a job training
    with on_own_redis(tmp_path) as (server, system):
        body = job_body(assets, max_steps=24, save_steps=12, logging_steps=1)
        job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
        url = f"{system.base}/jobs/{job_id}/stream"
        first = read_stream(url, seen("job.progress"))
        pid = httpx.get(f"{system.base}/jobs/{job_id}").json()["pid"]
        # When Redis is SIGKILLed and stays away until the trainer has ended
        server.stop(kill=True)
        wait_for(lambda: ended(pid), 120, "the trainer to end")
        # And comes back on the same files
        server.start()
        back = time.monotonic()
        # Then the job is reported completed within seconds, with its real exit code
        wait_for(lambda: status(system, job_id) == "completed", REPORTED_AFTER_REDIS_S, "the job to be reported")
        print(f"reported {time.monotonic() - back:.1f} s after Redis returned")
        job = httpx.get(f"{system.base}/jobs/{job_id}").json()
        assert job["exit_code"] == 0 and job["last_checkpoint"].endswith("checkpoint-24")
        assert not psutil.pid_exists(pid)  # reaped
        # and its GPU is free again
        gpus = httpx.get(f"{system.base}/gpus").json()["nodes"][0]["gpus"]
        assert all(gpu["held_by"] is None for gpu in gpus)
        # And nothing was lost or reported twice: every step once, one start, one end
        assert progress_steps(system, job_id) == list(range(1, 25))
        types = [e["type"] for e in history(system, job_id)]
        assert types.count("job.started") == 1 and types.count("job.succeeded") == 1
        # And every service came through the outage: the export runs, all of them are live
        rest = read_stream(url, seen("export.completed"), last_event_id=first[-1].id)
        assert [e.id for e in first + rest] == [e["entry_id"] for e in history(system, job_id)]
        system.wait_healthy()
        assert all(process.poll() is None for process in system.processes.values())


def exports(output_dir: str) -> list[psutil.Process]:
    """The `swift export` processes (session leaders) of an output directory."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if process.environ().get(TAG_VARIABLE) == export_tag(output_dir) and process.pid == os.getpgid(process.pid):
                found.append(process)
    return found


def ended(pid: int) -> bool:
    """The process has exited: gone, or a zombie waiting for its parent to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def status(system: System, job_id: str) -> str:
    try:
        return str(httpx.get(f"{system.base}/jobs/{job_id}", timeout=5).json()["status"])
    except httpx.TransportError:
        return ""


def test_a_failed_job_says_why_in_one_line_and_its_page_shows_only_what_applies(
    system: System, assets: DemoAssets, browser: Browser, tmp_path: Path
) -> None:
    # Given a job on a model directory without a model in it: ms-swift fails with a traceback
    empty = tmp_path / "empty-model"
    empty.mkdir()
    job_id = httpx.post(f"{system.base}/jobs", json={**job_body(assets), "model_path": str(empty)}).json()["job_id"]
    read_stream(f"{system.base}/jobs/{job_id}/stream", seen("job.failed"))
    # Then its message is the line the traceback ends with; the traceback stays in stderr_tail
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert (
        job["message"]
        == f"ValueError: Unrecognized model in {empty}. Should have a `model_type` key in its config.json."
    )
    assert any(line.strip().startswith("^") for line in job["stderr_tail"])
    assert job["stderr_tail"][-1] == job["message"]
    # When its page is opened
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    page.goto(f"http://127.0.0.1:{system.port}/#/jobs/{job_id}")
    # Then the banner says why in that one line: no traceback, no carets
    expect(page.locator("#job-status")).to_have_text("failed")
    expect(page.locator("#job-message")).to_have_text(f"Failed ({job['reason']}): {job['message']}")
    # And nothing that cannot happen any more is shown: no export to wait for, no empty loss chart
    expect(page.locator("#job-export-section")).to_be_hidden()
    expect(page.locator("#loss-panel")).to_be_hidden()
    expect(page.locator("#job-logs")).to_contain_text("Traceback")  # the whole output is still there
    page.screenshot(path=str(artifacts() / "dashboard-failed-job.png"), full_page=True)
    page.close()


def artifacts() -> Path:
    folder = Path(os.environ.get("TEST_ARTIFACTS_DIR") or Path(__file__).parents[1] / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
