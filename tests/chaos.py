"""The chaos run: the whole system as separate processes (two schedulers, two nodes each with a
gpu-monitor and a runner, the gateway, the exporter, Redis with AOF) under a workload of jobs with
mixed priorities, sizes, cancels and priority changes, while a seeded schedule of faults SIGKILLs
every kind of process (Redis included, restarted from its AOF on the same port), pauses a node
(SIGSTOP of its runner, gpu-monitor and trainers) past the node timeout, and fills Redis to its
`maxmemory` so that writes are refused.

Trainers are the stand-in of `tests/chaos_trainer.py` (through SWIFT_BIN); each records its
start and end in a ledger file outside Redis. At the end the run checks, from the log alone and
from the ledger alone, that no accepted job was lost, none ran twice and no GPU was held twice,
runs `swift-trainer audit verify` and `audit check`, and prints a table.

    python -m tests.chaos --jobs 200 --seed 1

Recovery time of a fault: from its end (the process started again, the node resumed, Redis
back or its memory freed) until the gateway's health is 200 again, a probe job submitted then
has been decided by the scheduler, and (for a node, runner or gpu-monitor fault) the node is
heard again (a paused node: has rejoined).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from events import messages as m
from events.codec import DecodeError, decode
from events.errors import IllegalTransition
from events.keys import Keys
from events.state import State
from services.launch import TAG_VARIABLE
from tests.conftest import RedisServer, wait_for
from tests.system import System

NODES = ("node-a", "node-b")
GPUS_PER_NODE = 4
FAULTS = (
    "redis",
    "scheduler-leader",
    "scheduler-standby",
    "gateway",
    "runner",
    "gpu-monitor",
    "exporter",
    "node-pause",
    "maxmemory",
)
NODE_FAULTS = ("runner", "gpu-monitor", "node-pause")
RECOVERY_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 10.0
RETRY_S = 0.2  # between attempts of a request the system refused (503) or could not answer
TERMINAL_TYPES = {"job.succeeded", "job.failed", "job.cancelled", "job.rejected"}


@dataclass(frozen=True)
class Config:
    jobs: int = 200
    seed: int = 1
    faults: int | None = None  # default: about one per ten jobs, each kind at least once
    step_s: float = 0.15  # one training step of the stand-in trainer
    span_s: float | None = None  # over how long jobs are submitted and faults injected
    node_timeout_s: float = 5.0
    heartbeat_interval_s: float = 0.5
    leader_lease_ms: int = 2000
    drain_timeout_s: float = 300.0
    # Urgent jobs preempt lower-priority ones (checkpoint, requeue, resume) amid the faults: the
    # ledger proves that a preemptor never shares a GPU with its victim's processes.
    preemption: bool = True

    @property
    def fault_count(self) -> int:
        return self.faults if self.faults is not None else max(len(FAULTS), self.jobs // 10)

    @property
    def workload_span_s(self) -> float:
        # Long enough for the faults one after another with their recoveries (a node pause
        # lasts past the node timeout), and for the GPUs to keep up with the submissions.
        return self.span_s if self.span_s is not None else max(30.0, self.jobs * 0.6, self.fault_count * 9.0)


# --- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedJob:
    index: int
    at_s: float
    priority: int
    gpu_count: int
    max_steps: int
    save_steps: int
    auto_export: bool
    max_retries: int
    cancel_after_s: float | None = None
    reprioritise_after_s: float | None = None
    new_priority: int = 5


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    node: str = ""  # which node, for node faults
    hold_s: float = 0.0  # how long Redis stays down, or full


def plan_workload(rng: random.Random, config: Config) -> list[PlannedJob]:
    span = config.workload_span_s * 0.85
    jobs = []
    for index in range(config.jobs):
        max_steps = rng.randint(4, 30)
        roll = rng.random()
        jobs.append(
            PlannedJob(
                index=index,
                at_s=round(rng.uniform(0, span), 3),
                priority=rng.randint(0, 10),
                gpu_count=rng.choices([1, 2, 4], weights=[6, 3, 1])[0],
                max_steps=max_steps,
                save_steps=max(1, max_steps // rng.randint(1, 4)),
                auto_export=rng.random() < 0.25,
                max_retries=rng.choice([0, 3, 3, 3]),
                cancel_after_s=round(rng.uniform(0, 8), 3) if roll < 0.12 else None,
                reprioritise_after_s=round(rng.uniform(0, 5), 3) if 0.12 <= roll < 0.27 else None,
                new_priority=rng.randint(0, 10),
            )
        )
    return sorted(jobs, key=lambda job: job.at_s)


def plan_faults(rng: random.Random, config: Config) -> list[Fault]:
    """Every kind at least once, the rest drawn at random, spread over the span."""
    if config.fault_count == 0:
        return []
    kinds = list(FAULTS) + rng.choices(FAULTS, k=max(0, config.fault_count - len(FAULTS)))
    rng.shuffle(kinds)
    spacing = config.workload_span_s / (len(kinds) + 1)
    faults = []
    for number, kind in enumerate(kinds, start=1):
        # Redis full for longer than the node timeout: no heartbeat lands meanwhile either.
        full_s = rng.uniform(1.1, 1.6) * config.node_timeout_s
        hold = {"redis": rng.uniform(0.2, 2.0), "maxmemory": full_s}.get(kind, 0.0)
        faults.append(
            Fault(
                at_s=round(spacing * number + rng.uniform(-0.2, 0.2) * spacing, 3),
                kind=kind,
                node=rng.choice(NODES) if kind in NODE_FAULTS else "",
                hold_s=round(hold, 3),
            )
        )
    return faults


# --- the cluster ----------------------------------------------------------------------------


def stand_in_swift(root: Path) -> Path:
    """An executable that runs the stand-in trainer (SWIFT_BIN must name one program)."""
    path = root / "swift"
    script = Path(__file__).with_name("chaos_trainer.py").resolve()
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -S {script} "$@"\n')
    path.chmod(0o755)
    return path


class Cluster:
    """Redis and every process of the system, each started again under the same name."""

    def __init__(self, root: Path, config: Config) -> None:
        self.root = root
        self.ledger = root / "ledger.jsonl"
        self.redis = RedisServer(root / "redis")
        self.system: System | None = None
        self.config = config
        self.specs: dict[str, tuple[str, str]] = {}  # process name -> (node or "", start spec)
        self.unexpected_exits: list[str] = []

    @property
    def sys(self) -> System:
        assert self.system is not None
        return self.system

    def start(self) -> None:
        self.redis.start()
        self.system = System(
            self.redis.url,
            self.root / "system",
            SWIFT_BIN=str(stand_in_swift(self.root)),
            CHAOS_LEDGER=str(self.ledger),
            CHAOS_STEP_S=str(self.config.step_s),
            SIMULATED_GPUS=str(GPUS_PER_NODE),
            HEARTBEAT_INTERVAL_S=str(self.config.heartbeat_interval_s),
            NODE_TIMEOUT_S=str(self.config.node_timeout_s),
            LEADER_LEASE_MS=str(self.config.leader_lease_ms),
            CLAIM_IDLE_MS="5000",
            STOP_GRACE_S="5",
            SUBMIT_WAIT_S="2",
            PATH_ROOTS=str(self.root),
            PREEMPTION="priority" if self.config.preemption else "off",
            PREEMPT_MIN_RUNTIME_S="1",
            MAX_PREEMPTIONS="2",
        )
        for name, spec in (("scheduler", "scheduler"), ("standby", "standby=scheduler")):
            self.specs[name] = ("", spec)
        for name in ("gateway", "exporter"):
            self.specs[name] = ("", name)
        for node in NODES:
            for service in ("gpu-monitor", "runner"):
                self.specs[f"{service}@{node}"] = (node, service)
        for name in self.specs:
            self.launch(name)
        self.sys.wait_healthy(timeout_s=120)

    def launch(self, name: str) -> None:
        node, spec = self.specs[name]
        if node:
            self.sys.start_on(node, spec)
        else:
            self.sys.start(spec)

    def kill(self, name: str) -> None:
        self.check_alive()
        self.sys.stop(name, sig=signal.SIGKILL)

    def restart(self, name: str) -> None:
        self.kill(name)
        self.launch(name)

    def check_alive(self) -> None:
        """Note every process that exited on its own (none should)."""
        for name, process in list(self.sys.processes.items()):
            if process.poll() is not None:
                self.unexpected_exits.append(f"{name} exited with {process.returncode}")
                self.sys.processes.pop(name)
                self.launch(name)

    def leader(self, client: redis.Redis) -> str | None:
        """The name of the scheduler process holding the lease."""
        holder = retrying(lambda: client.get(Keys(self.sys.namespace).leader))
        for name in ("scheduler", "standby"):
            process = self.sys.processes.get(name)
            if holder and process is not None and str(holder).endswith(f"-{process.pid}"):
                return name
        return None

    def node_processes(self, node: str) -> list[int]:
        """The runner and gpu-monitor of a node, and every trainer it runs."""
        pids = [self.sys.processes[f"{service}@{node}"].pid for service in ("runner", "gpu-monitor")]
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                env = process.environ()
                if TAG_VARIABLE in env and env.get("NODE_NAME") == node and env.get("CHAOS_LEDGER") == str(self.ledger):
                    pids.append(process.pid)
        return pids

    def stop(self) -> dict[str, int]:
        codes = {}
        if self.system is not None:
            for name in list(self.sys.processes):
                try:
                    codes.update(self.sys.stop(name))
                except AssertionError:
                    codes[name] = -9
            self.sys.kill_jobs()
        self.redis.stop()
        return codes


def retrying(call: Callable[[], Any], timeout_s: float = 60) -> Any:
    """A Redis call from the harness, again while Redis restarts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_S)


