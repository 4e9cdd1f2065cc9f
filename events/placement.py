"""Which GPUs a job may run on: the filters of its request, shared by the scheduler (to place it)
and the gateway (to refuse at once a request that no GPU of the cluster could ever satisfy)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import PurePath

from events.messages import GpuInfo, GpuSample, NodeHeartbeat
from events.params import JobBase
from events.records import gpu_key
from events.state import State


def free_mb(gpu: GpuInfo) -> int:
    """Free memory as last measured; for an inventory entry, its whole memory."""
    if isinstance(gpu, GpuSample):
        return gpu.memory_free_mb if gpu.memory_free_mb is not None else gpu.memory_total_mb - gpu.memory_used_mb
    return gpu.memory_total_mb


def in_service(state: State, heartbeats: Mapping[str, NodeHeartbeat], timeout_s: float, now: datetime) -> list[str]:
    """Nodes up in the log whose last heartbeat is recent and complete (a degraded reading offers
    nothing), by name."""
    since = now - timedelta(seconds=timeout_s)
    return [
        name
        for name, node in sorted(state.nodes.items())
        if node.up and (beat := heartbeats.get(name)) is not None and not beat.degraded and beat.at >= since
    ]


class NodeView:
    """What a node's kept reading offers, worked out once per reading (its samples, and the
    memory each GPU could free), and once per set of our jobs on its GPUs (which of them are
    usable now, which are taken by another's processes). A scheduling pass at 1,000 GPUs had
    worked all of it out again, and every decision makes one."""

    __slots__ = ("_held", "beat", "freeable", "inventory", "samples", "threshold_mb")

    def __init__(self, beat: NodeHeartbeat, inventory: Sequence[GpuInfo], threshold_mb: int) -> None:
        self.beat, self.inventory, self.threshold_mb = beat, inventory, threshold_mb
        known = {gpu.index for gpu in inventory}
        # (key, sample, in the node's inventory, used by processes beyond the threshold)
        self.samples = [
            (gpu_key(beat.node, sample.index), sample, sample.index in known, sample.memory_used_mb > threshold_mb)
            for sample in beat.gpus
        ]
        measured = {sample.index: sample for sample in beat.gpus}
        self.freeable = [_freeable(gpu, measured.get(gpu.index), threshold_mb) for gpu in inventory]
        self._held: tuple[int, list[GpuSample], frozenset[str]] | None = None

    def offered(self, state: State) -> tuple[list[GpuSample], frozenset[str]]:
        """The GPUs of the inventory that no job of ours holds and no other process uses, and
        the GPUs no job of ours holds that another's processes use."""
        version = state.held_version(self.beat.node)
        if self._held is None or self._held[0] != version:
            held = state.allocations
            usable = [sample for key, sample, known, used in self.samples if known and not used and key not in held]
            foreign = frozenset(key for key, _, _, used in self.samples if used and key not in held)
            self._held = (version, usable, foreign)
        return self._held[1], self._held[2]


# node -> the view of the reading last looked at: a newer reading replaces it. (A table of every
# reading, emptied when full, had freed thousands of readings at once: a 90 ms pause.)
_VIEWS: dict[str, NodeView] = {}


def node_view(state: State, beat: NodeHeartbeat, threshold_mb: int) -> NodeView:
    inventory = state.nodes[beat.node].gpus
    view = _VIEWS.get(beat.node)
    if view is None or view.beat is not beat or view.inventory is not inventory or view.threshold_mb != threshold_mb:
        view = _VIEWS[beat.node] = NodeView(beat, inventory, threshold_mb)
    return view


def foreign_gpus(
    state: State, heartbeats: Mapping[str, NodeHeartbeat], nodes: Sequence[str], threshold_mb: int
) -> set[str]:
    """GPUs of these nodes that no job of ours holds but that another's processes use more than
    ``threshold_mb`` of, as last measured."""
    return {key for name in nodes for key in node_view(state, heartbeats[name], threshold_mb).offered(state)[1]}


def left_by_our_jobs(beat: NodeHeartbeat, indices: Collection[int], threshold_mb: int) -> NodeHeartbeat:
    """A node's reading as it would be once the jobs of ours it shows on these GPUs are gone: a
    reading taken before their processes ended still shows their memory, which would read as
    another's. Their listed processes and memory are taken off (all of the memory used, where
    more than ``threshold_mb`` of it belongs to processes NVML does not list)."""
    gpus = []
    for sample in beat.gpus:
        if sample.index in indices and (sample.processes or sample.memory_used_mb > threshold_mb):
            unlisted = sample.memory_used_mb - sum(process.used_memory_mb for process in sample.processes)
            used = unlisted if 0 <= unlisted <= threshold_mb else 0
            free = sample.memory_total_mb - used
            sample = sample.model_copy(update={"memory_used_mb": used, "memory_free_mb": free, "processes": []})
        gpus.append(sample)
    return beat.model_copy(update={"gpus": gpus})


def freeable_gpus(
    state: State, heartbeats: Mapping[str, NodeHeartbeat], live: Iterable[str], threshold_mb: int
) -> dict[str, list[GpuInfo]]:
    """Per node in service, every GPU it has, free or busy (with our jobs or another's processes;
    a GPU a job of ours has just left reads as busy until the next heartbeat), with the memory
    it would have free once what runs on it ends: the free memory measured plus what its
    processes use, or all of it where more than ``threshold_mb`` is used by processes NVML does
    not list (another container's, or under MIG), or where nothing was measured. What is left,
    the memory the driver keeps, never frees. A job that fits none of these waits for a node to
    come back, not for anything to end. (The lists are shared: not to be changed.)"""
    return {name: node_view(state, heartbeats[name], threshold_mb).freeable for name in live}


def _freeable(gpu: GpuInfo, sample: GpuSample | None, threshold_mb: int) -> GpuInfo:
    if sample is not None:
        listed = sum(process.used_memory_mb for process in sample.processes)
        if sample.memory_used_mb - listed <= threshold_mb:
            memory = min(free_mb(sample) + listed, gpu.memory_total_mb)
            return gpu.model_copy(update={"memory_total_mb": memory})
    return gpu


def matching(spec: JobBase, node: str, gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The GPUs of a node that the job's request admits (node, model, free memory, ids)."""
    if spec.node not in (None, node):
        return []
    model = (spec.gpu_model or "").lower()
    return [
        gpu
        for gpu in gpus
        if (not model or model in gpu.name.lower())
        and (spec.min_gpu_memory_mb is None or free_mb(gpu) >= spec.min_gpu_memory_mb)
        and (spec.gpu_ids is None or gpu.index in spec.gpu_ids)
    ]


def readers(path: str, writer: str, heartbeats: Mapping[str, NodeHeartbeat]) -> set[str]:
    """The nodes that can read a path ``writer`` wrote, as their heartbeats tell (see
    services/storage.py): the writer, and each node with a root that holds the path and in which
    it sees the writer's marker."""
    found = {writer}
    target = PurePath(path)
    for node, beat in heartbeats.items():
        if any(writer in root.nodes and target.is_relative_to(root.path) for root in beat.roots):
            found.add(node)
    return found


def never_fits(spec: JobBase, state: State) -> str | None:
    """Why no node of the cluster, even idle, could run the job; None if one could (or while no
    node is known yet)."""
    nodes = [node for node in state.nodes.values() if node.up]
    if not nodes:
        return None
    count = spec.gpu_count
    if spec.gpu_model or spec.min_gpu_memory_mb or spec.node or spec.gpu_ids:
        fitting = [node for node in nodes if len(matching(spec, node.name, node.gpus)) >= count]
    else:  # (asked at every submission: no GPU by GPU walk when any GPU will do)
        fitting = [node for node in nodes if len(node.gpus) >= count]
    if spec.nodes > 1:
        if len(fitting) >= spec.nodes and any(node.addr for node in fitting):
            return None
        each = f"{count} GPU{'s' if count > 1 else ''} each" + (
            f" of model {spec.gpu_model!r}" if spec.gpu_model else ""
        )
        memory = f", at least {spec.min_gpu_memory_mb} MB free per GPU" if spec.min_gpu_memory_mb else ""
        if len(fitting) >= spec.nodes:
            return f"no node that could be rank 0 of a {spec.nodes}-node job advertises an address (NODE_ADDR)"
        return (
            f"a {spec.nodes}-node job needs {spec.nodes} nodes with {each}{memory};"
            f" {len(fitting)} of the cluster's {len(nodes)} nodes could ever give that"
        )
    if fitting:
        return None
    wanted = [f"{count} GPU{'s' if count > 1 else ''}"]
    if spec.gpu_model:
        wanted.append(f"model {spec.gpu_model!r}")
    if spec.min_gpu_memory_mb:
        wanted.append(f"at least {spec.min_gpu_memory_mb} MB each")
    if spec.node:
        wanted.append(f"on node {spec.node!r}")
    if spec.gpu_ids:
        wanted.append(f"ids {spec.gpu_ids}")
    biggest = max(len(node.gpus) for node in nodes)
    return f"no node can ever give {', '.join(wanted)} (largest node: {biggest} GPUs)"
