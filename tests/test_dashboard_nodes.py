"""The GPUs of a large cluster, in the API and on the dashboard: 125 nodes of 8 GPUs. One node is
the real system on simulated GPUs, running jobs with the chaos run's stand-in trainer; the 124
others are a fleet of GPU monitors in one thread of the test, each node's heartbeat appended to the
real telemetry stream as a gpu-monitor appends it (a process per node would not fit the machine).

The dashboard, in a real browser (Debian's headless Chromium), shows a group per node with its
summary line, collapsed while many nodes show, expanded on a click and remembered, filtered by
name, with a count line for the cluster; an update changes the page in place. How long an update
takes in the browser is printed (run with -rP to read it)."""

from __future__ import annotations

import re
import statistics
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, expect

from events import messages as m
from events.codec import encode
from events.keys import Keys
from events.records import Node
from events.state import State
from services.gateway.gpus import gpus_view
from tests.chaos import stand_in_swift
from tests.conftest import RedisServer, wait_for
from tests.system import System, running

FLEET = [f"node-{n:03d}" for n in range(1, 125)]
GPUS = 8
MEMORY_MB = 81_920  # 80 GiB
FOREIGN = {"node-003": {0, 1}}  # GPUs that other processes use (beyond the 1 GiB threshold)
SILENCED = "node-124"  # stops beating during the test
WAIT_MS = 20_000
LONG = {"max_steps": 100_000, "save_steps": 100_000, "logging_steps": 50}  # runs until cancelled

# Every update of the GPUs in the page, timed from the stream's message to the page laid out again
# (its JSON parsed, the page changed, style and layout recomputed; not the paint).
TIME_UPDATES = """
window.gpuUpdates = [];
const add = EventSource.prototype.addEventListener;
EventSource.prototype.addEventListener = function (type, listener, options) {
  if (type !== "gpus") return add.call(this, type, listener, options);
  return add.call(this, type, function (event) {
    const started = performance.now();
    listener.call(this, event);
    void document.body.offsetHeight;
    window.gpuUpdates.push(performance.now() - started);
  }, options);
};
"""


def samples(node: str) -> list[m.GpuSample]:
    """A fleet node's GPUs: a little memory used on each, much on its foreign ones."""
    foreign = FOREIGN.get(node, set())
    return [
        m.GpuSample(
            index=i,
            uuid=f"FLEET-{node}-{i}",
            name="NVIDIA H100 80GB HBM3",
            memory_total_mb=MEMORY_MB,
            memory_used_mb=40_000 if i in foreign else 100 * i,
            utilization_pct=90 if i in foreign else 0,
            temperature_c=40 + i,
        )
        for i in range(GPUS)
    ]


class Fleet:
    """GPU monitors of many nodes in one thread: each node's heartbeat, every interval, appended to
    the telemetry stream (pipelined)."""

    def __init__(self, redis_url: str, namespace: str, nodes: list[str], interval_s: float) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.stream = Keys(namespace).telemetry
        self.nodes = {node: samples(node) for node in nodes}
        self.silent: set[str] = set()
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="fleet", daemon=True)
        self.beats = 0

    def __enter__(self) -> Fleet:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self.client.close()

    def _beat(self) -> None:
        while not self.stopped.is_set():
            with self.client.pipeline(transaction=False) as pipe:
                for node, gpus in self.nodes.items():
                    if node not in self.silent:
                        beat = m.NodeHeartbeat(node=node, simulated=False, gpus=gpus)
                        pipe.xadd(self.stream, encode(beat, f"gpu-monitor@{node}"), maxlen=10_000, approximate=True)
                pipe.execute()
            self.beats += 1
            self.stopped.wait(self.interval_s)


