"""Where a job fits: the GPUs offered, a placement on them, and a gang's rendezvous port."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from events import messages as m
from events.estimates import Estimate, estimate_queue
from events.placement import foreign_gpus, free_mb, in_service, matching, node_view, readers
from events.records import Job
from events.state import State
from services.scheduler.rules.limits import Limits


def usable_gpus(
    state: State, heartbeats: Mapping[str, m.NodeHeartbeat], limits: Limits, now: datetime
) -> dict[str, list[m.GpuSample]]:
    """Per node, the GPUs no job of ours holds and no foreign process uses, as last measured, on
    nodes heard from recently and fully (a degraded reading offers nothing). (The lists are
    shared: not to be changed.)"""
    threshold = limits.foreign_memory_threshold_mb
    live = in_service(state, heartbeats, limits.heartbeat_timeout_s, now)
    return {name: node_view(state, heartbeats[name], threshold).offered(state)[0] for name in live}


def _estimate(
    state: State,
    heartbeats: Mapping[str, m.NodeHeartbeat],
    limits: Limits,
    now: datetime,
    freeable: Mapping[str, list[m.GpuInfo]],
) -> Mapping[str, Estimate]:
    """Queue estimates over the nodes in service as a pass sees them (the memory each GPU could
    free), GPUs in use by another's processes free at no known time."""
    foreign = foreign_gpus(state, heartbeats, list(freeable), limits.foreign_memory_threshold_mb)
    return estimate_queue(state, now, gpus=freeable, foreign=foreign)


def place(job: Job, usable: Mapping[str, Sequence[m.GpuInfo]]) -> tuple[str, list[int]] | None:
    """The node and GPUs that fit the job best: fewest usable GPUs left idle on the node, then the
    most free memory, then by name and index, so that the same state gives the same answer."""
    spec = job.spec
    count = spec.gpu_count
    any_gpu = spec.node is None and not spec.gpu_model and spec.min_gpu_memory_mb is None and spec.gpu_ids is None
    # Nodes by the GPUs they would leave idle: only those that leave fewest are looked into
    # (at 1,000 GPUs, sorting every node's GPUs by memory had cost most of a decision)
    candidates = sorted((len(gpus) - count, name) for name, gpus in usable.items() if len(gpus) >= count)
    best: tuple[tuple[int, int, str], list[int]] | None = None
    for idle, name in candidates:
        if best is not None and idle > best[0][0]:
            break
        gpus = usable[name]
        fitting = gpus if any_gpu else matching(spec, name, gpus)
        if len(fitting) < count:
            continue
        chosen = (
            fitting if len(fitting) == count else sorted(fitting, key=lambda gpu: (-free_mb(gpu), gpu.index))[:count]
        )
        score = (idle, -sum(free_mb(gpu) for gpu in chosen), name)
        if best is None or score < best[0]:
            best = (score, sorted(gpu.index for gpu in chosen))
    return None if best is None else (best[0][2], best[1])


Placement = list[tuple[str, list[int]]]  # (node, GPU indices) of each rank, rank 0 first


_ANYWHERE: frozenset[str] = frozenset({"*"})  # (a checkpoint no node can read, given up on)


def _resumable_on(
    state: State, job: Job, heartbeats: Mapping[str, m.NodeHeartbeat], limits: Limits
) -> frozenset[str] | None:
    """The nodes where the job may run next: None for anywhere (nothing to resume from); else
    those that can read its last checkpoint (every rank loads it). Empty when none of them is
    in service: it waits for the node that wrote it, unless lost checkpoints are restarted from
    zero (then ``_ANYWHERE``)."""
    if not job.last_checkpoint or job.checkpoint_node is None:
        return None
    able = readers(job.last_checkpoint, job.checkpoint_node, heartbeats)
    if any(node in able and state.nodes[node].up for node in state.nodes):
        return frozenset(able)
    return _ANYWHERE if limits.restart_lost_checkpoints else frozenset()


def _fresh_start(job: Job) -> str:
    return (
        f"its checkpoint {job.last_checkpoint} is on node {job.checkpoint_node}, which is lost,"
        " and no node in service shares that storage: starting from zero"
    )


def _only(gpus: Mapping[str, Sequence[m.GpuInfo]], where: frozenset[str] | None) -> Mapping[str, Sequence[m.GpuInfo]]:
    """The GPUs of the nodes the job may run on."""
    if where is None or where is _ANYWHERE:
        return gpus
    return {name: found for name, found in gpus.items() if name in where}


def place_job(state: State, job: Job, usable: Mapping[str, Sequence[m.GpuInfo]]) -> Placement | None:
    """Where the job's ranks fit best, all of them or none. A gang job takes the ``nodes`` best
    nodes by :func:`place`'s measure, rank 0 on the best that advertises an address."""
    if job.spec.nodes == 1:
        single = place(job, usable)
        return None if single is None else [single]
    options = []
    for name, gpus in usable.items():
        one = place(job, {name: gpus})
        if one is not None:
            chosen = [gpu for gpu in gpus if gpu.index in one[1]]
            options.append(((len(gpus) - len(chosen), -sum(free_mb(gpu) for gpu in chosen), name), one))
    if len(options) < job.spec.nodes:
        return None
    options.sort()
    first = next((i for i, (_, (name, _)) in enumerate(options) if state.nodes[name].addr), None)
    if first is None:
        return None  # no node of these could be its rank 0: none says where to reach it
    ranks = [options[first][1]] + [one for i, (_, one) in enumerate(options) if i != first]
    return ranks[: job.spec.nodes]


def could_place(state: State, job: Job, gpus: Mapping[str, Sequence[m.GpuInfo]]) -> bool:
    """Whether :func:`place_job` would find the job a placement on these GPUs (without working
    out the best one: a pass asks it of every GPU the running jobs could free)."""
    spec = job.spec
    count = spec.gpu_count
    any_gpu = spec.node is None and not spec.gpu_model and spec.min_gpu_memory_mb is None and spec.gpu_ids is None
    fitting = (
        name
        for name, found in gpus.items()
        if len(found) >= count and (any_gpu or len(matching(spec, name, found)) >= count)
    )
    if spec.nodes == 1:
        return next(fitting, None) is not None
    names = list(fitting)
    return len(names) >= spec.nodes and any(state.nodes[name].addr for name in names)


def _master_port(
    state: State, job: Job, attempt: int, node: str, limits: Limits, taken: dict[str, set[int]]
) -> int | None:
    """torchrun's rendezvous port for the attempt on its rank 0 node: one that no other attempt
    there holds, from a start that depends on the job (so that a job's attempt after a stopped
    one, still exiting, is unlikely to meet its port). None for a process of its own (one GPU on
    one node, or a deploy)."""
    if job.spec.task_type == "deploy" or job.spec.total_gpus == 1:
        return None
    ports = limits.rendezvous_ports
    if node not in taken:
        holders = {holder for key, holder in state.allocations.items() if key.partition("/")[0] == node}
        taken[node] = {port for holder in holders if (port := state.jobs[holder].master_port) is not None}
    used = taken[node]
    first = int(job.job_id[:8], 16) if len(job.job_id) >= 8 and _is_hex(job.job_id[:8]) else sum(map(ord, job.job_id))
    for step in range(len(ports)):
        port = ports[(first + attempt + step) % len(ports)]
        if port not in used:
            used.add(port)
            return port
    return None  # every port of the range is held: torchrun's default


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
