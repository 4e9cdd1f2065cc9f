"""A run's record and its processes: what the runner keeps in Redis of each attempt it started
(pid, process group, run dir, command), so that a restarted runner adopts it, and how the
attempt is spawned in its own session with its output in files."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.typing import EncodableT, FieldT

from events import messages as m
from services.launch import Launch, merged_env


class Children:
    """The processes this process started, by pid, for as long as the process lives.

    A service's main starts again inside the same process when Redis is lost
    (services/runtime.py), and everything it held goes with it. A child's handle must not: only
    its parent can reap it and learn its exit status, and until it is reaped it stays a zombie
    member of its process group, which then never empties.
    """

    def __init__(self) -> None:
        self._by_pid: dict[int, subprocess.Popen[bytes]] = {}

    def add(self, process: subprocess.Popen[bytes]) -> None:
        self._by_pid[process.pid] = process

    def get(self, pid: int) -> subprocess.Popen[bytes] | None:
        return self._by_pid.get(pid)

    def forget(self, pid: int) -> None:
        self._by_pid.pop(pid, None)


CHILDREN = Children()


@dataclass(frozen=True)
class RunRecord:
    job_id: str
    attempt: int
    node: str
    pid: int
    pgid: int
    run_dir: str
    output_dir: str
    started_at: float
    deploy: bool
    endpoint: str = ""
    time_limit_s: float | None = None
    gpus: str = ""  # CUDA_VISIBLE_DEVICES: NVML indices
    rank: int = 0  # of a gang job
    nodes: int = 1  # a gang job's ranks
    idle_timeout_s: float | None = None  # a deploy's: stopped once it served no request this long
    port: int | None = None  # a deploy's: the port of the deploy pool its server listens on (endpoint's)

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.attempt)

    def to_redis(self) -> dict[FieldT, EncodableT]:
        return {"record": json.dumps(asdict(self))}

    @classmethod
    def from_redis(cls, fields: Mapping[str, str]) -> RunRecord:
        record = json.loads(fields["record"])
        if "port" not in record and record.get("endpoint"):
            # recorded by a runner from before the field: the port is the endpoint's
            record["port"] = urlsplit(record["endpoint"]).port
        return cls(**record)


def recorded_command(record: RunRecord) -> dict[str, Any]:
    """The argument list and environment the attempt was started with (from its run dir)."""
    path = Path(record.run_dir) / "command.json"
    return json.loads(path.read_text()) if path.exists() else {"argv": [], "env": {}}


def fact_id(record: RunRecord, what: str) -> str:
    """A fixed id for a fact of the attempt's (rank's) life: reported twice, it is appended once."""
    return f"{record.job_id}-{record.attempt}-" + (f"rank{record.rank}-" if record.rank else "") + what


def started_event(record: RunRecord, command: dict[str, Any], gpus: str) -> m.JobStarted:
    # A fixed id: a redelivered start re-reports the same fact, which the commit's dedupe drops.
    return m.JobStarted(
        id=fact_id(record, "started"),
        rank=record.rank,
        job_id=record.job_id,
        attempt=record.attempt,
        node=record.node,
        pid=record.pid,
        pgid=record.pgid,
        run_dir=record.run_dir,
        argv=command["argv"],
        env=command["env"],
        cuda_visible_devices=gpus,
    )


def record_for(
    launch: Launch, job_id: str, attempt: int, node: str, pid: int, started_at: float, rank: int = 0, nodes: int = 1
) -> RunRecord:
    return RunRecord(
        rank=rank,
        nodes=nodes,
        job_id=job_id,
        attempt=attempt,
        node=node,
        pid=pid,
        pgid=pid,
        run_dir=str(launch.run_dir),
        output_dir=str(launch.output_dir),
        started_at=started_at,
        deploy=launch.port is not None,
        endpoint=f"http://127.0.0.1:{launch.port}/v1" if launch.port else "",
        port=launch.port,
        time_limit_s=launch.time_limit_s,
        gpus=launch.env.get("CUDA_VISIBLE_DEVICES", ""),
    )


def spawn(
    launch: Launch, job_id: str, attempt: int, node: str, rank: int = 0, nodes: int = 1
) -> tuple[RunRecord, subprocess.Popen[bytes]]:
    """Start the process in a new session (its own process group) writing to the run dir."""
    launch.run_dir.mkdir(parents=True, exist_ok=True)
    launch.output_dir.mkdir(parents=True, exist_ok=True)
    # The run directories an earlier attempt left in the same output directory: not this one's.
    before = sorted(p.name for p in launch.output_dir.glob("v*-*") if p.is_dir())
    command = {"argv": launch.argv, "env": launch.env, "version_dirs_before": before}
    (launch.run_dir / "command.json").write_text(json.dumps(command, indent=2))
    with (launch.run_dir / "stdout.log").open("ab") as out, (launch.run_dir / "stderr.log").open("ab") as err:
        process = subprocess.Popen(
            launch.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=merged_env(launch),
            cwd=launch.run_dir,
            start_new_session=True,
        )
    CHILDREN.add(process)
    return record_for(launch, job_id, attempt, node, process.pid, time.time(), rank, nodes), process


def find_version_dir(output_dir: Path, since: float, before: Collection[str] = ()) -> Path | None:
    """The `vN-YYYYMMDD-HHMMSS` directory ms-swift created for this run: not one of those there
    ``before`` it started (an earlier attempt's, still written to as it stopped)."""
    candidates = [
        p for p in output_dir.glob("v*-*") if p.is_dir() and p.name not in before and p.stat().st_mtime >= since - 1
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda p: int(p.name[1:].split("-")[0]) if p.name[1:].split("-")[0].isdigit() else -1)
