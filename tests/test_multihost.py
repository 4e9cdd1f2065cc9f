"""Gang jobs across hosts, on one machine: two hosts, each a network namespace with an address of
its own (tests/netns.py) running a gpu-monitor and a runner; Redis, the scheduler, the gateway and
the exporter on the machine itself, reached over the bridge. A rank's processes see only their
host's network, so the ranks of a job meet at rank 0's address or not at all. The real `swift`
CLI under torchrun, one process per node (gloo on the CPU), on the tiny model.

A host is lost as a power cut loses it: cut off the network, then every process in it killed.
Its peers see silence, not closed connections, so the scheduler learns of it only from its
missing heartbeats."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services import embedded_redis
from services.demo.tinymodel import DemoAssets
from tests import netns
from tests.conftest import RedisServer, wait_for
from tests.system import System, job_body
from tests.test_preemption import (
    argv_value,
    assert_completed,
    ended,
    group_gone,
    history,
    logged,
    position,
    submit,
    until,
)

NODE_TIMEOUT_S = 3.0
SETTINGS = {
    "HEARTBEAT_INTERVAL_S": "0.5",
    "NODE_TIMEOUT_S": str(NODE_TIMEOUT_S),
    # Rank 0, stopped while its peer is gone, hangs in a collective: killed after max(this, 15 s)
    "STOP_GRACE_S": "5",
}
MAX_STEPS = 80
SAVE_STEPS = 10
LOGGING_STEPS = 2


class BridgedRedis(RedisServer):
    """A throwaway redis-server on the bridge's address, where the hosts reach it, with a
    password (Redis refuses clients from other addresses than loopback without one)."""

    def __init__(self, data_dir: Path, host: str) -> None:
        super().__init__(data_dir)
        self.host = host
        self.password = secrets.token_hex(16)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def start(self) -> None:
        config = embedded_redis.write_auth_config(self.data_dir / "auth.conf", self.password)
        argv = embedded_redis.server_argv(self.data_dir, self.port, bind=self.host, auth_config=config)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(ready, 10, "redis-server to answer on the bridge")
        client.close()


@dataclass
class Cluster:
    net: netns.Network
    system: System

    def node(self, index: int) -> str:
        return f"node-{index}"

    def host_of(self, node: str) -> netns.Host:
        return self.net.hosts[int(node.rsplit("-", 1)[1])]

    def start_node(self, index: int) -> None:
        """The node's gpu-monitor and runner, inside its host, with a data directory of its own."""
        host, node = self.net.hosts[index], self.node(index)
        env = {
            **self.system.env,
            "NODE_NAME": node,
            "NODE_ADDR": host.addr,
            "SIMULATED_GPUS": "1",
            "DATA_DIR": str(self.system.data_dir / node),
        }
        for service in ("gpu-monitor", "runner"):
            name = f"{service}@{node}"
            log = (self.system.data_dir / f"{name}.log").open("ab")
            argv = host.command([sys.executable, "-m", "services.cli", service])
            self.system.processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)

    def wait_joined(self, *indices: int) -> None:
        def joined() -> bool:
            text = httpx.get(f"{self.system.base}/gpus").text
            return all(f'"{self.node(index)}"' in text for index in indices)

        wait_for(joined, 30, f"nodes {indices} to join")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason:
        if os.geteuid() != 0 and not os.environ.get("CI"):
            pytest.skip(reason)
        pytest.fail(reason)
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(netns.network(str(os.getpid()), hosts=2))
        server = BridgedRedis(tmp_path_factory.mktemp("redis"), net.gateway)
        stack.callback(server.stop)
        server.start()
        system = System(server.url, tmp_path_factory.mktemp("multihost"), **SETTINGS)
        stack.callback(system.kill_jobs)  # (after the services: a runner leaves its jobs running)
        stack.callback(system.stop)
        system.start("scheduler", "gateway", "exporter")
        cluster = Cluster(net, system)
        for index in range(len(net.hosts)):
            cluster.start_node(index)
        system.wait_healthy()
        cluster.wait_joined(0, 1)
        for index, host in enumerate(net.hosts):  # each node's services run in its host
            assert system.processes[f"runner@{cluster.node(index)}"].pid in host.pids()
        yield cluster


def gang_job(assets: DemoAssets, **fields: object) -> dict[str, Any]:
    body = job_body(assets, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, logging_steps=LOGGING_STEPS)
    return {**body, "nodes": 2, "auto_export": False, **fields}


