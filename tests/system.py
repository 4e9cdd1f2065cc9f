"""The whole system as real processes, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
from httpx_sse import ServerSentEvent, connect_sse

from services.demo.tinymodel import DemoAssets
from services.launch import TAG_VARIABLE
from tests.conftest import RedisServer, free_port, wait_for

TRAINING_TIMEOUT_S = 120
SERVICES = ("scheduler", "gpu-monitor", "runner", "exporter", "notifier", "gateway")


def offline_env() -> dict[str, str]:
    """No model hub, one thread per trainer: the machines that run the tests are small."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class System:
    def __init__(self, redis_url: str, data_dir: Path, **settings: str) -> None:
        self.port = free_port()
        self.namespace = f"e2e{uuid.uuid4().hex[:8]}"
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            **offline_env(),
            "REDIS_URL": redis_url,
            "NAMESPACE": self.namespace,
            "APP_PORT": str(self.port),
            "DATA_DIR": str(data_dir),
            "NODE_NAME": "node-a",
            "HEARTBEAT_INTERVAL_S": "0.5",
            "PATH_ROOTS": str(data_dir.parent),  # the test's temporary files
            "LOG_LEVEL": "INFO",
            **settings,
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.base = f"http://127.0.0.1:{self.port}/api/v1/training"

    def cli(self, *args: str, timeout_s: float = 60) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
        return done.stdout

    def start(self, *services: str) -> None:
        """Start services; ``name=service`` starts another instance of a service under a name."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for spec in services or SERVICES:
            name, _, service = spec.partition("=")
            log = (self.data_dir / f"{name}.log").open("ab")
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", service or name], env=self.env, stdout=log, stderr=log
            )

    def start_on(self, node: str, *services: str, **settings: str) -> None:
        """Start services as another node of the cluster (their own node name and run dir)."""
        env = {**self.env, "NODE_NAME": node, "DATA_DIR": str(self.data_dir / node), **settings}
        for service in services:
            name = f"{service}@{node}"
            log = (self.data_dir / f"{name}.log").open("ab")
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", service], env=env, stdout=log, stderr=log
            )

    def wait_healthy(self, timeout_s: float = 60) -> None:
        def healthy() -> bool:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")
            try:
                return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s, "the system to report healthy", interval_s=0.2)

    def log(self, name: str) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def kill_jobs(self) -> int:
        """Kill what jobs of this system still run (each attempt is a process group); returns how
        many groups were killed."""
        groups = set()
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if TAG_VARIABLE in process.environ() and str(self.data_dir) in " ".join(process.cmdline()):
                    groups.add(os.getpgid(process.pid))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        return len(groups)

    def stop(self, *services: str, sig: int = signal.SIGTERM) -> dict[str, int]:
        codes = {}
        for name in services or list(self.processes):
            process = self.processes.pop(name)
            process.send_signal(sig)
            try:
                codes[name] = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
                raise AssertionError(f"{name} did not stop within 20 s of {signal.Signals(sig).name}") from None
        return codes


def job_body(assets: DemoAssets, **params: object) -> dict[str, object]:
    return assets.job_request(**{"max_steps": 12, "save_steps": 6, **params})


def read_stream(
    url: str,
    until: Callable[[list[ServerSentEvent]], bool],
    last_event_id: str | None = None,
    auth: dict[str, str] | None = None,
) -> list[ServerSentEvent]:
    """Events with an id from an SSE stream, until ``until`` holds for what was read."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    headers.update(auth or {})
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    events: list[ServerSentEvent] = []
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=60)) as client,
        connect_sse(client, "GET", url, headers=headers) as source,
    ):
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if sse.data:  # pings and the retry hint are comments: no data, and no event of their own
                events.append(sse)
                if until(events):
                    return events
            assert time.monotonic() < deadline, (
                f"stream stalled after {[e.event for e in events]}; the last: {events[-1].data if events else None}"
            )
    raise AssertionError(f"stream ended after {[e.event for e in events]}")


def seen(event_type: str) -> Callable[[list[ServerSentEvent]], bool]:
    return lambda events: any(e.event == event_type for e in events)


@contextlib.contextmanager
def running(redis_url: str, data_dir: Path, *, clean_exits: bool = False, **settings: str) -> Iterator[System]:
    """The whole system, healthy, stopped with SIGTERM afterwards (``clean_exits``: each exits 0)."""
    system = System(redis_url, data_dir, **settings)
    system.start()
    try:
        system.wait_healthy()
        yield system
    finally:
        codes = system.stop()
        system.kill_jobs()  # a runner leaves its jobs running when it stops (it adopts them on restart)
    if clean_exits:
        assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}"


@contextlib.contextmanager
def on_own_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, System]]:
    """The system, healthy, on a Redis of its own (AOF) that a test may kill and start again; on
    the way out every process must stop cleanly (exit 0)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    system = System(server.url, tmp_path / "system", PATH_ROOTS=str(tmp_path.parent))
    system.start()
    try:
        system.wait_healthy()
        yield server, system
    finally:
        codes = system.stop()
        system.kill_jobs()
        server.stop()
    assert all(code == 0 for code in codes.values()), codes


def finish(
    system: System, body: dict[str, object], until: str = "job.succeeded", auth: dict[str, str] | None = None
) -> tuple[str, list[ServerSentEvent]]:
    """Submit a job and read its stream until ``until``."""
    response = httpx.post(f"{system.base}/jobs", json=body, headers=auth)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    return job_id, read_stream(f"{system.base}/jobs/{job_id}/stream", seen(until), auth=auth)


def steps(events: list[ServerSentEvent]) -> list[int]:
    return [json.loads(e.data)["payload"]["step"] for e in events if e.event == "job.progress"]
