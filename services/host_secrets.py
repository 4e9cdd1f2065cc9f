"""Secrets a host keeps in files under ``DATA_DIR/secrets``, made once and readable by their owner
only: the embedded Redis's password and the key that signs browsers' tokens. Redis holds neither,
so whoever can read Redis cannot forge a token, and whoever can reach it cannot read it without
the password."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

SECRET_BYTES = 32


def secrets_dir(data_dir: Path) -> Path:
    return data_dir / "secrets"


def redis_password_file(data_dir: Path) -> Path:
    return secrets_dir(data_dir) / "redis-password"


def auth_secret_file(data_dir: Path) -> Path:
    return secrets_dir(data_dir) / "auth-secret"


def read_or_create(path: Path) -> str:
    """The secret kept in ``path``; the first process to ask makes it.

    Processes started together (honcho starts all at once) race here. The file never appears
    half-written: the secret is written aside and then hard-linked into place, which fails if
    another process linked its own first; then the one in place is read, so all agree.
    """
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, aside = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(SECRET_BYTES) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: use its secret
            os.link(aside, path)
    finally:
        os.unlink(aside)
    return _read(path)


def _read(path: Path) -> str:
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty: remove it to have a new secret made")
    return value