# --- talking to the gateway -----------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw."""

    acknowledged: dict[int, str] = field(default_factory=dict)  # planned job -> job id (202)
    probes: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)  # "POST /jobs 503" -> count
    unanswered: int = 0  # requests with no answer (gateway down): retried
    refused_while_full: Counter[int] = field(default_factory=Counter)  # status of submits while Redis was full
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, what: str, response: httpx.Response | None) -> None:
        with self.lock:
            if response is None:
                self.unanswered += 1
            else:
                self.statuses[f"{what} {response.status_code}"] += 1


def call(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
    try:
        return client.request(method, url, timeout=HTTP_TIMEOUT_S, **kwargs)
    except httpx.TransportError:
        return None


def job_request(root: Path, job: PlannedJob) -> dict[str, Any]:
    return {
        "task_type": "language_model",
        "name": f"chaos-{job.index}",
        "model_path": str(root / "model"),
        "data_path": str(root / "data.jsonl"),
        "priority": job.priority,
        "gpu_count": job.gpu_count,
        "max_retries": job.max_retries,
        "auto_export": job.auto_export,
        "train_params": {"max_steps": job.max_steps, "save_steps": job.save_steps, "logging_steps": 1},
    }


def submit(client: httpx.Client, base: str, body: dict[str, Any], tally: Tally, deadline: float) -> dict | None:
    """Submit until the gateway takes it (202); a refusal (503) or no answer is tried again. A
    submission whose answer was lost may have landed: the log, not this client, says which jobs
    were accepted."""
    while time.monotonic() < deadline:
        response = call(client, "POST", f"{base}/jobs", json=body)
        tally.saw("POST /jobs", response)
        if response is not None and response.status_code == 202:
            return response.json()
        if response is not None and response.status_code not in (502, 503, 504):
            raise AssertionError(f"submission refused: {response.status_code} {response.text}")
        time.sleep(RETRY_S)
    return None


class Workload(threading.Thread):
    """Submits the planned jobs at their times, then cancels some and re-prioritises others."""

    def __init__(self, base: str, root: Path, jobs: list[PlannedJob], tally: Tally, t0: float) -> None:
        super().__init__(name="workload", daemon=True)
        self.base = base
        self.root = root
        self.tally = tally
        self.t0 = t0
        self.actions: list[tuple[float, int, str, PlannedJob]] = [(job.at_s, job.index, "submit", job) for job in jobs]
        heapq.heapify(self.actions)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client() as client:
                while self.actions:
                    at_s, _, kind, job = heapq.heappop(self.actions)
                    delay = self.t0 + at_s - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)  # the workload's own timetable
                    self.act(client, kind, job, at_s)
        except BaseException as exc:
            self.error = exc

    def act(self, client: httpx.Client, kind: str, job: PlannedJob, at_s: float) -> None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        if kind == "submit":
            created = submit(client, self.base, job_request(self.root, job), self.tally, deadline)
            if created is None:
                return
            with self.tally.lock:
                self.tally.acknowledged[job.index] = created["job_id"]
            now_s = time.monotonic() - self.t0
            if job.cancel_after_s is not None:
                heapq.heappush(self.actions, (now_s + job.cancel_after_s, job.index, "cancel", job))
            if job.reprioritise_after_s is not None:
                heapq.heappush(self.actions, (now_s + job.reprioritise_after_s, job.index, "patch", job))
            return
        job_id = self.tally.acknowledged[job.index]
        while time.monotonic() < deadline:
            if kind == "cancel":
                response = call(client, "POST", f"{self.base}/jobs/{job_id}/cancel")
                self.tally.saw("POST /jobs/{id}/cancel", response)
            else:
                response = call(client, "PATCH", f"{self.base}/queue/{job_id}", json={"priority": job.new_priority})
                self.tally.saw("PATCH /queue/{id}", response)
            if response is not None and response.status_code in (202, 409):
                return
            if response is not None and response.status_code not in (502, 503, 504):
                raise AssertionError(f"{kind} of {job_id}: {response.status_code} {response.text}")
            time.sleep(RETRY_S)


