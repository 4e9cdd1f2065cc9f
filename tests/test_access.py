"""Access control through the real gateway app and a real Redis: API keys with roles, owners'
jobs, admin-only audit, short-lived tokens for browsers, and refusing to serve unprotected."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import itsdangerous.timed
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode
from events.log import catch_up
from services.config import ConfigError, load_settings
from services.gateway.app import create_app
from services.gateway.auth import parse_keys
from services.gateway.projection import Projection
from tests.conftest import RedisServer, wait_for
from tests.examples import LM
from tests.system import System

ALICE, BOB, ROOT = "alice-key-0123456789", "bob-key-0123456789ab", "root-key-0123456789ab"
KEYS = f"alice:user:{ALICE}, bob:user:sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\nroot:admin:{ROOT}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def gateway(bus: Bus, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Projection]]:
    # Given a job of alice's and one of bob's, queued
    for job_id, owner in (("job-alice", "alice"), ("job-bob", "bob")):
        await bus.append(
            bus.keys.events,
            m.JobAccepted(job_id=job_id, spec=LM, actor=owner),
            m.JobQueued(job_id=job_id, position=1, actor=owner),
        )
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", api_keys=KEYS)
    projection = Projection(bus, bus.redis)
    await catch_up(bus, projection.state)
    app = create_app(settings, bus, projection)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway/api/v1") as client:
        yield client, projection


async def test_a_missing_or_wrong_key_is_401_and_health_stays_open(
    gateway: tuple[httpx.AsyncClient, Projection],
) -> None:
    api, _ = gateway
    for headers in ({}, bearer("not-a-key-at-all-000"), {"Authorization": f"Basic {ALICE}"}):
        response = await api.get("/training/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await api.get("/training/health")).status_code != 401


async def test_a_user_sees_and_acts_on_their_own_jobs_only(gateway: tuple[httpx.AsyncClient, Projection]) -> None:
    api, _ = gateway
    alice = bearer(ALICE)
    listed = (await api.get("/training/jobs", headers=alice)).json()["jobs"]
    assert [job["job_id"] for job in listed] == ["job-alice"]
    assert [e["job_id"] for e in (await api.get("/training/queue", headers=alice)).json()["queue"]] == ["job-alice"]
    for method, path in (
        ("GET", "/training/jobs/job-bob"),
        ("GET", "/training/jobs/job-bob/events"),
        ("GET", "/training/jobs/job-bob/timeline"),
        ("GET", "/training/jobs/job-bob/stream"),
        ("GET", "/training/queue/job-bob/status"),
        ("POST", "/training/jobs/job-bob/cancel"),
        ("PATCH", "/training/queue/job-bob"),
        ("DELETE", "/training/queue/job-bob"),
    ):
        response = await api.request(method, path, headers=alice, json={"priority": 9})
        assert response.status_code == 404, (method, path, response.text)
    assert (await api.get("/training/jobs/job-alice", headers=alice)).status_code == 200


async def test_an_admin_sees_and_acts_on_every_job_and_commands_carry_who_asked(
    gateway: tuple[httpx.AsyncClient, Projection], bus: Bus
) -> None:
    api, _ = gateway
    root = bearer(ROOT)
    listed = (await api.get("/training/jobs", headers=root)).json()["jobs"]
    assert {job["job_id"] for job in listed} == {"job-alice", "job-bob"}
    owned = (await api.get("/training/jobs", headers=root, params={"owner": "bob"})).json()["jobs"]
    assert [job["job_id"] for job in owned] == ["job-bob"]
    assert (await api.post("/training/jobs/job-bob/cancel", headers=root)).status_code == 202
    assert (await api.post("/training/jobs/job-alice/cancel", headers=bearer(ALICE))).status_code == 202
    commands = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.commands)]
    assert [(c.job_id, c.actor) for c in commands] == [("job-bob", "root"), ("job-alice", "alice")]


async def test_the_audit_log_is_for_admins(gateway: tuple[httpx.AsyncClient, Projection]) -> None:
    api, _ = gateway
    for path in ("/audit/events", "/audit/state"):
        response = await api.get(path, headers=bearer(BOB))
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
        assert (await api.get(path, headers=bearer(ROOT))).status_code == 200
    events = (await api.get("/audit/events", headers=bearer(ROOT))).json()["events"]
    assert [e["actor"] for e in events] == ["alice", "alice", "bob", "bob"]


async def test_browsers_use_a_short_lived_signed_token_not_the_key(
    gateway: tuple[httpx.AsyncClient, Projection], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, _ = gateway
    issued = await api.post("/auth/token", headers=bearer(ALICE))
    assert issued.status_code == 200 and issued.json()["role"] == "user"
    token = issued.json()["token"]
    assert ALICE not in token
    # The token in the URL (what an EventSource can send), or the cookie set with it
    assert (await api.get("/training/jobs/job-alice", params={"access_token": token})).status_code == 200
    assert (await api.get("/training/jobs/job-bob", params={"access_token": token})).status_code == 404
    cookie = issued.cookies["st_token"]
    api.cookies.clear()
    assert (await api.get("/auth/me")).status_code == 401
    me = await api.get("/auth/me", headers={"Cookie": f"st_token={cookie}"})
    assert me.json() == {"name": "alice", "role": "user", "team": None, "access_control": True}
    # A token altered in any byte, or one past its lifetime, is refused
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert (await api.get("/auth/me", params={"access_token": forged})).status_code == 401
    later = itsdangerous.timed.time.time() + 3600
    monkeypatch.setattr(itsdangerous.timed.time, "time", lambda: later)
    assert (await api.get("/auth/me", params={"access_token": token})).status_code == 401


def test_keys_are_checked_and_kept_hashed() -> None:
    keys = parse_keys(KEYS)
    assert {p.name: p.role for p in keys.values()} == {"alice": "user", "bob": "user", "root": "admin"}
    assert ALICE not in repr(keys) and all(len(digest) == 64 for digest in keys)
    for bad in ("alice:owner:0123456789abcdef", "alice:user:short", "alice:user:sha256:xyz", "nobody"):
        with pytest.raises(ConfigError):
            parse_keys(bad)
    assert ALICE not in repr(load_settings(api_keys=KEYS))


def test_a_key_entry_may_name_the_users_team() -> None:
    keys = parse_keys(f"alice:user@ml:{ALICE}, bob:user:{BOB}, carol:admin@ml-2.x:sha256:{'0' * 64}")
    assert {p.name: (p.role, p.team) for p in keys.values()} == {
        "alice": ("user", "ml"),
        "bob": ("user", None),
        "carol": ("admin", "ml-2.x"),
    }
    for bad, named in (
        (f"alice:user@:{ALICE}", "(alice): team ''"),
        (f"alice:user@m l:{ALICE}", "(alice): team 'm l'"),
        (f"alice:user@*:{ALICE}", "(alice): team '*'"),
        (f"alice:user@{'t' * 101}:{ALICE}", "(alice): team"),
        (f"alice:user@ml:{ALICE}, alice:user@cv:{BOB}", "entry 2 (alice): team cv, but an earlier entry"),
        (f"alice:user@ml:{ALICE}, alice:admin:{BOB}", "entry 2 (alice): team none"),
    ):
        with pytest.raises(ConfigError, match=re.escape(named)):
            parse_keys(bad)


async def test_a_browsers_token_carries_the_team(bus: Bus, tmp_path: Path) -> None:
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path, api_keys=f"alice:user@ml:{ALICE}")
    app = create_app(settings, bus, Projection(bus, bus.redis))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway/api/v1") as api:
        token = (await api.post("/auth/token", headers=bearer(ALICE))).json()["token"]
        api.cookies.clear()
        me = (await api.get("/auth/me", params={"access_token": token})).json()
    assert (me["name"], me["team"]) == ("alice", "ml")


def test_the_gateway_refuses_to_serve_unprotected_beyond_loopback(tmp_path: Path) -> None:
    env = {**os.environ, "APP_HOST": "0.0.0.0", "API_KEYS": "", "DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "gateway"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "API_KEYS" in done.stderr
    env["API_KEYS"] = "alice:user:tooshort"
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "gateway"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "16 characters" in done.stderr


def test_gateways_sharing_a_port_honour_each_others_tokens_and_one_serves_on_without_the_other(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Given two gateway processes on one port (APP_REUSE_PORT), no AUTH_SECRET configured
    system = System(redis_server.url, tmp_path / "data", API_KEYS=KEYS, APP_REUSE_PORT="true")
    system.start("gateway-1=gateway", "gateway-2=gateway")
    try:
        for name in ("gateway-1", "gateway-2"):
            wait_for(lambda name=name: "serving" in system.log(name), 60, f"{name} to serve", interval_s=0.2)

        def fresh(method: str, path: str, **kwargs: object) -> httpx.Response:
            """A request on a new connection: the kernel picks a gateway for each."""
            with httpx.Client(base_url=system.base.removesuffix("/training"), timeout=10) as client:
                return client.request(method, path, **kwargs)  # type: ignore[arg-type]

        # When browsers get tokens from whichever gateway answers, and use them on new connections
        tokens = [fresh("POST", "/auth/token", headers=bearer(ALICE)).json()["token"] for _ in range(12)]
        # Then every gateway honours every token (they read one signing key from their DATA_DIR)
        for token in tokens * 2:
            assert fresh("GET", "/auth/me", params={"access_token": token}).json()["name"] == "alice"
        # And when one gateway dies, the other serves every connection, old tokens included
        system.stop("gateway-1", sig=signal.SIGKILL)
        for token in tokens:
            assert fresh("GET", "/auth/me", params={"access_token": token}).status_code == 200
        # A gateway started without APP_REUSE_PORT cannot take the port from them
        alone = subprocess.run(
            [sys.executable, "-m", "services.cli", "gateway"],
            env={**system.env, "APP_REUSE_PORT": "false"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert alone.returncode != 0 and "in use" in alone.stderr + alone.stdout
    finally:
        system.stop()


async def test_the_new_fields_reach_no_other_users_job_or_sweep(gateway: tuple[httpx.AsyncClient, Projection]) -> None:
    api, projection = gateway
    alice = bearer(ALICE)
    # A job of bob's is, to alice, one that does not exist: as a dependency, as a deploy's source
    body = {"task_type": "deploy", "model_path": "Qwen/Qwen2.5-7B-Instruct", "depends_on": ["job-bob"]}
    refused = await api.post("/training/jobs", json=body, headers=alice)
    assert refused.status_code == 422 and "no job 'job-bob'" in refused.text
    refused = await api.post("/training/jobs", json={"task_type": "deploy", "source_job_id": "job-bob"}, headers=alice)
    assert refused.status_code == 422 and "no job 'job-bob'" in refused.text
    # and the list filters show her nothing of bob's
    projection.state.jobs["job-bob"].sweep_id = "sweep-bob"
    for query in ({"sweep_id": "sweep-bob"}, {"depends_on": "job-alice"}):
        assert (await api.get("/training/jobs", params=query, headers=alice)).json()["jobs"] == []
    # A sweep of bob's is not hers to read or cancel, nor in her list
    grid: dict[str, list[m.ExtraValue]] = {"lora_rank": [8]}
    projection.state.apply(
        "9999999999999-0", m.SweepCreated(sweep_id="sweep-bob", grid=grid, job_ids=["job-bob"], actor="bob")
    )
    assert (await api.get("/training/sweeps/sweep-bob", headers=alice)).status_code == 404
    assert (await api.post("/training/sweeps/sweep-bob/cancel", headers=alice)).status_code == 404
    assert (await api.get("/training/sweeps", headers=alice)).json()["total"] == 0
    assert (await api.get("/training/sweeps/sweep-bob", headers=bearer(BOB))).status_code == 200
