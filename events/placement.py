"""Which GPUs a job may run on: the filters of its request, shared by the scheduler (to place it)
and the gateway (to refuse at once a request that no GPU of the cluster could ever satisfy)."""

from __future__ import annotations

from collections.abc import Sequence

from events.messages import GpuInfo, GpuSample
from events.params import JobBase
from events.state import State


def free_mb(gpu: GpuInfo) -> int:
    """Free memory as last measured; for an inventory entry, its whole memory."""
    if isinstance(gpu, GpuSample):
        return gpu.memory_free_mb if gpu.memory_free_mb is not None else gpu.memory_total_mb - gpu.memory_used_mb
    return gpu.memory_total_mb


def matching(spec: JobBase, node: str, gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The GPUs of a node that the job's request admits (node, model, free memory, ids)."""
    if spec.node not in (None, node):
        return []
    model = (spec.gpu_model or "").lower()
    return [
        gpu
        for gpu in gpus
        if model in gpu.name.lower()
        and (spec.min_gpu_memory_mb is None or free_mb(gpu) >= spec.min_gpu_memory_mb)
        and (spec.gpu_ids is None or gpu.index in spec.gpu_ids)
    ]


def never_fits(spec: JobBase, state: State) -> str | None:
    """Why no node of the cluster, even idle, could run the job; None if one could (or while no
    node is known yet)."""
    nodes = [node for node in state.nodes.values() if node.up]
    if not nodes:
        return None
    count = spec.gpu_count
    if any(len(matching(spec, node.name, node.gpus)) >= count for node in nodes):
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
