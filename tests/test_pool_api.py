"""Sharing the pool over REST: quotas read and replaced by admins, a job held back by its owner's
GPU quota while another user's job starts, the waiting-jobs limit as a 429 (checked by the
gateway, and by the scheduler for submissions that race past it), suspend and resume, usage per
user and team, fair share's order in /queue, and the timeline's sentences."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from events import messages as m
from events.bus import Bus, connect
from events.describe import describe
from events.log import catch_up
from events.quotas import Limit, Quotas
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection
from services.scheduler.service import main as scheduler_main
from tests.chaos import stand_in_swift
from tests.conftest import RedisServer, wait_for
from tests.examples import GPU, LM, started
from tests.system import System, running

ALICE, BOB, ROOT = "alice-key-0123456789", "bob-key-0123456789ab", "root-key-0123456789ab"
KEYS = f"alice:user@ml:{ALICE}, bob:user:{BOB}, root:admin:{ROOT}"
TERMINAL = ("completed", "failed", "cancelled")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def fields(response: httpx.Response) -> list[str]:
    return [detail["field"] for detail in response.json()["error"]["details"]]


# --- the real processes: gateway, scheduler, runner with the stand-in trainer ------------------


@contextlib.contextmanager
def stand_in_pool(redis_url: str, root: Path, **settings: str) -> Iterator[tuple[System, Path]]:
    """The whole system on two simulated GPUs, jobs run by the stand-in trainer (it starts in
    milliseconds, steps every 0.15 s, and saves a checkpoint when stopped), alice of team ml held
    to one GPU by the QUOTAS setting."""
    (root / "model").mkdir()
    (root / "train.jsonl").write_text("{}\n")
    quotas = '{"users": {"alice": {"gpus": 1}}}'
    base = {"SIMULATED_GPUS": "2", "SWIFT_BIN": str(stand_in_swift(root)), "API_KEYS": KEYS, "QUOTAS": quotas}
    with running(redis_url, root / "system", **base, STOP_GRACE_S="5", **settings) as system:
        yield system, root


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[System, Path]]:
    with stand_in_pool(redis_server.url, tmp_path_factory.mktemp("pool"), SUBMIT_WAIT_S="5") as system:
        yield system


@pytest.fixture
def api(pool: tuple[System, Path]) -> Iterator[dict[str, httpx.Client]]:
    system, _ = pool
    base = system.base.removesuffix("/training")
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(httpx.Client(base_url=base, headers=bearer(key), timeout=30))
            for name, key in (("alice", ALICE), ("bob", BOB), ("root", ROOT))
        }


def training(root: Path, name: str) -> dict[str, Any]:
    """A training job that runs until stopped."""
    return {
        "task_type": "language_model",
        "name": name,
        "model_path": str(root / "model"),
        "data_path": str(root / "train.jsonl"),
        "auto_export": False,
        "train_params": {"max_steps": 100_000, "save_steps": 100_000, "logging_steps": 1},
    }


def status(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/training/jobs/{job_id}").json()["status"])


def steps(client: httpx.Client, job_id: str) -> int:
    return int((client.get(f"/training/jobs/{job_id}").json()["progress"] or {}).get("step", 0))


def cancel_all(root: httpx.Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        root.post(f"/training/jobs/{job_id}/cancel")
    wait_for(lambda: all(status(root, j) in TERMINAL for j in job_ids), 30, "the jobs to end")


def test_a_users_gpu_quota_holds_their_second_job_while_another_users_starts(
    pool: tuple[System, Path], api: dict[str, httpx.Client]
) -> None:
    _, data = pool
    alice, bob, root = api["alice"], api["bob"], api["root"]
    # Given the QUOTAS setting in force: alice may hold one GPU
    wait_for(lambda: root.get("/admin/quotas").json()["from_config"], 30, "the QUOTAS setting to apply")
    table = root.get("/admin/quotas").json()
    assert table["quotas"] == {"users": {"alice": {"gpus": 1, "queued": None}}, "teams": {}}
    assert (table["known_users"], table["known_teams"]) == (["alice", "bob", "root"], ["ml"])
    # A user may neither read nor change the table
    for response in (alice.get("/admin/quotas"), alice.put("/admin/quotas", json={})):
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"

    # When alice's first job starts, her second waits for her quota, with a free GPU left
    first = alice.post("/training/jobs", json=training(data, "a1")).json()
    assert first["status"] in ("scheduled", "running"), first
    second = alice.post("/training/jobs", json=training(data, "a2")).json()
    assert second["status"] == "queued", second
    [entry] = alice.get("/training/queue").json()["queue"]
    assert (entry["job_id"], entry["waiting_reason"], entry["team"]) == (second["job_id"], "quota", "ml")
    assert entry["waiting_message"] == "quota: user alice holds 1 of 1 GPUs and the job needs 1"
    assert entry["order_reason"] == "priority 5, submitted 1st"
    status_view = alice.get(f"/training/queue/{second['job_id']}/status").json()
    assert (status_view["queued"], status_view["waiting_reason"]) == (True, "quota")
    # Then bob's job, submitted after it, starts on the GPU she may not take
    third = bob.post("/training/jobs", json=training(data, "b1")).json()
    assert third["status"] in ("scheduled", "running"), third
    assert status(alice, second["job_id"]) == "queued"
    assert alice.get(f"/training/jobs/{second['job_id']}").json()["team"] == "ml"

    # Usage: a user sees their own row and their team's; an admin every user and team
    mine = alice.get("/usage").json()
    assert [row["name"] for row in mine["users"]] == ["alice"] and [row["name"] for row in mine["teams"]] == ["ml"]
    [row] = mine["users"]
    assert (row["gpus_in_use"], row["gpus_within_quota"], row["jobs_waiting"]) == (1, 1, 1)
    assert row["limit"] == {"gpus": 1, "queued": None} and mine["teams"][0]["limit"] is None
    assert mine["teams"][0]["gpus_in_use"] == 1 and mine["fair_share"] is False
    theirs = bob.get("/usage").json()
    assert [row["name"] for row in theirs["users"]] == ["bob"] and theirs["teams"] == []
    assert theirs["users"][0]["gpus_in_use"] == 1 and theirs["users"][0]["limit"] is None
    everyone = root.get("/usage").json()
    assert [row["name"] for row in everyone["users"]] == ["alice", "bob", "root"]
    assert [row["name"] for row in everyone["teams"]] == ["ml"]

    # When an admin limits alice to one waiting job, her next submission is a 429 naming it
    put = root.put("/admin/quotas", json={"users": {"alice": {"gpus": 1, "queued": 1}}})
    assert put.status_code == 200, put.text
    assert (put.json()["applied"], put.json()["from_config"]) == (True, False)
    assert put.json()["quotas"]["users"]["alice"] == {"gpus": 1, "queued": 1}
    over = alice.post("/training/jobs", json=training(data, "a3"))
    assert over.status_code == 429, over.text
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["message"] == "over quota: user alice has 1 jobs waiting, and its quota allows 1"
    assert [job["spec"]["name"] for job in alice.get("/training/jobs").json()["jobs"]] == ["a2", "a1"]  # none added

    # Suspend and resume do not apply to a queued job: 409 naming its status; another's job is a 404
    for action in ("suspend", "resume"):
        refused = alice.post(f"/training/jobs/{second['job_id']}/{action}")
        assert refused.status_code == 409 and refused.json()["error"]["details"] == [
            {"field": "status", "message": "queued"}
        ]
        assert bob.post(f"/training/jobs/{first['job_id']}/{action}").status_code == 404
    cancel_all(root, [first["job_id"], second["job_id"], third["job_id"]])


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"users": {"alice": {"gpus": -1}}}, "users.alice.gpus"),
        ({"users": {"alice": {"gpus": 1.5}}}, "users.alice.gpus"),
        ({"users": {"alice": {"queued": "2"}}}, "users.alice.queued"),
        ({"users": {"alice": {"gpus": True}}}, "users.alice.gpus"),
        ({"users": {"alice": {"cpus": 1}}}, "users.alice.cpus"),
        ({"groups": {}}, "groups"),
        ({"users": {"carol": {"gpus": 1}}}, "users.carol"),  # no API key is carol's
        ({"teams": {"cv": {"gpus": 1}}}, "teams.cv"),  # no key names team cv
        ({"users": {"bad name": {"gpus": 1}}}, "users.bad name.[key]"),
        ([], "body"),
    ],
)
def test_a_bad_quota_table_is_a_422_naming_the_field(api: dict[str, httpx.Client], table: object, field: str) -> None:
    response = api["root"].put("/admin/quotas", json=table)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error" and fields(response) == [field]
    assert field in response.json()["error"]["message"]


def test_suspend_and_resume_over_rest(pool: tuple[System, Path], api: dict[str, httpx.Client]) -> None:
    _, data = pool
    bob, root = api["bob"], api["root"]
    job_id = bob.post("/training/jobs", json=training(data, "b-suspend")).json()["job_id"]

    def job() -> dict[str, Any]:
        return bob.get(f"/training/jobs/{job_id}").json()  # type: ignore[no-any-return]

    wait_for(lambda: (job()["progress"] or {}).get("step", 0) >= 2, 30, "the job to train a few steps")
    # When its owner suspends it, it stops with a checkpoint, its GPUs freed
    suspended = bob.post(f"/training/jobs/{job_id}/suspend")
    assert suspended.status_code == 202 and suspended.json()["status"] == "running", suspended.text
    wait_for(lambda: job()["status"] == "suspended" and not job()["stopping"], 30, "the job to stop")
    stopped = job()
    assert stopped["last_checkpoint"] and stopped["checkpoint_step"] >= 2 and stopped["gpu_ids"]
    held = {gpu["held_by"] for node in root.get("/training/gpus").json()["nodes"] for gpu in node["gpus"]}
    assert job_id not in held
    again = bob.post(f"/training/jobs/{job_id}/suspend")
    assert again.status_code == 409 and fields(again) == ["status"] and "it is suspended" in again.text
    # Then resuming queues it again, and it runs on from its checkpoint
    assert bob.post(f"/training/jobs/{job_id}/resume").status_code == 202
    wait_for(lambda: job()["status"] == "running" and job()["attempt"] == 2, 30, "the job to run again")
    texts = [item["text"] for item in bob.get(f"/training/jobs/{job_id}/timeline").json()["timeline"]]
    assert "suspend" not in " ".join(texts[:3])
    assert any(text.startswith("suspended by bob") for text in texts), texts
    assert any(text.startswith(f"stopped; checkpoint at step {stopped['checkpoint_step']} saved: ") for text in texts)
    assert any(text.startswith("resumed by bob: queued again at position 1") for text in texts), texts
    assert bob.post(f"/training/jobs/{job_id}/resume").status_code == 409
    # A deploy job is never suspended, nor a finished job
    deploy = bob.post("/training/jobs", json={"task_type": "deploy", "model_path": str(data / "model"), "hold": True})
    refused = bob.post(f"/training/jobs/{deploy.json()['job_id']}/suspend")
    assert refused.status_code == 409 and refused.json()["error"]["details"] == [{"field": "status", "message": "held"}]
    assert "a deploy job is not suspended" in refused.json()["error"]["message"]
    cancel_all(root, [job_id, deploy.json()["job_id"]])
    finished = bob.post(f"/training/jobs/{job_id}/suspend")
    assert finished.status_code == 409 and finished.json()["error"]["details"] == [
        {"field": "status", "message": "cancelled"}
    ]


@pytest.fixture(scope="module")
def borrowing_pool(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[System, Path]]:
    """With borrowing on: alice's jobs over her one-GPU quota may use a GPU no job within quota
    waits for, until one does."""
    with stand_in_pool(redis_server.url, tmp_path_factory.mktemp("borrowing"), QUOTA_BORROWING="true") as system:
        yield system


def test_a_job_borrowing_over_its_quota_gives_its_gpu_back_when_another_users_job_needs_it(
    borrowing_pool: tuple[System, Path],
) -> None:
    system, data = borrowing_pool
    base = system.base.removesuffix("/training")
    with contextlib.ExitStack() as stack:
        alice, bob, root = (
            stack.enter_context(httpx.Client(base_url=base, headers=bearer(key), timeout=30))
            for key in (ALICE, BOB, ROOT)
        )
        wait_for(lambda: root.get("/admin/quotas").json()["from_config"], 30, "the QUOTAS setting to apply")

        def events(job_id: str) -> list[dict[str, Any]]:
            return list(root.get(f"/training/jobs/{job_id}/events").json()["events"])

        # Given alice's first job within her quota, and her second over it, borrowing the free GPU
        first = alice.post("/training/jobs", json=training(data, "a1")).json()["job_id"]
        borrower = alice.post("/training/jobs", json=training(data, "a2")).json()["job_id"]
        wait_for(lambda: status(alice, borrower) == "running", 30, "the borrower to run")
        # (trained a step: a trainer stopped before its first step has nothing to save)
        wait_for(lambda: steps(alice, borrower) >= 1, 30, "the borrower to train a step")
        [scheduled] = [e for e in events(borrower) if e["type"] == "job.scheduled"]
        assert scheduled["payload"]["borrowing"] is True
        # When bob, within his quota, submits a job and no GPU is free
        urgent = bob.post("/training/jobs", json=training(data, "b1")).json()["job_id"]
        # Then the borrower is preempted for it, whatever their priorities, and bob's job runs on its GPU
        wait_for(lambda: status(bob, urgent) == "running", 30, "bob's job to run")
        [preempted] = [e for e in events(borrower) if e["type"] == "job.preempted"]
        assert (preempted["payload"]["by_job_id"], preempted["payload"]["reason"]) == (urgent, "borrowing")
        stopped = wait_for(
            lambda: next((e for e in events(borrower) if e["type"] == "job.stopped"), None), 30, "the borrower's stop"
        )
        assert stopped["payload"]["reason"] == "preempt" and stopped["payload"]["last_checkpoint"]
        gpus = {
            gpu["index"]: gpu["held_by"] for node in root.get("/training/gpus").json()["nodes"] for gpu in node["gpus"]
        }
        assert sorted(gpus.values()) == sorted([first, urgent])
        # And it waits again, for alice's quota, to resume from the checkpoint it saved
        wait_for(lambda: status(alice, borrower) == "queued", 30, "the borrower to be queued again")
        [entry] = alice.get("/training/queue").json()["queue"]
        assert (entry["job_id"], entry["waiting_reason"]) == (borrower, "quota")
        cancel_all(root, [first, borrower, urgent])


# --- the gateway in this process, over a log written by hand or by the real scheduler ----------


@contextlib.asynccontextmanager
async def gateway(bus: Bus, tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Projection]]:
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", **overrides)
    projection = Projection(bus, bus.redis)
    await catch_up(bus, projection.state)
    app = create_app(settings, bus, projection)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost/api/v1") as client:
        yield client, projection


async def test_a_submission_the_scheduler_rejects_over_quota_is_a_429(
    bus: Bus, redis_server: RedisServer, tmp_path: Path, local_job: dict[str, Any]
) -> None:
    # Given a limit of one waiting job, and a first job submitted but not decided yet: the
    # gateway's check lets a second one through, as it does submissions that race each other
    one = Quotas(users={"anonymous": Limit(queued=1)})
    await bus.append(bus.keys.commands, m.SetQuotas(quotas=one, actor="anonymous"))
    await bus.append(bus.keys.commands, m.SubmitJob(job_id="first", spec=LM, actor="anonymous"))
    config = {"submit_wait_s": 20, "path_roots": str(tmp_path), "redis_url": redis_server.url}
    scheduler_settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", **config)
    async with gateway(bus, tmp_path, **config) as (client, projection), anyio.create_task_group() as tg:
        projection.reader = connect(redis_server.url, block_ms=1000)
        tg.start_soon(projection.run)
        answer: list[httpx.Response] = []

        async def submit() -> None:
            answer.append(await client.post("/training/jobs", json=local_job))

        with anyio.fail_after(30):
            tg.start_soon(submit)
            while not answer and await bus.redis.xlen(bus.keys.commands) < 3:  # the second submit is in
                await anyio.sleep(0.02)
            # When the scheduler decides both: the second is rejected for the quota
            tg.start_soon(scheduler_main, scheduler_settings, Bus(bus.redis, bus.keys, "scheduler@test"), bus.redis)
            while not answer:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    await projection.reader.aclose()
    # Then its answer is a 429 too, not an accepted job
    response = answer[0]
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "user anonymous has 1 jobs waiting, and its quota allows 1" in error["message"]
    [rejected] = [job for job in projection.state.jobs.values() if job.job_id != "first"]
    assert (rejected.status, rejected.reason) == ("failed", "quota")
    assert f"job {rejected.job_id} was rejected" in error["message"]


@pytest.fixture
async def shared_log(bus: Bus) -> datetime:
    """A node with one GPU that bob's job has held for two hours (one credited at its checkpoint
    an hour ago), bob's job queued half an hour ago and alice's (team ml) ten minutes ago, both
    priority 5; alice may hold no GPU."""
    now = datetime.now(UTC)
    hours = [now - timedelta(hours=h) for h in (2, 1)]
    facts: list[m.Message] = [
        m.NodeJoined(node="n1", simulated=True, gpus=[GPU]),
        m.QuotasChanged(quotas=Quotas(users={"alice": Limit(gpus=0)}), actor="root"),
        m.JobAccepted(job_id="b-run", spec=LM, actor="bob", at=hours[0]),
        m.JobQueued(job_id="b-run", position=1, at=hours[0]),
        m.JobScheduled(job_id="b-run", node="n1", gpu_ids=[0], attempt=1, at=hours[0]),
        started("b-run", 1, "n1", "0").model_copy(update={"at": hours[0]}),
        m.CheckpointSaved(job_id="b-run", attempt=1, step=10, path="/r/checkpoint-10", at=hours[1]),
        m.JobAccepted(job_id="b-q", spec=LM, actor="bob", at=now - timedelta(minutes=30)),
        m.JobQueued(job_id="b-q", position=1),
        m.JobAccepted(job_id="a-q", spec=LM, actor="alice", team="ml", at=now - timedelta(minutes=10)),
        m.JobQueued(job_id="a-q", position=2),
    ]
    await bus.append(bus.keys.events, *facts)
    return now


@pytest.mark.parametrize("fair_share", [False, True])
async def test_the_queue_says_why_each_job_is_where_it_is(
    bus: Bus, tmp_path: Path, shared_log: datetime, fair_share: bool
) -> None:
    async with gateway(bus, tmp_path, api_keys=KEYS, fair_share=fair_share) as (client, _):
        queue = (await client.get("/training/queue", headers=bearer(ROOT))).json()["queue"]
    reasons = {e["job_id"]: (e["position"], e["order_reason"], e["waiting_reason"]) for e in queue}
    quota = "quota: user alice holds 0 of 0 GPUs and the job needs 1"
    assert {e["job_id"]: e["waiting_message"] for e in queue} == {"a-q": quota, "b-q": "waiting for free GPUs"}
    if not fair_share:  # by submit order within the priority
        assert reasons == {
            "b-q": (1, "priority 5, submitted 1st", "gpus"),
            "a-q": (2, "priority 5, submitted 2nd", "quota"),
        }
    else:  # alice has used nothing, bob an hour (decayed by a week's half-life: a little less)
        assert reasons == {
            "a-q": (
                1,
                "priority 5; fair share: owner alice used 0.0 GPU-h (decayed), submitted 1st of theirs",
                "quota",
            ),
            "b-q": (2, "priority 5; fair share: owner bob used 1.0 GPU-h (decayed), submitted 1st of theirs", "gpus"),
        }


async def test_usage_counts_gpu_hours_up_to_now_and_shows_each_their_rows(
    bus: Bus, tmp_path: Path, shared_log: datetime
) -> None:
    async with gateway(bus, tmp_path, api_keys=KEYS) as (client, _):
        everyone, alice, bob = [(await client.get("/usage", headers=bearer(key))).json() for key in (ROOT, ALICE, BOB)]
    rows = {row["name"]: row for row in everyone["users"]}
    assert list(rows) == ["alice", "bob", "root"] and [row["name"] for row in everyone["teams"]] == ["ml"]
    # bob: one GPU for two hours (one credited in the log, one held since), one job waiting
    used = rows["bob"]
    assert (used["gpus_in_use"], used["gpus_within_quota"], used["jobs_waiting"], used["limit"]) == (1, 1, 1, None)
    assert used["gpu_hours_day"] == pytest.approx(2.0, abs=0.01) == used["gpu_hours_week"]
    assert 1.98 < used["decayed_gpu_hours"] < 2.0
    assert (rows["alice"]["jobs_waiting"], rows["alice"]["limit"]) == (1, {"gpus": 0, "queued": None})
    assert rows["alice"]["gpu_hours_week"] == 0 and everyone["teams"][0]["jobs_waiting"] == 1
    assert ([r["name"] for r in alice["users"]], [r["name"] for r in alice["teams"]]) == (["alice"], ["ml"])
    assert ([r["name"] for r in bob["users"]], bob["teams"]) == (["bob"], [])
    steady = [key for key in used if "hours" not in key]  # (the hours go on growing)
    assert {key: bob["users"][0][key] for key in steady} == {key: used[key] for key in steady}


async def test_a_job_carries_its_submitters_team_before_the_decision_too(
    bus: Bus, redis_server: RedisServer, tmp_path: Path, local_job: dict[str, Any]
) -> None:
    config = {"api_keys": KEYS, "submit_wait_s": 0, "path_roots": str(tmp_path)}
    async with gateway(bus, tmp_path, **config) as (client, projection), anyio.create_task_group() as tg:
        projection.reader = connect(redis_server.url, block_ms=1000)
        tg.start_soon(projection.run)
        answer = await client.post("/training/jobs", json=local_job, headers=bearer(ALICE))
        assert answer.status_code == 202 and answer.json()["status"] == "pending"  # no scheduler here
        job_id = answer.json()["job_id"]
        with anyio.fail_after(10):
            await projection.wait_until(lambda: job_id in projection.pending, 10)
        job = (await client.get(f"/training/jobs/{job_id}", headers=bearer(ALICE))).json()
        tg.cancel_scope.cancel()
    await projection.reader.aclose()
    assert (job["status"], job["team"]) == ("pending", "ml")
    [(_, entry)] = await bus.redis.xrange(bus.keys.commands)
    assert entry["type"] == "job.submit" and '"team":"ml"' in entry["data"]


async def test_with_access_control_off_a_table_names_only_anonymous(bus: Bus, tmp_path: Path) -> None:
    async with gateway(bus, tmp_path, submit_wait_s=0) as (client, _):
        table = (await client.get("/admin/quotas")).json()
        refused = await client.put("/admin/quotas", json={"users": {"alice": {"gpus": 1}}})
        sent = await client.put("/admin/quotas", json={"users": {"anonymous": {"gpus": 1}, "*": {"queued": 3}}})
    assert (table["known_users"], table["known_teams"]) == (["anonymous"], [])
    assert refused.status_code == 422 and fields(refused) == ["users.alice"]
    assert sent.status_code == 202 and sent.json()["applied"] is False  # no scheduler to apply it here
    [(_, entry)] = await bus.redis.xrange(bus.keys.commands)
    assert entry["type"] == "quotas.set" and '"actor":"anonymous"' in entry["data"]


# --- the timeline's sentences ------------------------------------------------------------------


def test_the_timeline_tells_preemption_suspension_and_quota_changes() -> None:
    job = {"job_id": "job-1"}
    texts = [
        describe(m.JobPreempted(attempt=1, by_job_id="job-2", reason="priority", step=40, **job)),
        describe(m.JobPreempted(attempt=1, by_job_id="job-2", reason="borrowing", **job)),
        describe(m.JobStopped(attempt=1, last_checkpoint="/o/checkpoint-42", step=42, reason="preempt", **job)),
        describe(m.JobStopped(attempt=1, reason="suspend", **job)),
        describe(m.JobStopped(attempt=1, reason="node_lost", **job)),
        describe(m.JobSuspended(attempt=1, actor="bob", **job)),
        describe(m.JobResumed(position=2, behind_job_id="job-0", actor="bob", **job)),
        describe(m.QuotasChanged(quotas=Quotas(users={"a": Limit(gpus=1)}), actor="root")),
        describe(m.QuotasChanged(quotas=Quotas(), from_config=True, actor="config")),
        describe(m.JobScheduled(node="n1", gpu_ids=[0, 1], attempt=1, preempted=["job-3", "job-4"], **job)),
        describe(m.JobScheduled(node="n1", gpu_ids=[0], attempt=2, borrowing=True, **job)),
    ]
    assert texts == [
        "preempted by job job-2 (a higher priority) at step 40",
        "preempted by job job-2 (within its quota; this one was borrowing) before its first step",
        "stopped; checkpoint at step 42 saved: /o/checkpoint-42",
        "stopped without a new checkpoint",
        "stopped (its node was lost) without a new checkpoint",
        "suspended by bob: its GPUs are freed; it waits to be resumed",
        "resumed by bob: queued again at position 2, behind job job-0",
        "quotas changed by root: 1 user, 0 teams",
        "quotas set from the QUOTAS setting: 0 users, 0 teams",
        "placed on node n1, GPUs 0, 1 (attempt 1), preempting jobs job-3, job-4",
        "placed on node n1, GPU 0 (attempt 2), borrowing: over its quota, on GPUs no job within quota waited for",
    ]