def test_each_node_is_summed_up_as_the_scheduler_sees_it() -> None:
    # Given four nodes: one up with two GPUs held and one used by others' processes, one whose
    # heartbeats stopped (the same job holds a GPU there), one whose NVML reading is incomplete,
    # and one lost, not heard from since it joined
    now = datetime.now(UTC)
    state = State()
    for name in ("busy", "silent", "degraded", "lost"):
        inventory = [m.GpuInfo(index=i, uuid=f"{name}-{i}", name="GPU", memory_total_mb=1000) for i in range(4)]
        state.nodes[name] = Node(name=name, simulated=False, gpus=inventory, joined_at=now, up=name != "lost")
    state.allocations.update({"busy/0": "job-1", "busy/1": "job-1", "silent/3": "job-1"})

    def beat(node: str, seconds_ago: float, used: list[int], degraded: str | None = None) -> m.NodeHeartbeat:
        gpus = [
            m.GpuSample(index=i, uuid=f"{node}-{i}", name="GPU", memory_total_mb=1000, memory_used_mb=mb)
            for i, mb in enumerate(used)
        ]
        sent = m.NodeHeartbeat(node=node, simulated=False, gpus=gpus, degraded=degraded)
        return sent.model_copy(update={"at": now - timedelta(seconds=seconds_ago)})

    heartbeats = {
        "busy": beat("busy", 1.5, [900, 900, 0, 600]),
        "silent": beat("silent", 30, [0, 0, 0, 0]),
        "degraded": beat("degraded", 0.2, [10, 0], degraded="GPU 2 unreadable"),
    }
    # When the view is made (the scheduler's 10 s timeout and 500 MiB threshold)
    view = gpus_view(state, heartbeats, now, timeout_s=10, threshold_mb=500)
    # Then each node's state, counts and memory are as the scheduler would judge them
    nodes = {node["node"]: node for node in view["nodes"]}
    summary = {name: node["summary"] for name, node in nodes.items()}
    assert summary["busy"] == {
        "state": "up",
        "gpus": 4,
        "free": 1,
        "busy": 2,
        "foreign": 1,
        "jobs": 1,
        "memory_used_mb": 2400,
        "memory_total_mb": 4000,
        "heartbeat_age_s": 1.5,
    }
    assert [gpu["status"] for gpu in nodes["busy"]["gpus"]] == ["busy", "busy", "free", "foreign"]
    assert (summary["silent"]["state"], summary["silent"]["free"], summary["silent"]["busy"]) == ("silent", 0, 1)
    assert [gpu["status"] for gpu in nodes["silent"]["gpus"]] == ["unavailable"] * 3 + ["busy"]
    # (a GPU its heartbeat left out shows as the inventory has it, its memory counted as unused)
    assert summary["degraded"]["state"] == "degraded" and summary["degraded"]["memory_used_mb"] == 10
    assert "memory_used_mb" not in nodes["degraded"]["gpus"][3]
    assert (summary["lost"]["state"], summary["lost"]["heartbeat_age_s"], nodes["lost"]["up"]) == ("lost", None, False)
    assert nodes["lost"]["last_heartbeat_at"] is None
    # And the cluster's totals add them up, a job on two nodes' GPUs counted once
    assert view["summary"] == {
        "nodes": 4,
        "nodes_up": 1,
        "gpus": 16,
        "free": 1,
        "busy": 3,
        "foreign": 1,
        "jobs": 1,
        "memory_used_mb": 2410,
        "memory_total_mb": 16000,
    }


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("nodes")
    (root / "model").mkdir()
    (root / "data.jsonl").write_text("{}\n")
    settings = {"SIMULATED_GPUS": str(GPUS), "SWIFT_BIN": str(stand_in_swift(root)), "CHAOS_STEP_S": "0.2"}
    with running(redis_server.url, root / "system", **settings) as system:
        yield system


