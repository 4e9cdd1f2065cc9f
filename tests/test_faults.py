"""Faults through the real processes: services are SIGKILLed mid-flight and restarted; no accepted
job is lost, nothing runs or is reported twice, and cancel leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from events.keys import Keys
from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer, wait_for
from tests.system import System, job_body, on_own_redis, read_stream, running, seen

pytestmark = pytest.mark.e2e


@pytest.fixture
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("faults"), STOP_GRACE_S="10") as system:
        yield system


def history(system: System, job_id: str) -> list[dict[str, object]]:
    return httpx.get(f"{system.base}/jobs/{job_id}/events").json()["events"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_runner_killed_mid_job_is_replaced_and_the_job_runs_and_reports_once(
    system: System, assets: DemoAssets
) -> None:
    body = job_body(assets, max_steps=16, save_steps=8)
    body["auto_export"] = False
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    url = f"{system.base}/jobs/{job_id}/stream"
    first = read_stream(url, seen("job.started"))
    # Given the runner is SIGKILLed while its trainer starts up
    system.stop("runner", sig=signal.SIGKILL)
    pid = httpx.get(f"{system.base}/jobs/{job_id}").json()["pid"]
    assert alive(pid), "the trainer must outlive its runner"
    # When a new runner starts
    system.start("runner")
    rest = read_stream(url, seen("job.succeeded"), last_event_id=first[-1].id)
    # Then it adopted the trainer: one start, one end, progress to the last step, each checkpoint once
    types = [e["type"] for e in history(system, job_id)]
    assert types.count("job.started") == 1 and types.count("job.succeeded") == 1
    steps = [e["payload"]["step"] for e in history(system, job_id) if e["type"] == "job.progress"]
    assert steps == sorted(steps) and steps[-1] == 16
    saved = [e["payload"]["path"] for e in history(system, job_id) if e["type"] == "job.checkpoint_saved"]
    assert len(saved) == len(set(saved)) == 2
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["last_checkpoint"].endswith("checkpoint-16")
    assert [e.event for e in rest][-1] == "job.succeeded"
    # And the output lines were not sent twice
    lines = httpx.get(f"{system.base}/jobs/{job_id}/logs", params={"tail": 10000}).json()["lines"]
    assert sum("last_model_checkpoint:" in line["line"] for line in lines) == 1


def test_a_job_submitted_while_the_scheduler_is_down_is_decided_when_it_returns(
    system: System, assets: DemoAssets
) -> None:
    # Given the scheduler is SIGKILLed
    system.stop("scheduler", sig=signal.SIGKILL)
    body = job_body(assets, max_steps=4, save_steps=4)
    body["auto_export"] = False
    # When a job is submitted, it is accepted but nobody decides
    created = httpx.post(f"{system.base}/jobs", json=body).json()
    assert created["status"] == "pending"
    # And the gateway is SIGKILLed and restarted too
    system.stop("gateway", sig=signal.SIGKILL)
    system.start("gateway", "scheduler")
    system.wait_healthy()
    # Then the returning scheduler takes the command and the job runs to the end, once
    events = read_stream(f"{system.base}/jobs/{created['job_id']}/stream", seen("job.succeeded"))
    types = [e.event for e in events]
    assert types[:4] == ["job.accepted", "job.queued", "job.scheduled", "job.started"]
    assert types.count("job.scheduled") == 1


def test_cancel_of_a_running_job_stops_every_process_and_frees_its_gpu(system: System, assets: DemoAssets) -> None:
    body = job_body(assets, max_steps=5000, save_steps=1000, logging_steps=1)
    body["auto_export"] = False
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    url = f"{system.base}/jobs/{job_id}/stream"
    first = read_stream(url, seen("job.progress"))
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert job["status"] == "running"
    # When it is cancelled
    response = httpx.post(f"{system.base}/jobs/{job_id}/cancel")
    assert response.status_code == 202
    rest = read_stream(url, seen("job.cancelled"), last_event_id=first[-1].id)
    assert "job.cancel_requested" in [e.event for e in rest]
    # Then no process of the job is left, and its GPU is free again
    with pytest.raises(ProcessLookupError):
        os.killpg(job["pid"], 0)
    gpus = httpx.get(f"{system.base}/gpus").json()["nodes"][0]["gpus"]
    assert all(gpu["held_by"] is None for gpu in gpus)
    cancelled = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert cancelled["status"] == "cancelled"
    # with the checkpoint saved on the way out (SIGTERM, with a jit checkpoint)
    assert cancelled["last_checkpoint"] and Path(cancelled["last_checkpoint"]).is_dir()
    # And a second cancel is refused with the state it is in
    again = httpx.post(f"{system.base}/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["error"]["message"]
    wait_for(lambda: not alive(job["pid"]), 5, "the trainer to be gone")


def test_a_standby_scheduler_takes_over_when_the_leader_dies(system: System, tmp_path: Path) -> None:
    # Given a second scheduler standing by
    system.start("standby=scheduler")
    keys = Keys(system.namespace)
    client = redis.Redis.from_url(system.env["REDIS_URL"], decode_responses=True)
    leader = wait_for(lambda: client.get(keys.leader), 10, "a leader")
    leader_name = next(name for name, p in system.processes.items() if leader.endswith(f"-{p.pid}"))
    other = "standby" if leader_name == "scheduler" else "scheduler"
    # When the leader is SIGKILLed
    system.stop(leader_name, sig=signal.SIGKILL)
    # Then a job submitted now is decided by the other one, within the lease time
    (tmp_path / "m").mkdir()
    body = {
        "task_type": "language_model",
        "model_path": str(tmp_path / "m"),
        "data_path": str(tmp_path / "m"),
        "auto_export": False,
    }
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    wait_for(lambda: httpx.get(f"{system.base}/jobs/{job_id}").json()["status"] != "pending", 30, "a decision")
    [decision] = [e for e in history(system, job_id) if e["type"] == "job.accepted"]
    assert decision["source"].endswith(f"-{system.processes[other].pid}")
    assert int(client.get(keys.fence)) == 2  # the new leader holds a newer fencing token
    client.close()


def test_a_redis_crash_mid_job_loses_nothing(assets: DemoAssets, tmp_path: Path) -> None:
    # Given the system on its own Redis, with AOF, and a job training
    with on_own_redis(tmp_path) as (server, system):
        body = job_body(assets, max_steps=16, save_steps=8)
        job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
        url = f"{system.base}/jobs/{job_id}/stream"
        first = read_stream(url, seen("job.started"))
        # When Redis is SIGKILLed and comes back on the same files
        server.stop(kill=True)
        server.start()
        # Then every service carries on, and the job trains and exports to the end
        system.wait_healthy()
        rest = read_stream(url, seen("export.completed"), last_event_id=first[-1].id)
        types = [e["type"] for e in history(system, job_id)]
        assert [e.id for e in first + rest] == [e["entry_id"] for e in history(system, job_id)]
        assert types.count("job.started") == 1 and types.count("job.succeeded") == 1
        assert all(process.poll() is None for process in system.processes.values())


def test_a_job_that_dies_while_its_runner_is_down_is_lost_and_retried(system: System, assets: DemoAssets) -> None:
    body = {**job_body(assets, max_steps=100_000, save_steps=100_000), "auto_export": False, "max_retries": 1}
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    url = f"{system.base}/jobs/{job_id}/stream"
    first = read_stream(url, seen("job.started"))
    # Given the runner and then the job's whole process group are SIGKILLed
    system.stop("runner", sig=signal.SIGKILL)
    pgid = httpx.get(f"{system.base}/jobs/{job_id}").json()["pid"]
    os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not alive(pgid), 10, "the trainer to be gone")
    # When a runner comes back
    system.start("runner")
    # Then it reports the attempt lost (never left running), and the scheduler runs it again
    events = read_stream(url, lambda evs: sum(e.event == "job.started" for e in evs) == 1, last_event_id=first[-1].id)
    assert [e.event for e in events if e.event != "job.progress"] == [
        "job.lost",
        "job.requeued",
        "job.scheduled",
        "job.started",
    ]
    assert json.loads(events[-1].data)["payload"]["attempt"] == 2
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert (job["status"], job["attempt"], job["retries"]) == ("running", 2, 1)
    # And lost once more, with no retries left, it fails with the reason
    system.stop("runner", sig=signal.SIGKILL)
    os.killpg(job["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(job["pid"]), 10, "the trainer to be gone")
    system.start("runner")
    read_stream(url, seen("job.failed"), last_event_id=events[-1].id)
    job = httpx.get(f"{system.base}/jobs/{job_id}").json()
    assert (job["status"], job["reason"]) == ("failed", "runner_lost")
    gpus = httpx.get(f"{system.base}/gpus").json()["nodes"][0]["gpus"]
    assert all(gpu["held_by"] is None for gpu in gpus)


def test_a_runner_that_stays_away_takes_its_node_out_until_it_is_back(
    redis_server: RedisServer, assets: DemoAssets, tmp_path: Path
) -> None:
    settings = {"NODE_TIMEOUT_S": "4", "HEARTBEAT_INTERVAL_S": "0.5", "STOP_GRACE_S": "10"}
    with running(redis_server.url, tmp_path, **settings) as system:
        body = {**job_body(assets, max_steps=100_000, save_steps=100_000), "auto_export": False}
        job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
        first = read_stream(f"{system.base}/jobs/{job_id}/stream", seen("job.started"))
        pgid = httpx.get(f"{system.base}/jobs/{job_id}").json()["pid"]
        # When the runner is SIGKILLed and stays away (its trainer trains on, unwatched)
        system.stop("runner", sig=signal.SIGKILL)
        # Then after the node timeout the job fails as runner_lost and the node takes no jobs
        read_stream(f"{system.base}/jobs/{job_id}/stream", seen("job.failed"), last_event_id=first[-1].id)
        job = httpx.get(f"{system.base}/jobs/{job_id}").json()
        assert (job["status"], job["reason"]) == ("failed", "runner_lost")
        [node] = httpx.get(f"{system.base}/gpus").json()["nodes"]
        assert node["up"] is False
        waiting = httpx.post(f"{system.base}/jobs", json=body).json()
        assert waiting["status"] == "queued"
        # And once a runner is back, it stops the old attempt, the node rejoins, the new job starts
        system.start("runner")
        read_stream(f"{system.base}/jobs/{waiting['job_id']}/stream", seen("job.started"))
        wait_for(lambda: not alive(pgid), 30, "the old attempt's trainer to be stopped")
        log = [json.loads(line) for line in system.cli("replay").splitlines()]
        assert [(e["payload"]["node"], e["payload"]["reason"]) for e in log if e["type"] == "node.lost"] == [
            (node["node"], "runner_lost")
        ]
        httpx.post(f"{system.base}/jobs/{waiting['job_id']}/cancel")


ALICE_KEY, OPS_KEY = "alice-0123456789abcdef", "ops-0123456789abcdef0"
AS_ALICE, AS_OPS = {"Authorization": f"Bearer {ALICE_KEY}"}, {"Authorization": f"Bearer {OPS_KEY}"}


def test_a_job_on_a_lost_node_runs_again_elsewhere_from_its_checkpoint(
    redis_server: RedisServer, assets: DemoAssets, tmp_path: Path
) -> None:
    # Given two nodes, access control with a user and an admin, and a job of the user's with one
    # retry training on node-a
    system = System(
        redis_server.url,
        tmp_path / "system",
        PATH_ROOTS=str(tmp_path.parent),
        NODE_TIMEOUT_S="5",
        API_KEYS=f"alice:user:{ALICE_KEY},ops:admin:{OPS_KEY}",
        SWIFT_TRAINER_API_KEY=OPS_KEY,  # for `swift-trainer audit rebuild`
    )
    system.start()
    system.start_on("node-b", "gpu-monitor", "runner")
    try:
        system.wait_healthy()
        wait_for(lambda: len(httpx.get(f"{system.base}/gpus", headers=AS_OPS).json()["nodes"]) == 2, 20, "both nodes")
        body = {
            **job_body(assets, max_steps=600, save_steps=20, logging_steps=5),
            "max_retries": 1,
            "auto_export": False,
        }
        job_id = httpx.post(f"{system.base}/jobs", json=body, headers=AS_ALICE).json()["job_id"]
        url = f"{system.base}/jobs/{job_id}/stream"
        first = read_stream(url, seen("job.checkpoint_saved"), auth=AS_ALICE)
        job = httpx.get(f"{system.base}/jobs/{job_id}", headers=AS_ALICE).json()
        assert job["node"] == "node-a"
        # When node-a dies: its monitor, its runner and the trainer
        system.stop("gpu-monitor", "runner", sig=signal.SIGKILL)
        os.killpg(job["pid"], signal.SIGKILL)
        # Then the node is declared lost, and the job runs again on node-b from its checkpoint
        rest = read_stream(url, seen("job.succeeded"), last_event_id=first[-1].id, auth=AS_OPS)
        assert "job.requeued" in [e.event for e in rest]
        log = [json.loads(line) for line in system.cli("replay").splitlines()]
        assert [e["payload"]["node"] for e in log if e["type"] == "node.lost"] == ["node-a"]
        job = httpx.get(f"{system.base}/jobs/{job_id}", headers=AS_ALICE).json()
        assert (job["status"], job["node"], job["attempt"], job["retries"]) == ("completed", "node-b", 2, 1)
        assert "--resume_from_checkpoint" in job["argv"]
        resumed = job["argv"][job["argv"].index("--resume_from_checkpoint") + 1]
        assert resumed == json.loads(first[-1].data)["payload"]["path"] or resumed in job["checkpoints"]
        second = [json.loads(e.data)["payload"] for e in rest if e.event == "job.progress"]
        assert second and second[0]["step"] > 20  # continued, not from the start
        nodes = {n["node"]: n for n in httpx.get(f"{system.base}/gpus", headers=AS_OPS).json()["nodes"]}
        assert nodes["node-a"]["up"] is False
        # And the audit trail tells it all, beside a failure and a cancel
        check_audit_trail(system, assets, job_id, tmp_path)
    finally:
        system.stop()


def check_audit_trail(system: System, assets: DemoAssets, retried: str, tmp_path: Path) -> None:
    api = system.base
    broken = tmp_path / "broken.jsonl"
    broken.write_text("this is not json\n")
    body = {**job_body(assets), "data_path": str(broken)}
    failing = httpx.post(f"{api}/jobs", json=body, headers=AS_ALICE).json()["job_id"]
    cancelled = httpx.post(f"{api}/jobs", json=job_body(assets, max_steps=600), headers=AS_ALICE).json()["job_id"]
    assert httpx.post(f"{api}/jobs/{cancelled}/cancel", headers=AS_OPS).status_code == 202
    status = lambda job_id: httpx.get(f"{api}/jobs/{job_id}", headers=AS_ALICE).json()["status"]  # noqa: E731
    wait_for(lambda: status(failing) == "failed", 120, "the job with a broken dataset to fail")
    wait_for(lambda: status(cancelled) == "cancelled", 60, "the cancelled job to stop")

    # The state folded from the whole log equals what the gateway shows
    rebuilt = system.cli("audit", "rebuild")  # exits non-zero on any difference
    assert "gateway" in rebuilt and "identical to the log" in rebuilt, rebuilt
    assert system.cli("audit", "verify").startswith("intact: ")

    # The retried job's timeline reads in order, with who asked and why
    timeline = httpx.get(f"{api}/jobs/{retried}/timeline", headers=AS_ALICE).json()["timeline"]
    ids = [item["entry_id"] for item in timeline]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    types = [item["type"] for item in timeline]
    assert types[:4] == ["job.accepted", "job.queued", "job.scheduled", "job.started"], types
    assert types[-1] == "job.succeeded" and types.count("job.scheduled") == 2
    assert types.index("job.requeued") < len(types) - 1 - types[::-1].index("job.scheduled")
    texts = [item["text"] for item in timeline]
    assert texts[0].startswith("submitted by alice: language_model")
    gpu_b = httpx.get(f"{api}/jobs/{retried}", headers=AS_ALICE).json()["gpu_ids"][0]
    assert [t for t in texts if t.startswith("placed on")] == [
        "placed on node node-a, GPU 0 (attempt 1)",
        f"placed on node node-b, GPU {gpu_b} (attempt 2)",
    ]
    assert any(t.startswith("attempt 1 lost (node_lost)") for t in texts)
    assert any(t.startswith("trained: step ") for t in texts)
    assert timeline[0]["actor"] == "alice" and timeline[-1]["source"].startswith("runner@")
    stopped = httpx.get(f"{api}/jobs/{cancelled}/timeline", headers=AS_ALICE).json()["timeline"]
    assert stopped[0]["actor"] == "alice"
    assert any(
        item["actor"] == "ops" and item["text"].startswith("cancel") and "by ops" in item["text"] for item in stopped
    )

    # Every request is kept as it was made, with who asked, in the commands stream
    asked = [json.loads(line) for line in system.cli("replay", "--commands", "--job", cancelled).splitlines()]
    assert [(c["type"], c["actor"]) for c in asked] == [("job.submit", "alice"), ("job.cancel", "ops")]
    rows = system.cli("replay", "--commands", "--type", "job.cancel", "--format", "table").splitlines()
    assert len(rows) == 2 and rows[1].endswith("cancel asked by ops")

    # Replay filters by job and type, as a table
    table = system.cli("replay", "--job", failing, "--type", "job.f*", "--format", "table").splitlines()
    assert len(table) == 2 and "job.failed" in table[1] and "failed (" in table[1]


def test_killing_the_leader_while_jobs_are_submitted_loses_and_doubles_nothing(
    system: System, assets: DemoAssets
) -> None:
    # Given a standby scheduler, and a node with 12 GPUs and no runner: what is placed there holds
    # its GPUs (its start waits in the node's stream), so every decision stays in the log to check
    system.start("standby=scheduler")
    system.start_on("node-b", "gpu-monitor", SIMULATED_GPUS="12")
    wait_for(lambda: len(httpx.get(f"{system.base}/gpus").json()["nodes"]) == 2, 20, "node-b")
    body = {**job_body(assets, max_steps=100_000), "auto_export": False, "node": "node-b"}
    keys = Keys(system.namespace)
    client = redis.Redis.from_url(system.env["REDIS_URL"], decode_responses=True)
    leader = client.get(keys.leader)
    leader_name = next(name for name, p in system.processes.items() if leader and leader.endswith(f"-{p.pid}"))
    # When 24 jobs are submitted one after another, and the leader is SIGKILLed after the sixth
    submitted: list[str] = []

    def submit() -> None:
        for i in range(24):
            response = httpx.post(f"{system.base}/jobs", json={**body, "name": f"w{i}"}, timeout=30)
            assert response.status_code == 202
            submitted.append(response.json()["job_id"])

    submitter = threading.Thread(target=submit)
    submitter.start()
    wait_for(lambda: len(submitted) >= 6, 30, "six submissions")
    system.stop(leader_name, sig=signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: client.get(keys.leader) not in (None, leader), 30, "the standby to lead", interval_s=0.05)
    took_over_s = time.monotonic() - killed_at
    submitter.join(120)
    assert len(submitted) == 24
    # Then the standby took over within the lease, and every job was decided exactly once: the
    # first twelve placed on twelve different GPUs, the rest queued in submit order
    assert took_over_s <= int(system.env.get("LEADER_LEASE_MS", "5000")) / 1000 + 1.0, took_over_s
    wait_for(
        lambda: all(httpx.get(f"{system.base}/jobs/{j}").json()["status"] != "pending" for j in submitted),
        60,
        "all decided",
    )
    log = [json.loads(line) for line in system.cli("replay").splitlines()]
    for i, job_id in enumerate(submitted):
        types = [e["type"] for e in log if e["job_id"] == job_id]
        placed = ["job.scheduled"] if i < 12 else []
        assert types == ["job.accepted", "job.queued", *placed], (job_id, types)
    gpus = [(e["payload"]["node"], *e["payload"]["gpu_ids"]) for e in log if e["type"] == "job.scheduled"]
    assert len(gpus) == len(set(gpus)) == 12 and {gpu[0] for gpu in gpus} == {"node-b"}
    state = json.loads(system.cli("replay", "--state"))
    assert sorted(state["allocations"].values()) == sorted(submitted[:12])
    assert [j["job_id"] for j in httpx.get(f"{system.base}/queue").json()["queue"]] == submitted[12:]
    client.close()