def started_ranks(events: list[dict[str, Any]], attempt: int) -> dict[int, dict[str, Any]]:
    found = [e["payload"] for e in events if e["type"] == "job.started" and e["payload"]["attempt"] == attempt]
    ranks = {payload.get("rank", 0): payload for payload in found}
    assert len(ranks) == len(found) == 2, found
    return ranks


def steps(events: list[dict[str, Any]], attempt: int) -> list[int]:
    return [e["payload"]["step"] for e in events if e["type"] == "job.progress" and e["payload"]["attempt"] == attempt]


@pytest.mark.e2e
def test_a_two_node_job_trains_across_hosts_meeting_at_rank_0_address(cluster: Cluster, assets: DemoAssets) -> None:
    system = cluster.system
    # When a job asks for two nodes, each on a host of its own
    job_id = submit(system, gang_job(assets))
    # Then it trains to the end
    assert_completed(until(system, job_id, ended, "the gang job's end"))
    # And each rank started on its own node, both told to meet at rank 0's host address
    events = history(system, job_id)
    ranks = started_ranks(events, attempt=1)
    assert {ranks[0]["node"], ranks[1]["node"]} == {"node-0", "node-1"}
    rank0_addr = cluster.host_of(ranks[0]["node"]).addr
    for rank, payload in ranks.items():
        env = payload["env"]
        assert env["NNODES"] == "2" and env["NODE_RANK"] == str(rank) and env["NPROC_PER_NODE"] == "1"
        assert env["MASTER_ADDR"] == rank0_addr, env
        # Gloo would offer its peers the address this machine's name resolves to, a loopback one
        # here (as on many hosts): each rank is told the interface of its node's NODE_ADDR
        assert env["GLOO_SOCKET_IFNAME"] == netns.IFNAME, env
    # And the progress, from rank 0, reached the last step
    progress = steps(events, attempt=1)
    assert progress and progress == sorted(progress) and progress[-1] == MAX_STEPS, progress


@pytest.mark.e2e
def test_a_lost_host_stops_every_rank_and_the_job_resumes_on_both_from_its_checkpoint(
    cluster: Cluster, assets: DemoAssets
) -> None:
    system = cluster.system
    # Given a gang job on both hosts that has saved a checkpoint
    job_id = submit(system, gang_job(assets, max_retries=1))
    logged(system, job_id, "job.checkpoint_saved", attempt=1)
    ranks = started_ranks(history(system, job_id), attempt=1)
    lost = ranks[1]["node"]
    assert view_status(system, job_id) == "running"
    # When rank 1's host goes down: off the network, its gpu-monitor, runner and trainer killed
    host = cluster.host_of(lost)
    host.unplug()
    host.kill()
    killed_at = time.monotonic()
    # Then, once its heartbeats are overdue, the node is declared lost and the job requeued
    requeued = logged(system, job_id, "job.requeued", attempt=1)
    waited_s = time.monotonic() - killed_at
    assert requeued["payload"]["reason"] == "node_lost", requeued
    assert waited_s >= NODE_TIMEOUT_S - 1, waited_s
    # And rank 0, on the host still up, is stopped: none of its processes is left
    wait_for(lambda: group_gone(ranks[0]["pgid"]), 30, "rank 0's processes to go")
    assert view_status(system, job_id) == "queued"  # (it cannot start on one node)
    # When the host comes back
    host.plug()
    cluster.start_node(cluster.net.hosts.index(host))
    # Then the job's next attempt starts on both nodes from attempt 1's last checkpoint
    job = until(system, job_id, ended, "the resumed gang job's end")
    assert_completed(job)
    events = history(system, job_id)
    scheduled = next(e for e in events if e["type"] == "job.scheduled" and e["payload"]["attempt"] == 2)
    checkpoints = [
        e["payload"]
        for e in events
        if e["type"] == "job.checkpoint_saved"
        and e["payload"]["attempt"] == 1
        and position(e["entry_id"]) < position(scheduled["entry_id"])
    ]
    last = checkpoints[-1]
    resumed = started_ranks(events, attempt=2)
    assert {resumed[0]["node"], resumed[1]["node"]} == {"node-0", "node-1"}
    for payload in resumed.values():
        assert argv_value(payload["argv"], "--resume_from_checkpoint") == last["path"], payload["argv"]
    # And it trained on from that checkpoint to the last step, not from step 0
    progress = steps(events, attempt=2)
    assert progress and progress[0] > last["step"] - LOGGING_STEPS, (last["step"], progress[:5])
    assert progress == sorted(progress) and progress[-1] == MAX_STEPS, progress
    assert job["retries"] == 1


def view_status(system: System, job_id: str) -> str:
    return str(httpx.get(f"{system.base}/jobs/{job_id}").json()["status"])
