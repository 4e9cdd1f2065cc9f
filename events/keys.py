"""Every Redis key and stream name the system uses, in one place.

All keys share one hash tag (``{st}`` by default, or ``{<namespace>}``) so that a Lua script or
MULTI/EXEC may touch several of them, also under Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

# Consumer group names: one per kind of reader that shares work.
SCHEDULER_GROUP = "scheduler"
RUNNER_GROUP = "runner"
EXPORTER_GROUP = "exporter"
NOTIFIER_GROUP = "notifier"


@dataclass(frozen=True)
class Keys:
    namespace: str = "st"

    @property
    def tag(self) -> str:
        return "{" + self.namespace + "}"

    @property
    def events(self) -> str:
        """The log: every fact, in order. Never trimmed by default."""
        return f"{self.tag}:events"

    @property
    def chain(self) -> str:
        """The head of the log's hash chain (``id``, ``hash``), and where the live log begins once
        older entries were archived (``archived_id``, ``archived_hash``)."""
        return f"{self.tag}:events:chain"

    @property
    def commands(self) -> str:
        """Requests for the scheduler (submit, cancel, export, process)."""
        return f"{self.tag}:commands"

    @property
    def telemetry(self) -> str:
        """GPU and service heartbeats; capped, not part of the audit log."""
        return f"{self.tag}:telemetry"

    @property
    def dead_letter(self) -> str:
        """Entries that could not be decoded or were delivered too often, with the reason."""
        return f"{self.tag}:dead"

    @property
    def exports(self) -> str:
        """Export work for the exporter (merge LoRA adapters into a model)."""
        return f"{self.tag}:exports"

    def node(self, node: str) -> str:
        """Commands for the runner on one node (start, stop)."""
        return f"{self.tag}:node:{node}"

    def logs(self, job_id: str, rank: int = 0) -> str:
        """A job's output lines (of rank 0, or of another rank of a gang job); capped."""
        return f"{self.tag}:logs:{job_id}" + (f":rank{rank}" if rank else "")

    def run(self, job_id: str, attempt: int | str, rank: int = 0) -> str:
        """The runner's record of a process it started (pid, process group, run dir), per
        attempt (and rank of a gang job): a stale attempt on a node that was lost and the job's
        next attempt never share one."""
        return f"{self.tag}:run:{job_id}:{attempt}" + (f":{rank}" if rank else "")

    @property
    def leader(self) -> str:
        """The scheduler leader lease: ``<instance>`` with a TTL."""
        return f"{self.tag}:scheduler:leader"

    @property
    def fence(self) -> str:
        """The fencing token of the current scheduler leader; every scheduler write checks it."""
        return f"{self.tag}:scheduler:fence"

    @property
    def snapshot(self) -> str:
        """The folded state at a log position (hash: position, version, state)."""
        return f"{self.tag}:snapshot"

    @property
    def legacy_auth_secret(self) -> str:
        """Where gateways once kept the key that signs browsers' tokens, readable by anyone with
        access to Redis. Gateways delete it at start; the key now lives outside Redis."""
        return f"{self.tag}:gateway:auth-secret"

    def done(self, message_id: str) -> str:
        """Marks a handled message, so that a redelivery has no second effect."""
        return f"{self.tag}:done:{message_id}"
