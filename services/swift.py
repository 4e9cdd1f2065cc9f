"""The installed ms-swift: where its `swift` CLI is, and which flags its commands accept."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def swift_executable(configured: str) -> str:
    """The `swift` CLI: as configured (a name on the PATH or a path), else the one installed
    beside this interpreter."""
    found = shutil.which(configured)
    if found:
        return found
    beside = Path(sys.executable).with_name("swift")
    return str(beside) if beside.exists() else configured


# Printed by a child process: per command the flags it accepts, and per flag its type and help,
# from the field's metadata and from the `name (type): text` entries of the classes' docstrings
# (where ms-swift documents most of its arguments).
_DESCRIBE = r"""
import dataclasses, inspect, json, re
from swift import arguments
commands = {"sft": arguments.SftArguments, "deploy": arguments.DeployArguments, "export": arguments.ExportArguments}
entry = re.compile(r"^\s+(\w+) \([^\n]*\):\s*(.*?)(?=^\s+\w+ \([^\n]*\):|\Z)", re.M | re.S)
fields = {}
for cls in commands.values():
    docs = {}
    for klass in reversed(cls.__mro__):
        docs.update((m.group(1), " ".join(m.group(2).split())) for m in entry.finditer(inspect.getdoc(klass) or ""))
    for f in dataclasses.fields(cls):
        help = " ".join(filter(None, [f.metadata.get("help", ""), docs.get(f.name, "")]))
        fields.setdefault(f.name, {"type": str(f.type), "help": help})
print(json.dumps({
    "commands": {name: sorted(f.name for f in dataclasses.fields(cls)) for name, cls in commands.items()},
    "fields": fields,
}))
"""


@dataclass(frozen=True)
class SwiftField:
    """One ms-swift argument as its dataclass declares it."""

    type: str
    help: str


def swift_version() -> str | None:
    try:
        return importlib.metadata.version("ms-swift")
    except importlib.metadata.PackageNotFoundError:
        return None


def _described(cache_dir: Path) -> dict[str, Any] | None:
    version = swift_version()
    if version is None:
        return None
    cache = cache_dir / f"swift-args-{version}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    # In a child process: importing ms-swift loads torch, which this process should not carry.
    done = subprocess.run(
        [sys.executable, "-c", _DESCRIBE],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(found))
    return found


def accepted_flags(cache_dir: Path) -> dict[str, frozenset[str]] | None:
    """The flags the installed ms-swift accepts, per command (`sft`, `deploy`, `export`), read
    from its argument dataclasses; None when ms-swift is not installed here. Importing ms-swift
    takes seconds, so the answer is cached per version in ``cache_dir``: call it from a thread."""
    described = _described(cache_dir)
    if described is None:
        return None
    return {command: frozenset(names) for command, names in described["commands"].items()}


def swift_fields(cache_dir: Path) -> dict[str, SwiftField] | None:
    """Every flag of those commands with its declared type and help text (cached as above)."""
    described = _described(cache_dir)
    if described is None:
        return None
    return {name: SwiftField(**field) for name, field in described["fields"].items()}


_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")  # torchrun prefixes each worker's lines
# The line a Python traceback ends with: the exception's type (dotted), a colon and its message.
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*(?:[A-Za-z_]\w*: \S.*|[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit):?)$"
)
# torchrun's own exception only says that a worker failed; the worker's exception says why.
_LAUNCHER_FAILURES = ("ChildFailedError",)


def failure_message(lines: list[str], *, limit: int = 1000) -> str:
    """One line that says why a process failed: the last exception its tracebacks end with (the
    frames, source lines and carets stay in the lines themselves), or, without a traceback, the
    last line that names an error; "" if nothing does."""
    lines = [_RANK_PREFIX.sub("", line).rstrip() for line in lines]
    found: list[str] = []
    for previous, line in itertools.pairwise(lines):
        # A traceback's frames are indented; the exception follows them at the margin.
        if previous[:1].isspace() and not line[:1].isspace() and _EXCEPTION_LINE.match(line):
            found.append(line)
    causes = [line for line in found if not line.split(":", 1)[0].endswith(_LAUNCHER_FAILURES)]
    named = [line for line in lines if "Error" in line and not line[:1].isspace()]
    message = " ".join((causes or found or named or [""])[-1].split())
    return message if len(message) <= limit else message[: limit - 1] + "…"
