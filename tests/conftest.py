"""Shared fixtures: a throwaway redis-server per session, a key namespace per test."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from events.bus import Bus
from events.keys import Keys
from services import embedded_redis
from services.demo.tinymodel import DemoAssets, build_demo_assets
from services.demo.tinyvl import VisionAssets, build_vision_assets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Wait on a condition with a deadline (for synchronous checks of other processes)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = embedded_redis.start(self.data_dir, self.port, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(ready, 10, "redis-server to answer")
        client.close()

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    """The tiny model and dataset, built offline once per session."""
    return build_demo_assets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def vision_assets(tmp_path_factory: pytest.TempPathFactory) -> VisionAssets:
    """The tiny vision-language model and its image dataset, built offline once per session."""
    return build_vision_assets(tmp_path_factory.mktemp("vision"))


@pytest.fixture
def local_job(tmp_path: Path) -> dict[str, Any]:
    """A valid language-model job body on a local model and dataset under ``tmp_path``."""
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    return {
        "task_type": "language_model",
        "model_path": str(tmp_path / "model"),
        "data_path": str(tmp_path / "train.jsonl"),
    }


@pytest.fixture
def keys() -> Keys:
    return Keys(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def bus(redis_client: aioredis.Redis, keys: Keys) -> Bus:
    return Bus(redis_client, keys, "test")


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browsers are never downloaded
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright; skipped without it, unless CI requires it."""
    if not CHROMIUM.exists():
        if os.environ.get("DASHBOARD_BROWSER_REQUIRED"):
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
