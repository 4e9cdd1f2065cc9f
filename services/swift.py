"""Locating the `swift` CLI, shared by the runner and the exporter."""

from __future__ import annotations

import shutil
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