# --- faults and recovery --------------------------------------------------------------------


@dataclass
class Injected:
    kind: str
    node: str
    at_s: float  # when it began, from the start of the workload
    recovery_s: float | None  # None: did not recover within RECOVERY_TIMEOUT_S
    note: str = ""


class Chaos:
    def __init__(self, cluster: Cluster, config: Config, tally: Tally) -> None:
        self.cluster = cluster
        self.config = config
        self.tally = tally
        self.base = cluster.sys.base
        self.keys = Keys(cluster.sys.namespace)
        self.client = redis.Redis.from_url(cluster.redis.url, decode_responses=True, socket_timeout=5)
        self.http = httpx.Client()
        self.rng = random.Random(config.seed * 7919)

    def close(self) -> None:
        self.client.close()
        self.http.close()

    # Each returns when the fault has ended, with a note on what happened.

    def inject(self, fault: Fault) -> str:
        cluster = self.cluster
        if fault.kind == "redis":
            cluster.redis.stop(kill=True)
            time.sleep(fault.hold_s)  # down for a while, as the schedule says
            cluster.redis.start()
            return f"down {fault.hold_s:.1f} s"
        if fault.kind in ("scheduler-leader", "scheduler-standby"):
            leader = wait_for(lambda: cluster.leader(self.client), 30, "a scheduler leader")
            name = leader if fault.kind == "scheduler-leader" else ("standby" if leader == "scheduler" else "scheduler")
            cluster.restart(name)
            return name
        if fault.kind in ("gateway", "exporter"):
            cluster.restart(fault.kind)
            return ""
        if fault.kind in ("runner", "gpu-monitor"):
            cluster.restart(f"{fault.kind}@{fault.node}")
            return ""
        if fault.kind == "node-pause":
            return self.pause_node(fault.node)
        if fault.kind == "maxmemory":
            return self.fill_redis(fault.hold_s)
        raise ValueError(fault.kind)

    def pause_node(self, node: str) -> str:
        since = self.log_end()
        pids = self.cluster.node_processes(node)
        paused = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        try:
            lost = wait_for(
                lambda: self.find_fact(since, lambda e: isinstance(e, m.NodeLost) and e.node == node),
                self.config.node_timeout_s * 6,
                f"{node} to be declared lost",
                interval_s=0.1,
            )
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        return f"{len(pids) - 2} trainers paused; lost ({lost.reason}) after {time.monotonic() - paused:.1f} s"

    def fill_redis(self, hold_s: float) -> str:
        """Fill Redis to its maxmemory; submit meanwhile (every answer must be a 503); then free
        the memory and lift the limit."""
        used = self.fill()
        full_until = time.monotonic() + hold_s
        body = job_request(self.cluster.root, PlannedJob(-1, 0, 5, 1, 4, 4, False, 0))
        body["hold"] = True
        answers: Counter[int] = Counter()
        while time.monotonic() < full_until:
            response = call(self.http, "POST", f"{self.base}/jobs", json=body)
            if response is not None:
                answers[response.status_code] += 1
                self.tally.refused_while_full[response.status_code] += 1
                if response.status_code == 202:
                    self.tally.probes.append(response.json()["job_id"])
                    call(self.http, "POST", f"{self.base}/jobs/{response.json()['job_id']}/cancel")
            time.sleep(0.25)  # the schedule's hold, probed four times a second
        self.free()
        return f"{used / 1e6:.1f} MB full for {hold_s:.1f} s; submits answered {dict(answers)}"

    def fill(self) -> int:
        """Set maxmemory just above what Redis holds and fill it until writes are refused, then
        pin the limit below what it holds: what Redis counts as used swings with its buffers,
        and a small write could slip in. Returns the bytes it holds."""
        used = int(retrying(lambda: self.client.info("memory"))["used_memory"])
        retrying(lambda: self.client.config_set("maxmemory", used + 2_000_000))
        for size in (100_000, 1_000, 10):
            with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                for number in itertools.count():
                    self.client.set(f"{self.filler}:{size}:{number}", "x" * size)
        used = int(self.client.info("memory")["used_memory"])
        self.client.config_set("maxmemory", used // 2)
        return used

    def free(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.filler}:*", count=1000))
        for start in range(0, len(keys), 500):
            self.client.delete(*keys[start : start + 500])
        self.client.config_set("maxmemory", 0)

    def quiet_s(self) -> float:
        """Seconds since the last heartbeat of any process reached Redis, by Redis's clock."""
        last = retrying(lambda: self.client.xrevrange(self.keys.telemetry, count=1))
        seconds, micros = retrying(lambda: self.client.time())
        return seconds + micros / 1e6 - int(last[0][0].split("-")[0]) / 1000 if last else 0.0

    @property
    def filler(self) -> str:
        return f"chaos-filler:{self.cluster.sys.namespace}"

    def log_end(self) -> str:
        """The id of the log's last entry now (facts after it are new)."""
        found = retrying(lambda: self.client.xrevrange(self.keys.events, count=1))
        return found[0][0] if found else "0-0"

    def find_fact(self, after: str, matches: Callable[[m.Message], bool]) -> Any:
        for _, fields in retrying(lambda: self.client.xrange(self.keys.events, f"({after}", "+")):
            with contextlib.suppress(DecodeError):
                message = decode(fields)
                if matches(message):
                    return message
        return None

    def heard(self, after_ms: int, matches: Callable[[m.Message], bool]) -> bool:
        entries = retrying(lambda: self.client.xrange(self.keys.telemetry, f"{after_ms}-0", "+"))
        for _, fields in entries:
            with contextlib.suppress(DecodeError):
                if matches(decode(fields)):
                    return True
        return False

    def recovery(self, fault: Fault, ended: float, log_before: str) -> float | None:
        """Seconds from a fault's end until the system is whole again (see the module's doc)."""
        after_ms = int(time.time() * 1000)
        deadline = ended + RECOVERY_TIMEOUT_S
        probe: str | None = None
        body = job_request(self.cluster.root, PlannedJob(-1, 0, 5, 1, 4, 4, False, 0))
        body["hold"] = True  # decided (held) without taking a GPU; cancelled once decided
        done: set[str] = set()
        while time.monotonic() < deadline:
            if "probe" not in done:
                if probe is None:
                    created = submit(self.http, self.base, body, self.tally, deadline)
                    if created is None:
                        return None
                    probe = created["job_id"]
                    self.tally.probes.append(probe)
                    if created["status"] != "pending":
                        done.add("probe")
                else:
                    response = call(self.http, "GET", f"{self.base}/jobs/{probe}")
                    if response is not None and response.status_code == 200 and response.json()["status"] != "pending":
                        done.add("probe")
            if "health" not in done:
                response = call(self.http, "GET", f"{self.base}/health")
                if response is not None and response.status_code == 200:
                    done.add("health")
            if "node" not in done and self.node_back(fault, after_ms, log_before):
                done.add("node")
            if done == {"probe", "health", "node"}:
                break
            time.sleep(0.05)
        else:
            return None
        recovered = time.monotonic() - ended
        if probe is not None:
            response = call(self.http, "POST", f"{self.base}/jobs/{probe}/cancel")
            self.tally.saw("POST /jobs/{id}/cancel", response)
        return recovered

    def node_back(self, fault: Fault, after_ms: int, log_before: str) -> bool:
        node = fault.node
        if fault.kind == "runner":
            return self.heard(
                after_ms, lambda e: isinstance(e, m.ServiceHeartbeat) and e.service == "runner" and e.node == node
            )
        if fault.kind == "gpu-monitor":
            return self.heard(after_ms, lambda e: isinstance(e, m.NodeHeartbeat) and e.node == node)
        if fault.kind == "node-pause":
            return self.find_fact(log_before, lambda e: isinstance(e, m.NodeJoined) and e.node == node) is not None
        return True

    def run(self, faults: list[Fault], t0: float, progress: Callable[[str], None]) -> list[Injected]:
        done = []
        for fault in faults:
            delay = t0 + fault.at_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the fault schedule's own timetable
            began = time.monotonic()
            log_before = self.log_end()
            note = self.inject(fault)
            ended = time.monotonic()
            recovery = self.recovery(fault, ended, log_before)
            self.cluster.check_alive()
            injected = Injected(fault.kind, fault.node, round(began - t0, 1), recovery, note)
            done.append(injected)
            shown = "NOT RECOVERED" if recovery is None else f"recovered in {recovery:.2f} s"
            progress(f"t={injected.at_s:6.1f}s  {fault.kind:<17} {fault.node:<7} {note}  {shown}")
        return done


# --- reading the outcome --------------------------------------------------------------------


def read_log(client: redis.Redis, keys: Keys) -> list[tuple[str, m.Message]]:
    entries: list[tuple[str, m.Message]] = []
    last = "-"
    while True:
        page = client.xrange(keys.events, last if last == "-" else f"({last}", "+", count=1000)
        if not page:
            return entries
        for entry_id, fields in page:
            entries.append((entry_id, decode(fields)))
        last = page[-1][0]


@dataclass
class Verdict:
    """What the log and the ledger say, each on its own."""

    accepted: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # reason -> jobs failed for it
    lost: list[str] = field(default_factory=list)  # accepted (or acknowledged), never ended
    exports_lost: list[str] = field(default_factory=list)
    run_twice: list[str] = field(default_factory=list)  # in the log
    double_booked: list[str] = field(default_factory=list)  # in the log
    ran_twice: list[str] = field(default_factory=list)  # real processes (ledger)
    gpu_shared: list[str] = field(default_factory=list)  # real processes (ledger)
    fenced: list[str] = field(default_factory=list)  # a lost node's attempt that ran on meanwhile
    exports_twice: list[str] = field(default_factory=list)
    illegal: list[str] = field(default_factory=list)  # facts the fold refuses
    requeued: int = 0
    preempted: int = 0
    processes: int = 0
    exports: int = 0
    dead_letters: int = 0


def check_log(entries: list[tuple[str, m.Message]], acknowledged: set[str], verdict: Verdict) -> set[tuple[str, int]]:
    """Lost jobs, jobs with two live attempts, GPUs held by two attempts, folded independently
    of the services' code; returns the attempts ended by the loss of their node."""
    current: dict[str, int] = {}  # job -> its latest attempt
    live: dict[str, tuple[int, str, list[int]]] = {}  # job -> (attempt, node, gpus) while it holds GPUs
    holders: dict[tuple[str, int], tuple[str, int]] = {}  # (node, gpu) -> (job, attempt)
    ended: set[str] = set()
    exports: dict[str, str] = {}
    started: Counter[tuple[str, int]] = Counter()
    fenced: set[tuple[str, int]] = set()
    stopping: set[tuple[str, int]] = set()  # attempts that gave up their GPUs and may still report

    def release(job: str) -> None:
        attempt, node, gpus = live.pop(job)
        for gpu in gpus:
            if holders.get((node, gpu)) == (job, attempt):
                del holders[(node, gpu)]

    for entry_id, event in entries:
        job = event.job_id or ""
        if isinstance(event, m.JobAccepted):
            current[job] = 0
        elif isinstance(event, m.JobScheduled):
            if job in live:
                verdict.run_twice.append(
                    f"{job}: attempt {event.attempt} scheduled at {entry_id} while {live[job][0]} held GPUs"
                )
            for gpu in event.gpu_ids:
                holder = holders.get((event.node, gpu))
                if holder is not None and holder[0] != job:
                    verdict.double_booked.append(f"{event.node}/{gpu} at {entry_id}: {job} while {holder[0]} holds it")
                holders[(event.node, gpu)] = (job, event.attempt)
            live[job] = (event.attempt, event.node, list(event.gpu_ids))
            current[job] = event.attempt
        elif isinstance(event, m.JobStarted):
            started[(job, event.attempt)] += 1
            if started[(job, event.attempt)] == 2:
                verdict.run_twice.append(f"{job}: attempt {event.attempt} started twice (at {entry_id})")
        elif isinstance(event, (m.JobPreempted, m.JobSuspended)):
            verdict.preempted += isinstance(event, m.JobPreempted)
            if job in live and live[job][0] == event.attempt:
                release(job)  # its GPUs go to the preemptor; its process stops on its own time
                stopping.add((job, event.attempt))
        elif isinstance(event, m.JobStopped):
            stopping.discard((job, event.attempt))
        elif isinstance(event, m.JobRequeued):
            verdict.requeued += 1
            if job in live and live[job][0] == event.attempt:
                release(job)
            if event.reason in ("node_lost", "runner_lost"):
                fenced.add((job, event.attempt))
        elif event.type in TERMINAL_TYPES:
            attempt = getattr(event, "attempt", None)
            if (job, attempt) in stopping:
                stopping.discard((job, attempt))  # it ended on its own while being stopped
            elif attempt is not None and (attempt != current.get(job) or job not in live):
                continue  # a late report of an attempt already ended: ignored
            if job in live:
                release(job)
            if job not in ended:
                ended.add(job)
                verdict.outcomes[event.type] += 1
                if isinstance(event, (m.JobFailed, m.JobRejected)):
                    verdict.failures[event.reason] += 1
            if isinstance(event, m.JobFailed) and event.reason in ("node_lost", "runner_lost"):
                fenced.add((job, attempt or 0))
        elif isinstance(event, m.ExportRequested):
            exports[job] = "pending"
        elif isinstance(event, (m.ExportCompleted, m.ExportFailed)):
            exports[job] = event.type
    verdict.accepted = len(current)
    verdict.lost = sorted(job for job in current if job not in ended)
    verdict.lost += sorted(f"{job} (acknowledged, not in the log)" for job in acknowledged - set(current))
    verdict.exports_lost = sorted(job for job, status in exports.items() if status == "pending")
    verdict.exports = len(exports)
    return fenced


def fold_log(entries: list[tuple[str, m.Message]], verdict: Verdict) -> None:
    """The services' own fold must accept every fact in the order of the log."""
    state = State()
    for entry_id, event in entries:
        if isinstance(event, (m.Command, m.Telemetry)):
            continue
        try:
            state.apply(entry_id, event)
        except IllegalTransition as exc:
            verdict.illegal.append(f"{entry_id}: {exc}")


def check_ledger(path: Path, fenced: set[tuple[str, int]], verdict: Verdict) -> None:
    """Real double runs and shared GPUs, from what the trainers themselves recorded."""
    processes: dict[int, dict[str, Any]] = {}
    exports: dict[int, dict[str, Any]] = {}
    now = time.time()
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        table = exports if row["event"].startswith("export") else processes
        if row["event"] in ("start", "export-start"):
            table[row["pid"]] = {**row, "end": math.inf}
        elif row["pid"] in table:
            table[row["pid"]]["end"] = row["t"]
    verdict.processes = len(processes)

    def attempt(process: dict[str, Any]) -> tuple[str, int]:
        job, _, number = process["tag"].partition(":")
        return job, int(number)

    def overlapping(found: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for a, b in itertools.combinations(found, 2):
            if a["t"] < min(b["end"], now) and b["t"] < min(a["end"], now):
                yield a, b

    def file(what: str, a: dict[str, Any], b: dict[str, Any], otherwise: list[str]) -> None:
        (verdict.fenced if attempt(a) in fenced or attempt(b) in fenced else otherwise).append(what)

    for tag, found in grouped(processes.values(), lambda p: p["tag"]).items():
        if len(found) > 1:
            verdict.ran_twice.append(f"{tag}: {len(found)} processes {[p['pid'] for p in found]}")
    for job, found in grouped(processes.values(), lambda p: attempt(p)[0]).items():
        for a, b in overlapping(found):
            if a["tag"] != b["tag"]:
                file(
                    f"{job}: attempts {attempt(a)[1]} and {attempt(b)[1]} ran at the same time", a, b, verdict.ran_twice
                )
    for node, found in grouped(processes.values(), lambda p: p["node"]).items():
        for a, b in overlapping(found):
            shared = set(a["gpus"].split(",")) & set(b["gpus"].split(",")) - {""}
            if attempt(a)[0] != attempt(b)[0] and shared:
                what = f"{node}/{','.join(sorted(shared))}: {a['tag']} and {b['tag']} at the same time"
                file(what, a, b, verdict.gpu_shared)
    for output_dir, found in grouped(exports.values(), lambda p: p["output_dir"]).items():
        verdict.exports_twice += [f"{output_dir}: two exports at once" for _ in overlapping(found)]


def grouped(rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, list[dict[str, Any]]]:
    groups: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


# --- the run --------------------------------------------------------------------------------


@dataclass
class Report:
    config: Config
    injected: list[Injected]
    verdict: Verdict
    tally: Tally
    audit: dict[str, tuple[int, str]]  # command -> (exit code, last line)
    exits: dict[str, int]
    unexpected_exits: list[str]
    orphans: int
    duration_s: float

    @property
    def audit_ok(self) -> bool:
        return all(code == 0 or (code == 2 and "invalid choice" in text) for code, text in self.audit.values())

    @property
    def ok(self) -> bool:
        v = self.verdict
        return (
            not (v.lost or v.exports_lost or v.run_twice or v.double_booked or v.ran_twice or v.gpu_shared)
            and not (v.exports_twice or v.illegal or self.unexpected_exits or self.orphans)
            and all(fault.recovery_s is not None for fault in self.injected)
            and self.audit_ok
            and not any(code for code in self.exits.values())
            and all(status != 202 for status in self.tally.refused_while_full)
        )

    def table(self) -> str:
        lines = [
            f"chaos run: {self.config.jobs} jobs, seed {self.config.seed}, {len(self.injected)} faults, "
            f"{self.duration_s:.0f} s (2 nodes of {GPUS_PER_NODE} GPUs; NODE_TIMEOUT_S={self.config.node_timeout_s:g}, "
            f"HEARTBEAT_INTERVAL_S={self.config.heartbeat_interval_s:g}, LEADER_LEASE_MS={self.config.leader_lease_ms})",
            "",
            f"{'fault':<18} {'count':>5} {'recovery p50':>13} {'p99':>8} {'max':>8}",
        ]
        for kind in FAULTS:
            times = [f.recovery_s for f in self.injected if f.kind == kind]
            if not times:
                continue
            known = sorted(t for t in times if t is not None)
            p50 = f"{percentile(known, 50):.2f} s" if known else "-"
            p99 = f"{percentile(known, 99):.2f} s" if known else "-"
            worst = f"{known[-1]:.2f} s" if len(known) == len(times) else "never"
            lines.append(f"{kind:<18} {len(times):>5} {p50:>13} {p99:>8} {worst:>8}")
        v = self.verdict
        outcomes = ", ".join(f"{n} {t.split('.')[1]}" for t, n in sorted(v.outcomes.items()))
        lines += [
            "",
            f"jobs accepted {v.accepted} ({len(self.tally.acknowledged)} of the workload, "
            f"{len(self.tally.probes)} probes): {outcomes}; {v.requeued} attempts requeued, {v.preempted} preempted; "
            f"{v.processes} trainer processes; {v.exports} exports; failed for {dict(v.failures)}",
            f"submits while Redis was full: {dict(self.tally.refused_while_full)}; "
            f"answers seen: {dict(sorted(self.tally.statuses.items()))}; unanswered {self.tally.unanswered}",
            "",
            f"{'jobs lost':<44} {len(v.lost)}" + (f"  {v.lost[:5]}" if v.lost else ""),
            f"{'exports lost':<44} {len(v.exports_lost)}" + (f"  {v.exports_lost[:5]}" if v.exports_lost else ""),
            f"{'jobs run twice (log / processes)':<44} {len(v.run_twice)} / {len(v.ran_twice)}"
            + (f"  {(v.run_twice + v.ran_twice)[:5]}" if v.run_twice or v.ran_twice else ""),
            f"{'GPUs double-booked (log / processes)':<44} {len(v.double_booked)} / {len(v.gpu_shared)}"
            + (f"  {(v.double_booked + v.gpu_shared)[:5]}" if v.double_booked or v.gpu_shared else ""),
            f"{'exports run twice at once':<44} {len(v.exports_twice)}",
            f"{'facts the fold refuses':<44} {len(v.illegal)}" + (f"  {v.illegal[:3]}" if v.illegal else ""),
            f"{'stale attempts alive beside the next (node lost)':<44} {len(v.fenced)}"
            + (f"  {v.fenced[:3]}" if v.fenced else ""),
            f"{'dead-lettered entries':<44} {v.dead_letters}",
            f"{'processes that exited by themselves':<44} {len(self.unexpected_exits)}"
            + (f"  {self.unexpected_exits}" if self.unexpected_exits else ""),
            f"{'trainers left running at the end':<44} {self.orphans}",
            f"{'exit codes on SIGTERM':<44} {sorted(set(self.exits.values()))}",
        ]
        for command, (code, text) in self.audit.items():
            lines.append(f"{'swift-trainer audit ' + command:<44} exit {code}: {text}")
        lines.append("")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def percentile(values: list[float], pct: float) -> float:
    """Nearest rank."""
    return values[max(0, math.ceil(pct / 100 * len(values)) - 1)]


def audit(system: System, command: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "audit", command],
        env=system.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    said = next((line for line in text if "VIOLATION" in line or "BROKEN" in line), text[-1] if text else "")
    return done.returncode, said[:300]


def wait_drained(client: redis.Redis, keys: Keys, timeout_s: float) -> None:
    """Until every accepted job has ended and every export has finished (bounded)."""

    def drained() -> bool:
        verdict = Verdict()
        check_log(retrying(lambda: read_log(client, keys)), set(), verdict)
        return not verdict.lost and not verdict.exports_lost

    with contextlib.suppress(AssertionError):  # what is left is reported as lost
        wait_for(drained, timeout_s, "every job to end", interval_s=1.0)


def prepare(root: Path) -> None:
    """The model and dataset paths every job names (the stand-in reads neither)."""
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "config.json").write_text("{}")
    (root / "data.jsonl").write_text('{"messages": []}\n')


def run(config: Config, root: Path, progress: Callable[[str], None] = print) -> Report:
    rng = random.Random(config.seed)
    jobs = plan_workload(rng, config)
    faults = plan_faults(rng, config)
    prepare(root)
    cluster = Cluster(root, config)
    tally = Tally()
    begun = time.monotonic()
    exits: dict[str, int] = {}
    try:
        cluster.start()
        progress(f"cluster up in {time.monotonic() - begun:.1f} s: {sorted(cluster.sys.processes)}")
        chaos = Chaos(cluster, config, tally)
        try:
            t0 = time.monotonic()
            workload = Workload(cluster.sys.base, root, jobs, tally, t0)
            workload.start()
            injected = chaos.run(faults, t0, progress)
            workload.join(timeout=config.workload_span_s + RECOVERY_TIMEOUT_S)
            if workload.error is not None:
                raise workload.error
            progress(f"workload done at t={time.monotonic() - t0:.0f}s; waiting for every job to end")
            wait_drained(chaos.client, chaos.keys, config.drain_timeout_s)
            cluster.check_alive()
            results = {command: audit(cluster.sys, command) for command in ("verify", "check", "rebuild")}
            orphans = sum(
                1
                for process in psutil.process_iter()
                if _safe_environ(process).get("CHAOS_LEDGER") == str(cluster.ledger)
                and TAG_VARIABLE in _safe_environ(process)
            )
            entries = read_log(chaos.client, chaos.keys)
            verdict = Verdict(dead_letters=int(retrying(lambda: chaos.client.xlen(chaos.keys.dead_letter))))
        finally:
            chaos.close()
        exits = cluster.stop()
    finally:
        if cluster.system is not None and cluster.sys.processes:
            cluster.stop()
    fenced = check_log(entries, set(tally.acknowledged.values()) | set(tally.probes), verdict)
    fold_log(entries, verdict)
    check_ledger(cluster.ledger, fenced, verdict)
    return Report(
        config,
        injected,
        verdict,
        tally,
        results,
        exits,
        cluster.unexpected_exits,
        orphans,
        time.monotonic() - begun,
    )


def _safe_environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:
        return {}


@contextlib.contextmanager
def workspace(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", type=int, default=None, help="how many (default: about one per ten jobs)")
    parser.add_argument("--step-s", type=float, default=0.15, help="one step of the stand-in trainer")
    parser.add_argument("--dir", type=Path, default=None, help="keep the run's files (logs, ledger) here")
    parser.add_argument("--no-preemption", action="store_true", help="run with PREEMPTION=off")
    args = parser.parse_args(argv)
    config = Config(
        jobs=args.jobs, seed=args.seed, faults=args.faults, step_s=args.step_s, preemption=not args.no_preemption
    )
    with workspace(args.dir) as root:
        report = run(config, root)
        print()
        print(report.table())
        if not report.ok:
            print(f"(process logs under {root / 'system'})" if args.dir else "(rerun with --dir to keep the logs)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
