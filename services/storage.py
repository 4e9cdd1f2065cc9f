"""Which of a node's storage roots other nodes share: a marker file per node in each root.

A node writes ``<root>/.swift-trainer/nodes/<node name>`` in each of its roots (its PATH_ROOTS and
its runs directory) and lists the markers it finds there: a root in which it reads another node's
marker is one both see, wherever each mounts it. The lists go out in the node's heartbeats, and the
scheduler sends a job that resumes from a checkpoint only to nodes that can read it
(:func:`events.placement.readers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from events import messages as m

MARKERS = Path(".swift-trainer") / "nodes"


def storage_roots(roots: Iterable[Path], node: str) -> list[m.StorageRoot]:
    """Each root (resolved; nested ones once), with the nodes whose markers it holds, this
    node's own written first where the root is writable. A root that is missing or cannot be read is left out."""
    seen: list[m.StorageRoot] = []
    for root in sorted({Path(root).resolve() for root in roots}):
        if not root.is_dir():
            continue
        folder = root / MARKERS
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            marker = folder / node
            if not marker.exists():
                marker.write_text(node)
        try:
            names = sorted(entry.name for entry in folder.iterdir() if entry.is_file())
        except OSError:
            continue
        seen.append(m.StorageRoot(path=str(root), nodes=names))
    return seen
