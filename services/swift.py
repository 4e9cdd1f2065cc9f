"""Locating the `swift` CLI, shared by the runner and the exporter."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def swift_executable(configured: str) -> str:
    """The `swift` CLI: as configured (a name on the PATH or a path), else the one installed
    beside this interpreter."""
    found = shutil.which(configured)
    if found:
        return found
    beside = Path(sys.executable).with_name("swift")
    return str(beside) if beside.exists() else configured


_LIST_FLAGS = """
import dataclasses, json
from swift import arguments
commands = {"sft": arguments.SftArguments, "deploy": arguments.DeployArguments, "export": arguments.ExportArguments}
print(json.dumps({name: sorted(f.name for f in dataclasses.fields(cls)) for name, cls in commands.items()}))
"""


def swift_version() -> str | None:
    try:
        return importlib.metadata.version("ms-swift")
    except importlib.metadata.PackageNotFoundError:
        return None


def accepted_flags(cache_dir: Path) -> dict[str, frozenset[str]] | None:
    """The flags the installed ms-swift accepts, per command (`sft`, `deploy`, `export`), read
    from its argument dataclasses; None when ms-swift is not installed here. Importing ms-swift
    takes seconds, so the answer is cached per version in ``cache_dir``: call it from a thread."""
    version = swift_version()
    if version is None:
        return None
    cache = cache_dir / f"swift-flags-{version}.json"
    if cache.is_file():
        return {command: frozenset(names) for command, names in json.loads(cache.read_text()).items()}
    # In a child process: importing ms-swift loads torch, which this process should not carry.
    done = subprocess.run(
        [sys.executable, "-c", _LIST_FLAGS],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(found))
    return {command: frozenset(names) for command, names in found.items()}
