"""The gpu-monitor: one per node, publishes the node's GPUs in heartbeats."""
