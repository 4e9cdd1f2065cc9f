"""Nodes joining, changing and lost; runners lost; jobs idle on their GPUs reclaimed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from events import messages as m
from events.bus import Append
from events.keys import Keys
from events.records import HOLDS_GPUS, JobStatus, gpu_key
from events.state import State
from services.scheduler.rules.facts import retry_or_fail, stopped, stops
from services.scheduler.rules.limits import Limits


def reclaim_idle(
    state: State,
    keys: Keys,
    heartbeat: m.NodeHeartbeat,
    heartbeats: Mapping[str, m.NodeHeartbeat],
    idle_since: dict[str, datetime],
    limits: Limits,
    now: datetime,
) -> list[Append]:
    """At a node's heartbeat: each training job on it whose GPUs, on every node it runs on, have
    all read under the idle threshold since ``idle_since`` (kept here, heartbeat to heartbeat) for
    its idle timeout is stopped with a checkpoint; its runner reports it failed, reason idle. A
    GPU whose utilisation is not known counts as busy."""
    node = state.nodes.get(heartbeat.node)
    if node is None:
        return []
    decided: list[Append] = []
    for job_id in {state.allocations.get(gpu_key(heartbeat.node, gpu.index)) for gpu in node.gpus} - {None}:
        job = state.jobs.get(job_id or "")
        timeout = (job.spec.idle_timeout_s or limits.idle_timeout_s) if job is not None else None
        if job is None or timeout is None or job.spec.task_type == "deploy" or job.status != JobStatus.running:
            idle_since.pop(job_id or "", None)
            continue
        if job.cancel_requested or job.stopping:
            continue
        if not all(_idle(heartbeats.get(rank.node), rank.gpu_ids, limits) for rank in job.ranks):
            idle_since.pop(job.job_id, None)
            continue
        since = idle_since.setdefault(job.job_id, now)
        if (now - since).total_seconds() < timeout:
            continue
        del idle_since[job.job_id]
        why = f"idle: its GPUs under {limits.idle_gpu_util_pct:g} % for {timeout:g} s"
        common: m.Ids = {"job_id": job.job_id, "causation_id": heartbeat.id}
        decided += [Append(keys.events, m.JobCancelRequested(reason=why, **common)), *stops(keys, job, "idle", common)]
    return decided


def _idle(beat: m.NodeHeartbeat | None, gpu_ids: Sequence[int], limits: Limits) -> bool:
    if beat is None:
        return False
    readings = {gpu.index: gpu.utilization_pct for gpu in beat.gpus}
    return all((util := readings.get(index)) is not None and util < limits.idle_gpu_util_pct for index in gpu_ids)


def lost_nodes(state: State, last_heard: Mapping[str, datetime], limits: Limits, now: datetime) -> list[str]:
    """Nodes that are up in the log but have not been heard from for the node timeout."""
    deadline = timedelta(seconds=limits.node_timeout_s)
    return [
        name for name, node in sorted(state.nodes.items()) if node.up and now - last_heard.get(name, now) > deadline
    ]


def runner_silent(node: str, runner_heard: Mapping[str, datetime], limits: Limits, now: datetime) -> bool:
    """Whether the node's runner, heard from before, has been silent for the node timeout."""
    heard = runner_heard.get(node)
    return heard is not None and now - heard > timedelta(seconds=limits.node_timeout_s)


def lost_runners(
    state: State,
    runner_heard: Mapping[str, datetime],
    last_heard: Mapping[str, datetime],
    limits: Limits,
    now: datetime,
) -> list[str]:
    """Nodes up in the log whose runner has stopped sending heartbeats while the node itself is
    still heard from (else the node is lost as a whole): nothing there can start, watch or stop
    a job."""
    alive = timedelta(seconds=limits.node_timeout_s / 2)
    return [
        name
        for name, node in sorted(state.nodes.items())
        if node.up
        and runner_silent(name, runner_heard, limits, now)
        and now - last_heard.get(name, now - 2 * alive) <= alive
    ]


def lose_node(
    state: State, keys: Keys, node: str, cause: m.Message, reason: m.NodeLossReason = m.NodeLossReason.NODE_LOST
) -> list[Append]:
    """Declare a node lost (``reason``: node_lost, or runner_lost when only its runner went
    silent): each of its jobs runs again elsewhere (from its last checkpoint) while it has
    retries left, else fails. The node's runner, should it come back, is told to stop the old
    attempts, whose reports the log ignores anyway."""
    what = "its runner" if reason == m.NodeLossReason.RUNNER_LOST else f"node {node}"
    decided: list[Append] = []
    for job in sorted(state.jobs.values(), key=lambda j: j.seq):
        if job.node == node and job.stopping:
            decided.append(stopped(keys, job, reason, cause))  # no report will come: stop waiting
            continue
        if job.status not in HOLDS_GPUS or not job.runs_on(node):
            continue
        # An attempt that never ran (a rank had not started: it may have been placed on the node
        # in the moments before its loss was known) costs the job none of its retries.
        never_ran = job.status == JobStatus.scheduled
        decided.append(retry_or_fail(keys, job, reason, f"{what} stopped sending heartbeats", cause, never_ran))
        # Every rank is told to stop: the others now, this node's should it come back.
        decided += stops(keys, job, "preempt", {"job_id": job.job_id, "causation_id": cause.id})
    decided.append(Append(keys.events, m.NodeLost(node=node, reason=reason, causation_id=cause.id)))
    return decided


def node_changes(state: State, heartbeat: m.NodeHeartbeat) -> list[m.Message]:
    """A node.joined fact when a node is new, returns, or reports a different inventory. A
    degraded reading (NVML errors) says nothing about the inventory, and GPUs that jobs still
    hold cannot leave it."""
    if heartbeat.degraded:
        return []
    known = state.nodes.get(heartbeat.node)
    inventory = [
        m.GpuInfo(index=g.index, uuid=g.uuid, name=g.name, memory_total_mb=g.memory_total_mb) for g in heartbeat.gpus
    ]
    if (
        known is not None
        and known.up
        and known.gpus == inventory
        and known.simulated == heartbeat.simulated
        and known.addr == heartbeat.addr
    ):
        return []
    held = {int(key.split("/")[1]) for key in state.allocations if key.split("/")[0] == heartbeat.node}
    if not held <= {gpu.index for gpu in inventory}:
        return []
    return [m.NodeJoined(node=heartbeat.node, simulated=heartbeat.simulated, gpus=inventory, addr=heartbeat.addr)]
