"""The quick start: `honcho start` on the Procfile brings everything up on an embedded Redis with
AOF, stops cleanly on SIGTERM, and an accepted job survives a full restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_for
from tests.system import offline_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def honcho(data_dir: Path, app_port: int, redis_port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **offline_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "APP_PORT": str(app_port),
        "EMBEDDED_REDIS_PORT": str(redis_port),
        "DATA_DIR": str(data_dir),
        "HEARTBEAT_INTERVAL_S": "0.5",
    }
    for name in ("REDIS_URL", "REDIS_HOST", "NAMESPACE"):
        env.pop(name, None)
    log = (data_dir / "honcho.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "start"],
        cwd=data_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop(process: subprocess.Popen[bytes], data_dir: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError((data_dir / "honcho.log").read_text()[-4000:]) from None
    # No process of the group is left behind.
    wait_for(lambda: not _group_alive(process.pid), 10, "every process to exit")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_honcho_start_runs_everything_on_an_embedded_redis_and_keeps_jobs_across_restarts(tmp_path: Path) -> None:
    app_port, redis_port = free_port(), free_port()
    base = f"http://127.0.0.1:{app_port}/api/v1/training"
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    # Given the Procfile started with no Redis configured
    process = honcho(tmp_path, app_port, redis_port)
    try:
        wait_for(lambda: healthy(base), 90, "the system to report healthy", interval_s=0.3)
        # Then every process type is live (the notifier too, though health does not need it),
        # and the GPUs are clearly simulated
        every = {"gateway", "scheduler", "gpu-monitor", "runner", "exporter", "notifier"}
        wait_for(lambda: set(httpx.get(f"{base}/health").json()["services"]) == every, 30, "the notifier to beat")
        nodes = httpx.get(f"{base}/gpus").json()["nodes"]
        assert nodes and all(node["simulated"] for node in nodes) and len(nodes[0]["gpus"]) == 2
        assert any("appendonly" in p.name for p in (tmp_path / "redis").iterdir())  # AOF is on
        # A request no node could ever satisfy is refused at once, naming the reason
        body = {
            "task_type": "language_model",
            "model_path": str(tmp_path / "model"),
            "data_path": str(tmp_path / "data.jsonl"),
        }
        refused = httpx.post(f"{base}/jobs", json={**body, "gpu_count": 3})
        assert refused.status_code == 422 and "3 GPUs" in refused.text
        # When a job is accepted and runs (its empty model directory makes ms-swift fail)
        created = httpx.post(f"{base}/jobs", json=body).json()
        job_url = f"{base}/jobs/{created['job_id']}"
        wait_for(lambda: httpx.get(job_url).json()["status"] == "failed", 90, "the job to fail")
        before = httpx.get(job_url).json()
    finally:
        stop(process, tmp_path)
    # And everything is restarted
    process = honcho(tmp_path, app_port, redis_port)
    try:
        wait_for(lambda: healthy(base), 90, "the system to report healthy again", interval_s=0.3)
        # Then the job is still there, as it was
        assert httpx.get(job_url).json() == before
    finally:
        stop(process, tmp_path)