def submit(system: System, name: str, gpu_count: int) -> str:
    root = system.data_dir.parent
    body = {
        "task_type": "language_model",
        "name": name,
        "model_path": str(root / "model"),
        "data_path": str(root / "data.jsonl"),
        "gpu_count": gpu_count,
        "node": "node-a",
        "auto_export": False,
        "train_params": LONG,
    }
    response = httpx.post(f"{system.base}/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def gpus(system: System) -> dict[str, Any]:
    return httpx.get(f"{system.base}/gpus", timeout=10).json()  # type: ignore[no-any-return]


def group(page: Page, node: str) -> Any:
    return page.locator(f'#gpus .node-group[data-node="{node}"]')


def timings(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"{len(values)} updates: median {statistics.median(values):.2f} ms, p95 {p95:.2f} ms, max {ordered[-1]:.2f} ms"
    )


@pytest.mark.e2e
def test_a_cluster_of_125_nodes_reads_by_node_in_the_api_and_on_the_dashboard(
    system: System, browser: Browser, tmp_path: Path, record_property: Any
) -> None:
    jobs = [submit(system, "nodes-three", 3), submit(system, "nodes-two", 2)]
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    page.add_init_script(TIME_UPDATES)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    fleet = Fleet(system.env["REDIS_URL"], system.namespace, FLEET, interval_s=1.0)
    try:
        with fleet:
            # Given 124 nodes heard from besides node-a, where two jobs run on 5 of its 8 GPUs
            wait_for(lambda: gpus(system)["summary"]["nodes_up"] == 125, 30, "125 nodes up")
            for job_id in jobs:
                wait_for(
                    lambda job_id=job_id: httpx.get(f"{system.base}/jobs/{job_id}").json()["status"] == "running",
                    30,
                    f"job {job_id} to run",
                )
            # Then the API answers by node, with a summary of each and of the cluster
            view = gpus(system)
            nodes = {node["node"]: node for node in view["nodes"]}
            assert list(nodes) == sorted(nodes)
            assert nodes["node-a"]["summary"] | {"heartbeat_age_s": 0} == {
                "state": "up",
                "gpus": 8,
                "free": 3,
                "busy": 5,
                "foreign": 0,
                "jobs": 2,
                "memory_used_mb": 0,
                "memory_total_mb": 8 * 24_576,
                "heartbeat_age_s": 0,
            }
            assert {gpu["held_by"] for gpu in nodes["node-a"]["gpus"]} == {*jobs, None}  # the fields as before
            assert nodes["node-003"]["summary"]["foreign"] == 2 and nodes["node-003"]["summary"]["free"] == 6
            assert [gpu["status"] for gpu in nodes["node-003"]["gpus"][:3]] == ["foreign", "foreign", "free"]
            assert nodes["node-042"]["summary"]["memory_used_mb"] == 100 * sum(range(GPUS))
            assert 0 <= nodes["node-042"]["summary"]["heartbeat_age_s"] < 5
            assert view["summary"] == {
                "nodes": 125,
                "nodes_up": 125,
                "gpus": 1000,
                "free": 1000 - 5 - 2,
                "busy": 5,
                "foreign": 2,
                "jobs": 2,
                "memory_used_mb": 123 * 2800 + (2 * 40_000 + 2800 - 100),
                "memory_total_mb": 124 * 8 * MEMORY_MB + 8 * 24_576,
            }

            # When the dashboard opens
            page.goto(f"http://127.0.0.1:{system.port}/")
            # Then it shows a group per node, every one collapsed (so no GPU card at all), each
            # with its summary line, and the cluster's count line
            expect(page.locator("#gpus .node-group")).to_have_count(125)
            expect(page.locator("#gpus [data-gpu]")).to_have_count(0)
            a = group(page, "node-a")
            expect(a.locator(".node-state")).to_have_text("up")
            expect(a.locator(".n-gpus")).to_have_text("8 GPUs")
            expect(a.locator(".n-free")).to_have_text("3 free")
            expect(a.locator(".n-busy")).to_have_text("5 busy")
            expect(a.locator(".n-jobs")).to_have_text("2 jobs")
            expect(a.locator(".n-memory")).to_have_text("memory 0 MiB / 192.0 GiB")
            expect(a.locator(".pip.busy")).to_have_count(5)
            expect(group(page, "node-003").locator(".n-foreign")).to_have_text("2 used elsewhere")
            expect(group(page, "node-042").locator(".n-memory")).to_have_text("memory 2.7 GiB / 640.0 GiB")
            expect(group(page, "node-042").locator(".n-age")).to_have_text(re.compile(r"heartbeat (just now|\ds ago)"))
            expect(page.locator("#gpu-count")).to_have_text(
                "125 nodes (125 up) · 1,000 GPUs: 993 free, 5 busy, 2 used elsewhere · 2 jobs"
                " · memory 417.1 GiB / 77.7 TiB"
            )

            # When node-a is expanded with a click
            a.locator(".node-head").click()
            # Then its 8 GPUs show, with the jobs that hold 5 of them, and only its
            expect(a.locator("[data-gpu]")).to_have_count(8)
            expect(page.locator("#gpus [data-gpu]")).to_have_count(8)
            expect(a.locator(".node-head")).to_have_attribute("aria-expanded", "true")
            for job_id in jobs:
                expect(a.locator(f'[data-gpu] a[href="#/jobs/{job_id}"]')).not_to_have_count(0)
            expect(a.locator('[data-gpu][data-status="free"]')).to_have_count(3)

            # And updates keep coming, changing the page in place: the same elements, not new ones
            page.evaluate(
                """() => { for (const el of document.querySelectorAll('#gpus .node-group, #gpus [data-gpu]'))
                el.dataset.kept = '1'; }"""
            )
            updates = page.evaluate("window.gpuUpdates.length")
            wait_for(lambda: page.evaluate("window.gpuUpdates.length") >= updates + 4, 20, "4 updates")
            expect(page.locator("#gpus .node-group:not([data-kept])")).to_have_count(0)
            expect(page.locator("#gpus [data-gpu]:not([data-kept])")).to_have_count(0)

            # When a node falls silent
            fleet.silent.add(SILENCED)
            # Then its summary line says so within a few updates, its GPUs offered to no one
            silenced = group(page, SILENCED)
            expect(silenced.locator(".node-state")).to_have_text("silent", timeout=WAIT_MS)
            expect(silenced.locator(".n-free")).to_have_text("0 free")
            expect(silenced.locator(".pip.unavailable")).to_have_count(8)
            expect(page.locator("#gpu-count")).to_contain_text("125 nodes (124 up) · 1,000 GPUs: 985 free")

            # When the nodes are filtered by name: node-12 matches node-120 to node-124
            page.fill("#gpu-filter", "node-12")
            # Then only those show, expanded as few nodes show, and the count line says so
            expect(page.locator("#gpus .node-group:not([hidden])")).to_have_count(5)
            expect(page.locator("#gpus .node-group:not([hidden]) [data-gpu]")).to_have_count(40)
            expect(page.locator("#gpu-count")).to_contain_text("showing 5 of 125 nodes")
            expect(group(page, SILENCED).locator('[data-gpu][data-status="unavailable"]')).to_have_count(8)
            page.screenshot(path=str(tmp_path / "nodes-filtered.png"), full_page=True)
            # When one of them is collapsed by hand, and a wider filter shows ten nodes
            group(page, "node-121").locator(".node-head").click()
            expect(group(page, "node-121").locator("[data-gpu]")).to_have_count(0)
            page.fill("#gpu-filter", "NODE-01")  # (any case)
            # Then those are collapsed (many show)
            expect(page.locator("#gpus .node-group:not([hidden])")).to_have_count(10)
            expect(page.locator("#gpus .node-group:not([hidden]) [data-gpu]")).to_have_count(0)
            # When the filter is cleared, node-a is still expanded and node-121 still collapsed
            # (as the user left them), even after the page went elsewhere and came back
            page.fill("#gpu-filter", "")
            page.click("[data-nav=submit]")
            page.click("a.brand")
            expect(page.locator("#gpus .node-group:not([hidden])")).to_have_count(125)
            expect(a.locator("[data-gpu]")).to_have_count(8)
            expect(group(page, "node-121").locator("[data-gpu]")).to_have_count(0)
            expect(group(page, "node-120").locator("[data-gpu]")).to_have_count(0)  # many show again
            expect(page.locator("#gpu-count")).not_to_contain_text("showing")
            collapsed = page.evaluate("window.gpuUpdates")

            # When every node is expanded: a thousand GPU cards
            expanding_ms = page.evaluate(
                """() => { const t = performance.now(); document.querySelector('#gpu-expand-all').click();
                document.body.offsetHeight; return performance.now() - t; }"""
            )
            expect(page.locator("#gpus [data-gpu]")).to_have_count(1000)
            page.evaluate("window.gpuUpdates = []")
            wait_for(lambda: len(page.evaluate("window.gpuUpdates")) >= 6, 20, "6 updates with every node expanded")
            expanded = page.evaluate("window.gpuUpdates")
            # And collapsed again, the page keeps no card
            page.click("#gpu-collapse-all")
            expect(page.locator("#gpus [data-gpu]")).to_have_count(0)
            group(page, "node-a").locator(".node-head").click()
            expect(a.locator("[data-gpu]")).to_have_count(8)
            screenshot = tmp_path / "nodes.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert not problems, problems

        body = len(httpx.get(f"{system.base}/gpus", timeout=10).content)
        print(f"GPU updates in the browser, 125 nodes, up to 40 GPU cards shown: {timings(collapsed)}")
        print(f"GPU updates in the browser, 1,000 GPU cards shown: {timings(expanded)}")
        print(f"expanding every node (1,000 cards, layout included): {expanding_ms:.1f} ms; GET /gpus: {body:,} bytes")
        print(f"screenshot: {screenshot}")
        record_property("screenshot", str(screenshot))
    finally:
        for job_id in jobs:
            httpx.post(f"{system.base}/jobs/{job_id}/cancel", timeout=10)
        page.close()
