"""The dashboard's side of sharing the pool, in a real browser (Debian's headless Chromium) against
the whole system on one GPU, with the chaos run's stand-in trainer as `swift` (a real process the
runner starts and stops, that saves a checkpoint on SIGTERM, in milliseconds): a job suspended and
resumed from its page, the job that preempted it and the one it preempted named on each page, the
queue's reasons, and the pool's page where an admin reads usage and edits the quota table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.chaos import stand_in_swift
from tests.conftest import RedisServer, wait_for
from tests.system import System, running

USER_KEY = "pool-alice-key-0123456789"
ADMIN_KEY = "pool-root-key-0123456789"
WAIT_MS = 20_000
LONG = {"max_steps": 100_000, "save_steps": 20, "logging_steps": 1}  # runs until stopped


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("pool")
    (root / "model").mkdir()
    (root / "data.jsonl").write_text("{}\n")
    settings = {
        "SIMULATED_GPUS": "1",
        "API_KEYS": f"alice:user:{USER_KEY},root:admin:{ADMIN_KEY}",
        "SWIFT_BIN": str(stand_in_swift(root)),
        "CHAOS_STEP_S": "0.05",
        "PREEMPTION": "priority",
        "PREEMPT_MIN_RUNTIME_S": "0",
        "STOP_GRACE_S": "5",
    }
    with running(redis_server.url, root / "system", **settings) as system:
        yield system


class Api:
    """The REST API as one user, for what the test sets up and checks besides the page."""

    def __init__(self, system: System, key: str) -> None:
        self.system = system
        self.client = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10)

    def submit(self, name: str, priority: int = 5) -> str:
        root = self.system.data_dir.parent
        body = {
            "task_type": "language_model",
            "name": name,
            "model_path": str(root / "model"),
            "data_path": str(root / "data.jsonl"),
            "priority": priority,
            "auto_export": False,
            "train_params": LONG,
        }
        response = self.client.post(f"{self.system.base}/jobs", json=body)
        assert response.status_code == 202, response.text
        return str(response.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self.client.get(f"{self.system.base}/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def wait_status(self, job_id: str, *statuses: str) -> dict[str, Any]:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (job := self.job(job_id))["status"] in statuses and job, 30, f"job {job_id} to be {statuses}"
        )

    def cancel(self, *job_ids: str) -> None:
        """Cancel jobs and wait until their processes are gone: the GPU is free for the next test."""
        for job_id in job_ids:
            self.client.post(f"{self.system.base}/jobs/{job_id}/cancel")
        for job_id in job_ids:
            self.wait_status(job_id, "cancelled", "completed", "failed")

    def quotas(self) -> dict[str, Any]:
        response = self.client.get(f"http://127.0.0.1:{self.system.port}/api/v1/admin/quotas")
        assert response.status_code == 200, response.text
        return response.json()["quotas"]  # type: ignore[no-any-return]

    def set_quotas(self, quotas: dict[str, Any]) -> None:
        response = self.client.put(f"http://127.0.0.1:{self.system.port}/api/v1/admin/quotas", json=quotas)
        assert response.status_code in (200, 202), response.text


def signed_in(browser: Browser, system: System, key: str, who: str, problems: list[str]) -> tuple[BrowserContext, Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}") or dialog.dismiss())
    page.goto(f"http://127.0.0.1:{system.port}/")
    page.fill("#api-key", key)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#who")).to_have_text(who)
    return context, page


@pytest.mark.e2e
def test_a_job_is_suspended_resumed_and_preempted_as_its_page_shows(
    system: System, browser: Browser, tmp_path: Path
) -> None:
    alice, root = Api(system, USER_KEY), Api(system, ADMIN_KEY)
    problems: list[str] = []
    context, page = signed_in(browser, system, USER_KEY, "alice (user)", problems)
    admin_context, admin = signed_in(browser, system, ADMIN_KEY, "root (admin)", problems)
    low = alice.submit("pool-low", priority=3)
    try:
        # Given alice's training job running, on its page
        page.goto(f"http://127.0.0.1:{system.port}/#/jobs/{low}")
        expect(page.locator("#job-status")).to_have_text("running", timeout=WAIT_MS)
        expect(page.locator("#job-resume")).to_be_hidden()
        # (trained a step: a trainer stopped before its first step has nothing to save)
        wait_for(lambda: (alice.job(low)["progress"] or {}).get("step", 0) >= 1, 30, "a first step")
        # When she suspends it
        page.click("#job-suspend")
        # Then it is suspended, its process stopped with a checkpoint, and only Resume is offered
        expect(page.locator("#job-status")).to_have_text("suspended", timeout=WAIT_MS)
        expect(page.locator("#job-suspend")).to_be_hidden()
        expect(page.locator("#job-resume")).to_be_visible()
        expect(page.locator("#job-message")).to_contain_text("Suspended at step", timeout=WAIT_MS)
        expect(page.locator("#job-flags")).to_be_empty()  # not "stopping" any more
        page.screenshot(path=str(tmp_path / "pool-suspended.png"), full_page=True)
        suspended = alice.job(low)
        assert suspended["status"] == "suspended" and not suspended["stopping"] and suspended["last_checkpoint"]
        # And the overview lists it as suspended
        page.click("a.brand")
        row = page.locator(f'#jobs tr[data-job-id="{low}"]')
        expect(row).to_have_attribute("data-status", "suspended")
        expect(row.locator(".badge.suspended")).to_have_text("suspended")
        # When she resumes it from its page
        row.locator("a").click()
        page.click("#job-resume")
        # Then it runs again (the GPU is free), a second attempt, with Suspend offered again
        expect(page.locator("#job-status")).to_have_text("running", timeout=WAIT_MS)
        expect(page.locator("#job-resume")).to_be_hidden()
        expect(page.locator("#job-suspend")).to_be_visible()
        assert alice.job(low)["attempt"] == 2

        # When an admin's more urgent job takes its GPU
        urgent = root.submit("pool-urgent", priority=9)
        # Then alice's page names the job that preempted it, and it waits in the queue in its place
        expect(page.locator("#job-sharing .preempted-by")).to_contain_text("Preempted once, last by", timeout=WAIT_MS)
        expect(page.locator(f'#job-sharing .preempted-by a[href="#/jobs/{urgent}"]')).to_be_visible()
        expect(page.locator("#job-status")).to_have_text("queued #1", timeout=WAIT_MS)
        expect(page.locator("#job-suspend")).to_be_hidden()
        expect(page.locator("#job-sharing .order")).to_have_text("Order: priority 3, submitted 1st")
        page.click("a.brand")
        queued = page.locator(f'#queue tr[data-job-id="{low}"]')
        expect(queued.locator(".reason.order")).to_have_text("priority 3, submitted 1st")
        expect(queued.locator(".reason.waiting")).to_have_count(0)  # it waits for the GPU, not its quota
        # And the admin's page of the urgent job names the job it preempted to start
        admin.goto(f"http://127.0.0.1:{system.port}/#/jobs/{urgent}")
        expect(admin.locator("#job-status")).to_have_text("running", timeout=WAIT_MS)
        expect(admin.locator(f'#job-sharing .preempted-jobs a[href="#/jobs/{low}"]')).to_have_text("pool-low")
        page.screenshot(path=str(tmp_path / "pool-queue.png"), full_page=True)
        admin.screenshot(path=str(tmp_path / "pool-preemptor.png"), full_page=True)
        assert not problems, problems
    finally:
        root.cancel(*[job_id for job_id in (low, locals().get("urgent")) if job_id])
        context.close()
        admin_context.close()


@pytest.mark.e2e
def test_an_admin_reads_usage_and_edits_the_quota_table_on_the_pool_page(
    system: System, browser: Browser, tmp_path: Path
) -> None:
    alice, root = Api(system, USER_KEY), Api(system, ADMIN_KEY)
    problems: list[str] = []
    admin_context, admin = signed_in(browser, system, ADMIN_KEY, "root (admin)", problems)
    context, page = signed_in(browser, system, USER_KEY, "alice (user)", problems)
    running_job = alice.submit("pool-running")
    jobs = [running_job]
    try:
        alice.wait_status(running_job, "running")
        # Given the pool's page of an admin, with no quotas yet
        admin.click("[data-nav=pool]")
        expect(admin.locator("#quotas-empty")).to_be_visible()
        # Then it shows every user's usage: alice's running job holds the GPU
        usage = admin.locator('#usage tr[data-kind="user"][data-name="alice"]')
        expect(usage.locator(".gpus")).to_have_text("1")
        expect(usage.locator(".limits")).to_have_text("none")
        expect(admin.locator('#usage tr[data-kind="user"][data-name="root"]')).to_be_visible()

        # When the admin gives alice a quota through the form
        admin.click("#quota-add")
        added = admin.locator("#quotas tr").last
        added.locator(".quota-name").fill("alice")
        added.locator(".quota-gpus").fill("1")
        added.locator(".quota-queued").fill("5")
        admin.click("#quotas-save")
        # Then it is in force, as the API says, and the page shows it in both tables
        expect(admin.locator("#quotas-saved")).to_have_text("Saved.", timeout=WAIT_MS)
        assert root.quotas() == {"users": {"alice": {"gpus": 1, "queued": 5}}, "teams": {}}
        expect(admin.locator('#quotas tr[data-kind="user"][data-name="alice"] .quota-gpus')).to_have_value("1")
        expect(usage.locator(".limits")).to_have_text("1 GPU · 5 waiting")

        # When a row names a user no key has, the gateway refuses the table, and the form says why
        admin.click("#quota-add")
        admin.locator("#quotas tr").last.locator(".quota-name").fill("nobody")
        admin.click("#quotas-save")
        expect(admin.locator("#quotas-error")).to_contain_text("Not saved (422)")
        expect(admin.locator("#quotas-error")).to_contain_text("users.nobody: no API key")  # the field at fault
        assert root.quotas() == {"users": {"alice": {"gpus": 1, "queued": 5}}, "teams": {}}

        # When alice submits a second job while she holds her quota's one GPU
        waiting = alice.submit("pool-over-quota")
        jobs.append(waiting)
        # Then her queue says it waits for her quota, and so does its page
        queued = page.locator(f'#queue tr[data-job-id="{waiting}"]')
        expect(queued.locator(".reason.waiting")).to_have_text(
            "quota: user alice holds 1 of 1 GPUs and the job needs 1", timeout=WAIT_MS
        )
        queued.locator("a").click()
        expect(page.locator("#job-message")).to_have_text(
            "Waiting for its quota: user alice holds 1 of 1 GPUs and the job needs 1."
        )
        # And on her pool page she sees her own usage and limits only, and no table to edit
        page.click("[data-nav=pool]")
        expect(page.locator('#usage tr[data-name="alice"] .waiting')).to_have_text("1")
        expect(page.locator('#usage tr[data-name="alice"] .limits')).to_have_text("1 GPU · 5 waiting")
        expect(page.locator("#usage tr")).to_have_count(1)
        expect(page.locator("#quotas-error")).to_contain_text("Only an admin")
        expect(page.locator("#quotas-save")).to_be_hidden()
        admin.screenshot(path=str(tmp_path / "pool-admin.png"), full_page=True)
        assert not problems, problems
    finally:
        root.set_quotas({"users": {}, "teams": {}})
        root.cancel(*jobs)
        context.close()
        admin_context.close()
