"""The GPUs view (``GET /gpus`` and its stream): every node with its GPUs as its last heartbeat saw
them and the job that holds each, a summary per node, and the cluster's totals.

A pure function of the folded state and the latest heartbeats, so that a dashboard of a large
cluster reads one line per node without adding up a thousand GPUs itself.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from events.messages import GpuInfo, NodeHeartbeat
from events.placement import in_service
from events.records import gpu_key
from events.state import State

NodeState = Literal["up", "silent", "degraded", "lost"]
GpuStatus = Literal["free", "busy", "foreign", "unavailable"]


def node_state(up: bool, beat: NodeHeartbeat | None, now: datetime, timeout_s: float) -> NodeState:
    """lost: the log says so; silent: no heartbeat for the timeout, so its GPUs are offered to no
    one; degraded: NVML could not read everything (the scheduler offers nothing either); up."""
    if not up:
        return "lost"
    if beat is None or now - beat.at > timedelta(seconds=timeout_s):
        return "silent"
    return "degraded" if beat.degraded else "up"


def gpus_view(
    state: State,
    heartbeats: Mapping[str, NodeHeartbeat],
    now: datetime,
    timeout_s: float,
    threshold_mb: int,
) -> dict[str, Any]:
    """Nodes and their GPUs, each node with a summary, and the cluster's summary. ``timeout_s``
    and ``threshold_mb`` are the scheduler's: when a node is silent, and how much memory other
    processes may use on a GPU before it is theirs."""
    nodes = []
    holders: set[str] = set()
    totals = {"gpus": 0, "free": 0, "busy": 0, "foreign": 0, "memory_used_mb": 0, "memory_total_mb": 0}
    up = 0
    for name, node in sorted(state.nodes.items()):
        beat = heartbeats.get(name)
        status = node_state(node.up, beat, now, timeout_s)
        samples = {g.index: g for g in beat.gpus} if beat else {}
        gpus, summary = _node_gpus(state, name, node.gpus, samples, threshold_mb, offered=status == "up")
        holders.update(summary.pop("holders"))
        for key in totals:
            totals[key] += summary[key]
        up += status == "up"
        age = max(round((now - beat.at).total_seconds(), 1), 0.0) if beat else None
        nodes.append(
            {
                "node": name,
                "up": node.up,
                "simulated": node.simulated,
                "last_heartbeat_at": beat.at.isoformat() if beat else None,
                "summary": {"state": status, **summary, "heartbeat_age_s": age},
                "gpus": gpus,
            }
        )
    cluster = {"nodes": len(nodes), "nodes_up": up, **totals, "jobs": len(holders)}
    return {"at": now.isoformat(), "summary": cluster, "nodes": nodes}


def _node_gpus(
    state: State,
    name: str,
    inventory: list[GpuInfo],
    samples: Mapping[int, GpuInfo],
    threshold_mb: int,
    *,
    offered: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A node's GPUs as shown, and its counts: free GPUs are those the scheduler would offer now."""
    gpus = []
    holders: set[str] = set()
    free = busy = foreign = used_mb = total_mb = 0
    for info in inventory:
        sample = samples.get(info.index)
        held_by = state.allocations.get(gpu_key(name, info.index))
        shown = sample if sample is not None else info
        used = getattr(sample, "memory_used_mb", 0)
        used_mb += used
        total_mb += shown.memory_total_mb
        status: GpuStatus
        if held_by is not None:
            status = "busy"
            busy += 1
            holders.add(held_by)
        elif used > threshold_mb:
            status = "foreign"
            foreign += 1
        elif offered:
            status = "free"
            free += 1
        else:
            status = "unavailable"
        gpus.append({**shown.model_dump(mode="json"), "held_by": held_by, "status": status})
    summary = {
        "gpus": len(inventory),
        "free": free,
        "busy": busy,
        "foreign": foreign,
        "jobs": len(holders),
        "memory_used_mb": used_mb,
        "memory_total_mb": total_mb,
        "holders": holders,
    }
    return gpus, summary


def inputs(state: State, heartbeats: Mapping[str, NodeHeartbeat], now: datetime, timeout_s: float) -> Hashable:
    """What the view depends on, short of the clock: a stream sends the view again only when this
    changes (a job's progress moves the log but changes no GPU)."""
    return (
        tuple((name, beat.at) for name, beat in sorted(heartbeats.items())),
        tuple((name, node.up, node.epoch, node.simulated) for name, node in sorted(state.nodes.items())),
        tuple(sorted(state.allocations.items())),
        tuple(in_service(state, heartbeats, timeout_s, now)),
    )
