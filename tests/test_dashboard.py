"""The dashboard. In a real browser (Debian's headless Chromium, driven by Playwright) against the
whole system with access control: sign in with a key, submit a job through the form and watch its
progress bar and loss curve move until it completes, cancel a job queued behind it from its page,
all live over SSE, without a reload, and with nothing fetched from anywhere but the gateway. And
through the app: the page and its assets are open, the API behind them is not."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from events.bus import Bus
from services.config import load_settings
from services.demo.tinymodel import DemoAssets
from services.demo.tinyvl import VisionAssets
from services.gateway.app import create_app
from services.gateway.projection import Projection
from tests.conftest import RedisServer, wait_for
from tests.system import TRAINING_TIMEOUT_S, System, job_body, running

KEY = "dashboard-key-0123456789"
WAIT_MS = 20_000
TRAINING_MS = TRAINING_TIMEOUT_S * 1000

# Every value the job page's progress bar and loss chart take, recorded as the page changes them.
RECORD = """() => {
  window.seen = {progress: [], points: []};
  const bar = document.querySelector('#job-progress'), chart = document.querySelector('#loss-chart');
  new MutationObserver(() => window.seen.progress.push(Number(bar.getAttribute('aria-valuenow'))))
    .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
  new MutationObserver(() => window.seen.points.push(Number(chart.dataset.trainPoints)))
    .observe(chart, {attributes: true, attributeFilter: ['data-train-points']});
}"""


def artifacts() -> Path:
    folder = Path(os.environ.get("TEST_ARTIFACTS_DIR") or Path(__file__).parents[1] / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    # One GPU: a second job waits in the queue behind the first. Tokens live 10 s: the page
    # renews its cookie several times during the test.
    data = tmp_path_factory.mktemp("dashboard")
    settings = {"SIMULATED_GPUS": "1", "API_KEYS": f"alice:user:{KEY}", "AUTH_TOKEN_TTL_S": "10"}
    with running(redis_server.url, data, **settings) as system:
        yield system


def submit(page: Page, assets: DemoAssets, name: str, max_steps: int, **more: str) -> str:
    """Fill the language_model form (its defaults already there, ``more`` fields besides) and
    submit; the job's id."""
    page.click("[data-nav=submit]")
    page.click("#task-tabs [data-task-type=language_model]")
    expect(page.locator('[name="train_params.learning_rate"]')).to_have_value("0.0001")  # the gateway's default
    expect(page.locator('[name="priority"]')).to_have_value("5")
    fields = {
        "name": name,
        "model_path": str(assets.model_dir),
        "data_path": str(assets.dataset_path),
        "train_params.model_type": "qwen2",
        "train_params.template": "qwen2_5",
        "train_params.max_steps": str(max_steps),
        "train_params.logging_steps": "1",
        "train_params.save_steps": "20",
        "train_params.learning_rate": "0.005",
    }
    for field, value in {**fields, **more}.items():
        page.fill(f'[name="{field}"]', value)
    page.select_option('[name="train_params.torch_dtype"]', "float32")
    page.click("#submit-button")
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-f-]+$"))
    return page.url.rsplit("/", 1)[1]


