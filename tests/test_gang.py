"""A gang job end to end on one host: two nodes (each a gpu-monitor and a runner of its own), the
real `swift` CLI under torchrun with one process per node (gloo on the CPU), ranks meeting at rank
0's address and the attempt's rendezvous port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer, wait_for
from tests.system import System, job_body, running
from tests.test_preemption import assert_completed, ended, history, submit, until

NODE = {"SIMULATED_GPUS": "1", "NODE_ADDR": "127.0.0.1"}


@pytest.fixture(scope="module")
def two_nodes(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("gang"), **NODE) as system:
        system.start_on("node-b", "gpu-monitor", "runner", **NODE)
        wait_for(lambda: "node-b" in httpx.get(f"{system.base}/gpus").text, 30, "node-b to join")
        yield system


def ranks_started(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["payload"].get("rank", 0): e["payload"] for e in events if e["type"] == "job.started"}


@pytest.mark.e2e
def test_a_two_node_job_trains_to_the_end_with_both_ranks_in_the_log(two_nodes: System, assets: DemoAssets) -> None:
    system = two_nodes
    # When a job asks for two nodes with one GPU each
    job_id = submit(system, {**job_body(assets, max_steps=8, save_steps=4), "nodes": 2, "auto_export": False})
    # Then it completes
    job = until(system, job_id, ended, "the gang job's end")
    assert_completed(job)
    # And both ranks started, one on each node, meeting at rank 0's address and port
    events = history(system, job_id)
    started = ranks_started(events)
    assert set(started) == {0, 1} and {started[0]["node"], started[1]["node"]} == {"node-a", "node-b"}
    scheduled = next(e["payload"] for e in events if e["type"] == "job.scheduled")
    for rank, payload in started.items():
        env = payload["env"]
        assert env["NNODES"] == "2" and env["NODE_RANK"] == str(rank) and env["NPROC_PER_NODE"] == "1"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(scheduled["master_port"])
        assert env["GLOO_SOCKET_IFNAME"] == "lo"  # the interface of the node's NODE_ADDR
    # And the progress came from rank 0, up to the last step
    steps = [e["payload"]["step"] for e in events if e["type"] == "job.progress"]
    assert steps and steps[-1] == 8
    # And the job's command shows every rank's, as it started
    command = httpx.get(f"{system.base}/jobs/{job_id}/command").json()
    assert [(r["rank"], r["node"], r["env"]["NODE_RANK"]) for r in command["ranks"]] == [
        (0, started[0]["node"], "0"),
        (1, started[1]["node"], "1"),
    ]
    # And each rank's output lines are kept
    for rank in (0, 1):
        response = httpx.get(f"{system.base}/jobs/{job_id}/logs", params={"rank": rank})
        assert response.status_code == 200 and response.json()["lines"], (rank, response.text)
    GANGS.append(job_id)


GANGS: list[str] = []  # the gang job that trained, for the dashboard's test


@pytest.mark.e2e
def test_the_dashboard_switches_between_the_output_of_each_rank(two_nodes: System, browser: Browser) -> None:
    if not GANGS:
        pytest.fail("the two-node job did not train (see the test above)")
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{two_nodes.port}/#/jobs/{GANGS[0]}")
        # Rank 0's output first (ms-swift prints its arguments: the output directory on node-a),
        # then rank 1's once chosen (its own, on node-b)
        on_a, on_b = (str(where / "runs" / GANGS[0]) for where in (two_nodes.data_dir, two_nodes.data_dir / "node-b"))
        expect(page.locator("#logs-rank-label")).to_be_visible()
        expect(page.locator("#job-logs")).to_contain_text(on_a, timeout=30_000)
        expect(page.locator("#job-logs")).not_to_contain_text(on_b)
        page.select_option("#logs-rank", "1")
        expect(page.locator("#job-logs")).to_contain_text(on_b, timeout=30_000)
        expect(page.locator("#job-logs")).not_to_contain_text(on_a)
    finally:
        page.close()


def test_a_dry_run_of_a_gang_job_shows_each_rank_command(two_nodes: System, assets: DemoAssets) -> None:
    body = {**job_body(assets), "nodes": 2, "dry_run": True}
    response = httpx.post(f"{two_nodes.base}/jobs", json=body)
    assert response.status_code == 200, response.text
    ranks = response.json()["ranks"]
    assert [r["env"]["NODE_RANK"] for r in ranks] == ["0", "1"]
    assert all(r["env"]["NNODES"] == "2" and r["env"]["NPROC_PER_NODE"] == "1" for r in ranks)
    assert all(r["env"]["MASTER_PORT"] == "<from RENDEZVOUS_PORT_RANGE>" for r in ranks)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"nodes": 0}, "nodes"),
        ({"nodes": 2, "node": "node-a"}, "nodes and node"),
        ({"nodes": 3}, "3-node job needs 3 nodes"),
    ],
)
def test_a_gang_job_that_cannot_be_is_refused_with_the_reason(
    two_nodes: System, assets: DemoAssets, fields: dict[str, object], named: str
) -> None:
    response = httpx.post(f"{two_nodes.base}/jobs", json={**job_body(assets), **fields})
    assert response.status_code == 422 and named in response.text, response.text


def test_a_deploy_job_runs_on_one_node(two_nodes: System, assets: DemoAssets) -> None:
    body = {"task_type": "deploy", "model_path": str(assets.model_dir), "nodes": 2}
    response = httpx.post(f"{two_nodes.base}/jobs", json=body)
    assert response.status_code == 422 and "nodes must be 1" in response.text, response.text
