"""The pool's bounds the rules decide by, and the shape of a command's rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from events.bus import Append
from events.keys import Keys
from events.policy import Policy
from events.state import State

# A command decided by the state, the keys and the command alone.
CommandRule = Callable[[State, Keys, Any], list[Append]]


@dataclass(frozen=True, kw_only=True)
class Limits(Policy):
    """The pool's sharing policy, and the scheduler's other bounds."""

    heartbeat_timeout_s: float  # a GPU of a node silent this long is offered to no one
    foreign_memory_threshold_mb: int
    node_timeout_s: float = 30.0  # a node silent this long is declared lost
    backfill: bool = False  # let short jobs (by time limit) start ahead of a blocked one
    # How long past its time limit a job may hold its GPUs (it is stopped gracefully): a job is
    # backfilled only if its limit plus this ends before the blocked job's estimated start
    backfill_margin_s: float = 0.0
    rendezvous_ports: range = range(29500, 30000)  # torchrun's MASTER_PORT, one per attempt and node
    restart_lost_checkpoints: bool = False  # else a job whose checkpoint no node can read waits
    idle_timeout_s: float | None = None  # IDLE_TIMEOUT_S: training jobs' default (off: None)
    idle_gpu_util_pct: float = 5.0  # a GPU under this is idle