@pytest.fixture
async def gateway(bus: Bus, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", api_keys=f"alice:user:{KEY}")
    app = create_app(settings, bus, Projection(bus, bus.redis))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        yield client


async def test_the_page_and_its_assets_are_open_and_local_while_the_api_needs_a_key(
    gateway: httpx.AsyncClient,
) -> None:
    # Given a gateway with API keys, and no key
    # When the dashboard is loaded
    page = await gateway.get("/")
    # Then the page and every asset it names are served, from the gateway itself
    assert page.status_code == 200
    assert '<meta name="api-prefix" content="/api/v1">' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    linked = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assets = [path for path in linked if path.startswith("/assets/")]
    assert len(assets) >= 4 and set(linked) - set(assets) == {"/docs"}
    for path in [*assets, "/assets/vendor/uplot/LICENSE"]:
        response = await gateway.get(path)
        assert response.status_code == 200 and response.content, path
    # And nothing else is open: the API, the streams, and any other path need a key
    for path in ("/api/v1/training/jobs", "/api/v1/training/gpus/stream", "/api/v1/auth/me", "/jobs", "/assets"):
        assert (await gateway.get(path)).status_code == 401, path


async def test_a_browser_signs_in_for_a_cookie_and_signs_out(gateway: httpx.AsyncClient) -> None:
    # Given a key exchanged for a token, set as an HttpOnly cookie
    signed_in = await gateway.post("/api/v1/auth/token", headers={"Authorization": f"Bearer {KEY}"})
    assert signed_in.status_code == 200 and "httponly" in signed_in.headers["set-cookie"].lower()
    assert (await gateway.get("/api/v1/auth/me")).json()["name"] == "alice"  # the cookie is enough
    # When the browser signs out
    signed_out = await gateway.delete("/api/v1/auth/token")
    # Then its cookie is gone, and the API refuses it again
    assert signed_out.status_code == 200 and 'st_token=""' in signed_out.headers["set-cookie"]
    assert (await gateway.get("/api/v1/auth/me")).status_code == 401


@pytest.mark.e2e
def test_the_dashboard_signs_in_submits_follows_and_cancels_live(
    system: System, assets: DemoAssets, browser: Browser
) -> None:
    origin = f"http://127.0.0.1:{system.port}"
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    elsewhere: list[str] = []
    context.on("request", lambda r: None if r.url.startswith((origin + "/", "data:")) else elsewhere.append(r.url))
    problems: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.on("dialog", lambda dialog: dialog.accept())

    # Given the dashboard of a gateway with API keys: it asks for a key, and refuses a wrong one
    page.goto(f"{origin}/")
    expect(page.locator("#sign-in")).to_be_visible()
    page.fill("#api-key", "not-the-key-0123456789")
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#sign-in-error")).to_have_text("That key is not valid.")
    # When the right key is given, it is signed in, live, and shows the GPU from the heartbeats
    page.fill("#api-key", KEY)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#who")).to_have_text("alice (user)")
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#gpus [data-gpu]")).to_have_count(1)
    page.evaluate("window.notReloaded = true")

    # When the form is sent without a model, the field is marked with the gateway's reason
    page.click("[data-nav=submit]")
    page.click("#task-tabs [data-task-type=language_model]")
    page.click("#submit-button")
    expect(page.locator('.field.invalid [name="model_path"]')).to_be_visible()

    # When a job is submitted through the form, the browser lands on its page and follows it live
    first = submit(page, assets, "dashboard-first", max_steps=40)
    page.evaluate(RECORD)
    expect(page.locator("#job-title")).to_have_text("dashboard-first")

    # And meanwhile, in a second tab of the same session (the cookie, no key), a second job is
    # submitted: it waits in the queue behind the first, with its place and estimate
    tab = context.new_page()
    tab.on("pageerror", lambda exc: problems.append(str(exc)))
    tab.on("dialog", lambda dialog: dialog.accept())
    tab.goto(f"{origin}/")
    expect(tab.locator("#who")).to_have_text("alice (user)")
    expect(tab.locator(f'#jobs tr[data-job-id="{first}"]')).to_be_visible()
    tab.evaluate("window.notReloaded = true")
    second = submit(tab, assets, "dashboard-second", max_steps=500)
    expect(tab.locator("#job-status")).to_have_text("queued #1", timeout=WAIT_MS)
    tab.click("a.brand")
    queued = tab.locator(f'#queue tr[data-job-id="{second}"]')
    expect(queued.locator(".position")).to_have_text("1")
    expect(queued.locator(".estimate")).not_to_be_empty()
    expect(tab.locator(f'#gpus [data-gpu] a[href="#/jobs/{first}"]')).to_be_visible()  # the GPU it holds
    # When it is cancelled from its page
    queued.locator("a").click()
    expect(tab.locator("#job-title")).to_have_text("dashboard-second")
    tab.click("#job-cancel")
    # Then it becomes cancelled, and leaves the queue
    expect(tab.locator("#job-status")).to_have_text("cancelled", timeout=WAIT_MS)
    expect(tab.locator("#job-cancel")).to_be_hidden()
    tab.click("a.brand")
    expect(tab.locator(f'#jobs tr[data-job-id="{second}"]')).to_have_attribute("data-status", "cancelled")
    expect(tab.locator("#queue-empty")).to_be_visible()

    # Then the first job's page showed its progress and its loss curve growing until it completed
    expect(page.locator("#job-status")).to_have_text("completed", timeout=TRAINING_MS)
    expect(page.locator("#job-progress")).to_have_attribute("aria-valuenow", "100")
    # (a point for each of its 40 steps: every row ms-swift logs is reported)
    events = httpx.get(f"{system.base}/jobs/{first}/events", headers={"Authorization": f"Bearer {KEY}"}).json()
    losses = {e["payload"]["step"] for e in events["events"] if e["type"] == "job.progress" and e["payload"]["loss"]}
    assert losses == set(range(1, 41))
    expect(page.locator("#loss-chart")).to_have_attribute("data-train-points", "40")
    seen = page.evaluate("window.seen")
    progress = [value for value in seen["progress"] if value > 0]
    assert progress == sorted(progress) and len(set(progress)) >= 2 and progress[-1] == 100, seen
    assert seen["points"] == sorted(seen["points"]) and len(set(seen["points"])) >= 2, seen
    expect(page.locator("#job-checkpoints li")).to_have_count(2)  # checkpoint-20 and checkpoint-40
    expect(page.locator("#job-logs")).to_contain_text("last_model_checkpoint")
    # And its export (merging the LoRA adapters) shows as it starts
    expect(page.locator("#job-export-status")).to_have_attribute("data-status", re.compile("running|completed"))
    # And the other tab's list shows it completed, with a full bar
    row = tab.locator(f'#jobs tr[data-job-id="{first}"]')
    expect(row).to_have_attribute("data-status", "completed")
    expect(row.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "100")
    expect(tab.locator(f'#gpus [data-gpu] a[href="#/jobs/{first}"]')).to_have_count(0)  # the GPU is free

    # And neither page was ever reloaded, nothing came from elsewhere, and no script failed
    assert page.evaluate("window.notReloaded") is True and tab.evaluate("window.notReloaded") is True
    assert not elsewhere, elsewhere
    assert not problems, problems
    page.screenshot(path=str(artifacts() / "dashboard-job.png"), full_page=True)
    tab.screenshot(path=str(artifacts() / "dashboard.png"), full_page=True)

    # When one tab signs out, the session's cookie is gone: the other tab asks for the key again
    # (at the latest when it next renews its token)
    tab.click("#sign-out")
    expect(tab.locator("#sign-in")).to_be_visible()
    expect(page.locator("#sign-in")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#sign-in-error")).to_have_text("Your session has ended: sign in again.")
    context.close()


def signed_in(browser: Browser, system: System) -> tuple[BrowserContext, Page, list[str]]:
    """A new browser session on the dashboard, signed in as alice; and the script errors it meets."""
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(f"http://127.0.0.1:{system.port}/")
    page.fill("#api-key", KEY)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#who")).to_have_text("alice (user)")
    return context, page, problems


@pytest.mark.e2e
def test_a_multimodal_job_is_submitted_through_its_form_and_trains(
    system: System, vision_assets: VisionAssets, browser: Browser
) -> None:
    context, page, problems = signed_in(browser, system)
    # Given the multimodal form, the default tab, with its own parameters
    page.click("[data-nav=submit]")
    expect(page.locator("#task-tabs [data-task-type=multimodal]")).to_have_attribute("aria-selected", "true")
    expect(page.locator('[name="train_params.freeze_vit"]')).to_be_checked()
    # When it is filled in for the tiny vision-language model, vision tower and aligner unfrozen
    request = vision_assets.job_request(max_steps=4, save_steps=4)
    fields = {"name": "dashboard-vl", "model_path": request["model_path"], "data_path": request["data_path"]}
    params = request["train_params"]
    assert isinstance(params, dict)
    names = (
        "model_type",
        "template",
        "max_steps",
        "logging_steps",
        "batch_size",
        "learning_rate",
        "vit_lr",
        "aligner_lr",
    )
    for name in names:
        fields[f"train_params.{name}"] = params[name]
    for field, value in fields.items():
        page.fill(f'[name="{field}"]', str(value))
    page.uncheck('[name="train_params.freeze_vit"]')
    page.uncheck('[name="train_params.freeze_aligner"]')
    page.select_option('[name="train_params.torch_dtype"]', "float32")
    page.click("#submit-button")
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-f-]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    # Then the job trains on the images to the end, with the form's parameters
    expect(page.locator("#job-status")).to_have_text("completed", timeout=TRAINING_MS)
    expect(page.locator("#job-progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#loss-chart")).to_have_attribute("data-train-points", "3")  # steps 1, 2 and 4
    job = httpx.get(f"{system.base}/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert job["task_type"] == "multimodal"
    sent = job["spec"]["train_params"]
    assert (sent["vit_lr"], sent["aligner_lr"], sent["freeze_vit"], sent["freeze_aligner"]) == (
        0.002,
        0.003,
        False,
        False,
    )
    assert sent["model_type"] == "llava1_5_hf" and sent["max_steps"] == 4
    assert not problems, problems
    page.screenshot(path=str(artifacts() / "dashboard-multimodal-job.png"), full_page=True)
    context.close()


@pytest.mark.e2e
def test_a_jobs_page_shows_the_chain_it_waits_in(system: System, assets: DemoAssets, browser: Browser) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    # Given a training job
    first = job_body(assets, max_steps=30, save_steps=30, logging_steps=1)
    first_id = httpx.post(f"{system.base}/jobs", json={**first, "name": "chain-first"}, headers=auth).json()["job_id"]
    context, page, problems = signed_in(browser, system)
    # When another is submitted through the form to run after it (its id in depends_on)
    second_id = submit(page, assets, "chain-second", max_steps=2, depends_on=first_id)
    sent = httpx.get(f"{system.base}/jobs/{second_id}", headers=auth).json()["spec"]
    assert (sent["depends_on"], sent["dependency"]) == ([first_id], "afterok")
    # When the second job's page is open, it says what it waits for, and the other's status
    expect(page.locator("#job-status")).to_have_text("waiting")
    chain = page.locator("#job-chain")
    expect(chain.locator(".depends-on")).to_contain_text("Depends on (afterok): chain-first")
    expect(chain.locator(".waiting-on a")).to_have_attribute("href", f"#/jobs/{first_id}")
    expect(chain.locator(".waiting-on")).to_have_text("Waiting for chain-first to end.")
    page.screenshot(path=str(artifacts() / "dashboard-chain-waiting.png"), full_page=True)
    # And the first's page names the job that needs it
    chain.locator(".depends-on a").click()
    expect(page.locator("#job-title")).to_have_text("chain-first")
    expect(page.locator("#job-chain .needed-by")).to_contain_text("Needed by: chain-second")
    # Then once the first completes, the second runs to the end, live
    page.locator("#job-chain .needed-by a").click()
    expect(page.locator("#job-status")).to_have_text("completed", timeout=TRAINING_MS)
    expect(page.locator("#job-chain .depends-on .dep-status")).to_have_text("completed")
    expect(page.locator("#job-chain .waiting-on")).to_have_count(0)
    assert not problems, problems
    context.close()


@pytest.mark.e2e
def test_without_keys_the_dashboard_says_access_control_is_off(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, browser: Browser
) -> None:
    # Given a gateway without API keys (so on loopback only); the page needs no other service
    system = System(redis_server.url, tmp_path_factory.mktemp("open"))
    system.start("gateway")
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{system.port}/"), 30, "the gateway to serve the dashboard")
        page = browser.new_page()
        # When the dashboard is opened
        page.goto(f"http://127.0.0.1:{system.port}/")
        # Then it needs no key, and says that access control is off
        expect(page.locator("#notice")).to_contain_text("Access control is off")
        expect(page.locator("#who")).to_have_text("anonymous (admin)")
        expect(page.locator("#sign-in")).to_be_hidden()
        expect(page.locator("#sign-out")).to_be_hidden()
        expect(page.locator("#live")).to_have_text("live")
        page.close()
    finally:
        system.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
